"""Real serverless functions in the spirit of SeBS, FunctionBench and ServerlessBench.

Every function is ``fn(size) -> int`` (a small checksum, so nothing is optimised away) and its
cost grows with ``size``. ``SPECS`` gives each one its input range and the user's memory size;
CPU follows memory (``cpu_cores = mem_mb * ratio``, OpenWhisk-style, ratio configurable).

Users' sizes are chosen so that, at the default ratio of 1 core per 256 MB, some functions are
under-provisioned (pyloop at 0.5 core needs 1; matmul / zlib_threads at 1 core use 2) and some
over-provisioned (image, graph, memhog, sleepy at 2 cores use at most 1; sleepy uses ~none),
memory mostly over-provisioned, and memhog / phased have working sets that grow with the input,
while spiky's jumps inside one call in five, whatever its input's size.
Heavy imports (numpy, Pillow) happen inside the functions: a worker imports only what it runs.
"""

from __future__ import annotations

import gc
import heapq
import html
import lzma
import random
import string
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.units import MB

DEFAULT_RATIO = 1.0 / 256.0  # user cores per MB of user memory (1 core per 256 MB)


def pyloop(size: float) -> int:
    """Single-threaded CPU-bound pure Python: ``size`` thousand loop iterations."""
    s = 0
    for i in range(int(size * 1000)):
        s += (i * i) % 7
    return s


def matmul(size: float) -> int:
    """Multi-threaded native code: three n x n float64 matmuls (BLAS, 2 threads)."""
    import numpy as np

    n = int(size)
    rng = np.random.default_rng(n)
    a = rng.random((n, n))
    b = rng.random((n, n))
    for _ in range(3):
        a = (a @ b) / n
    return int(a.sum())


_BASE: dict[int, bytes] = {}


def _payload(n_bytes: int, seed: int) -> bytes:
    """Text-like bytes (random 8-byte words from a 512-word vocabulary), cached per seed."""
    if seed not in _BASE:
        import numpy as np

        rng = np.random.default_rng(seed)
        letters = rng.integers(97, 123, size=(512, 8), dtype=np.uint8)
        letters[np.arange(512), rng.integers(3, 8, size=512)] = 32  # word lengths 3..7 + space
        words = letters[rng.integers(0, 512, size=(16 * MB) // 8)]
        _BASE[seed] = words.tobytes()
    base = _BASE[seed]
    reps = n_bytes // len(base) + 1
    return (base * reps)[:n_bytes] if reps > 1 else base[:n_bytes]


def warm(name: str) -> None:
    """Import and cache what ``name`` needs, so the first invocation is not a cold one."""
    if name in ("zlibmt", "compress"):
        for seed in (1, 2, 3):
            _payload(1, seed)
    elif name == "spiky":
        _records()
    elif name == "matmul":
        import numpy  # noqa: F401
    elif name == "image":
        import PIL.Image  # noqa: F401
        import PIL.ImageFilter  # noqa: F401


def zlib_threads(size: float) -> int:
    """Multi-threaded native code: 2 threads zlib-compress ``size`` MB each (no GIL held)."""
    data = [_payload(int(size * MB), s) for s in (1, 2)]
    out = [0, 0]

    def work(i: int) -> None:
        c = zlib.compressobj(6)
        n = 0
        for off in range(0, len(data[i]), 1 << 16):
            n += len(c.compress(data[i][off : off + (1 << 16)]))
        out[i] = n + len(c.flush())

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(out)


def image(size: float) -> int:
    """Image processing (Pillow): a size x size photo-like image -> blur, resize, rotate, JPEG."""
    import io

    from PIL import Image, ImageFilter

    n = int(size)
    img = Image.effect_mandelbrot((n, n), (-2.0, -1.5, 1.0, 1.5), 64).convert("RGB")
    img = img.filter(ImageFilter.GaussianBlur(3)).filter(ImageFilter.SHARPEN)
    img = img.resize((n // 2, n // 2), Image.Resampling.LANCZOS).rotate(17, expand=True)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return len(buf.getvalue())


def compress(size: float) -> int:
    """Compression: lzma (preset 1) of ``size`` MB of text-like data."""
    return len(lzma.compress(_payload(int(size * MB), 3), preset=1))


def graph(size: float) -> int:
    """Graph algorithm: pure-Python Dijkstra, random graph of ``size`` nodes, degree 6."""
    n = int(size)
    rng = random.Random(n)
    adj: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for u in range(n):
        for _ in range(3):
            v = rng.randrange(n)
            w = rng.randint(1, 100)
            adj[u].append((v, w))
            adj[v].append((u, w))
    dist = [1 << 60] * n
    dist[0] = 0
    heap = [(0, 0)]
    while heap:
        d, u = heapq.heappop(heap)
        if d > dist[u]:
            continue
        for v, w in adj[u]:
            if d + w < dist[v]:
                dist[v] = d + w
                heapq.heappush(heap, (d + w, v))
    return sum(x for x in dist if x < 1 << 60) % 1_000_003


_ROW = string.Template("<tr><td>$i</td><td>$name</td><td>$email</td><td>$amount</td></tr>")
_PAGE = string.Template(
    "<html><head><title>$title</title></head><body><table>$rows</table></body></html>"
)


def html_render(size: float) -> int:
    """HTML templating (string.Template + escaping) of a ``size``-row table."""
    rows = [
        _ROW.substitute(
            i=i,
            name=html.escape(f"user <{i}> & co"),
            email=html.escape(f"u{i}@example.org"),
            amount=f"{i * 1.37:.2f}",
        )
        for i in range(int(size))
    ]
    return len(_PAGE.substitute(title="report", rows="".join(rows)))


def memhog(size: float) -> int:
    """Memory-heavy: a working set of ``size`` MB, touched, scanned twice, held briefly."""
    buf = bytearray(int(size * MB))
    for off in range(0, len(buf), 4096):
        buf[off] = 1
    total = 0
    for _ in range(2):
        total += buf.count(1)
    time.sleep(0.05)
    del buf
    return total


def sleepy(size: float) -> int:
    """Mostly waiting: ``size`` ms of I/O-like waits with a sliver of CPU in between."""
    end = time.monotonic() + size / 1000.0
    s = 0
    while time.monotonic() < end:
        time.sleep(0.02)
        s += sum(range(2000))
    return s


def phased(size: float) -> int:
    """Demand changes within one invocation: a CPU phase, then a memory phase of ``size`` MB."""
    s = pyloop(size * 20)  # ~ size x 20k iterations
    return s + memhog(size)


_RECORDS: list[bytes] = []
SPIKE_ONE_IN = 5
"""spiky: one input in this many (by its content, not its size) expands inside the call."""
SPIKE_MB = 128
"""spiky: what such a call allocates on top of its usual ~15 MB (~9x; its container's peak
~28 -> ~140 MB, measured: below the user's 256 MB, above a 128 MB harvest from the usual peak)."""


def _records() -> bytes:
    """1 MB of log-like text (512-word vocabulary), built once per worker; no numpy, so the
    worker stays small (~15 MB) and a harvest sized from spiky's usual peak is a real cut."""
    if not _RECORDS:
        rng = random.Random(7)
        words = [
            "".join(rng.choices(string.ascii_lowercase, k=3 + i % 5)).encode() for i in range(512)
        ]
        _RECORDS.append(b" ".join(rng.choices(words, k=MB // 5))[:MB])
    return _RECORDS[0]


def spikes(size: float) -> bool:
    """Whether spiky's input ``size`` is one of the inputs whose call expands (a property of its
    content, modelled by a hash of the value: the same inputs spike under every manager, and no
    larger input announces it)."""
    return zlib.crc32(struct.pack("<d", size)) % SPIKE_ONE_IN == 0


def spiky(size: float) -> int:
    """Compression whose memory spikes inside some calls without a larger input: zlib (level 6)
    of ``size`` MB of log records held in memory; for one input in ``SPIKE_ONE_IN``, after
    compressing, the call also expands the batch into a ``SPIKE_MB`` buffer (touched, scanned),
    as a parser does for the odd record that must be materialised whole."""
    base = _records()
    whole, rest = divmod(int(size * MB), MB)
    data = b"".join([base] * whole + [base[:rest]])  # the request's payload, one allocation
    out = len(zlib.compress(data, 6))
    if spikes(size):
        buf = bytearray(SPIKE_MB * MB)
        buf[:: 1 << 12] = b"\x01" * (len(buf) >> 12)  # touch every page: resident, not lazy
        out += buf.count(1)
        del buf
    return out


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    fn: Callable[[float], int]
    lo: float  # input-size range (function-specific units)
    hi: float
    mem_mb: float  # the user's memory size; CPU = mem_mb * ratio
    shape: str  # what it needs, for the docs and the table

    def input_size(self, u: float) -> float:
        """The input at quantile ``u`` in [0, 1] (log-uniform between lo and hi)."""
        return self.lo * (self.hi / self.lo) ** u


SPECS: list[FunctionSpec] = [
    FunctionSpec("pyloop", pyloop, 1500, 12000, 128, "1 core, pure Python (user 0.5 core: under)"),
    FunctionSpec("matmul", matmul, 500, 1400, 256, "2 BLAS threads (user 1 core: under)"),
    FunctionSpec("zlibmt", zlib_threads, 2, 12, 256, "2 zlib threads (user 1 core: under)"),
    FunctionSpec("image", image, 800, 2400, 512, "1 core, Pillow (user 2 cores: over)"),
    FunctionSpec("compress", compress, 0.5, 6, 256, "1 core, lzma (user 1 core: fits)"),
    FunctionSpec("graph", graph, 15000, 90000, 512, "1 core, Dijkstra (user 2 cores: over)"),
    FunctionSpec("html", html_render, 15000, 120000, 256, "1 core, templating (user 1: fits)"),
    FunctionSpec("memhog", memhog, 40, 360, 512, "working set 40-360 MB (user 2 cores: over)"),
    FunctionSpec("sleepy", sleepy, 100, 1200, 512, "mostly waiting (user 2 cores: over)"),
    FunctionSpec("phased", phased, 30, 200, 256, "CPU phase then 30-200 MB (user 1 core)"),
    FunctionSpec("spiky", spiky, 1, 8, 256, "1 core; 1 call in 5 takes +128 MB (user 1: fits)"),
]
BY_NAME = {s.name: s for s in SPECS}


def run(name: str, size: float) -> tuple[float, int]:
    """(execution seconds, checksum) of one invocation in this process."""
    fn = BY_NAME[name].fn
    t0 = time.perf_counter()
    out = fn(size)
    dt = time.perf_counter() - t0
    gc.collect()
    return dt, out
