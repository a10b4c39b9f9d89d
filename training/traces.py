"""Invocation traces in the Azure Functions 2019 format, plus a synthetic generator.

The simulator replays a :class:`Trace`: per-minute invocation counts per function (the only
arrival information the public trace has), a duration percentile curve per function (to draw
input-dependent work) and a memory percentile curve. :func:`load_azure` reads either the bundled
sample layout or the real public files; :func:`generate` produces traces with Azure-like shapes
for training at scales the sample cannot offer. Only numpy and the stdlib ``csv`` module are used.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DURATION_PCTS = (0, 1, 25, 50, 75, 99, 100)
MEMORY_PCTS = (1, 5, 25, 50, 75, 95, 99, 100)

_DUR_COLS = ["Average"] + [f"percentile_Average_{p}" for p in DURATION_PCTS]
_MEM_COLS = ["AverageAllocatedMb"] + [f"AverageAllocatedMb_pct{p}" for p in MEMORY_PCTS]
_SAMPLE_FILES = ("invocation.csv", "duration.csv", "memory.csv")
_REAL_FILES = (
    "invocations_per_function_md.anon.d{day:02d}.csv",
    "function_durations_percentiles.anon.d{day:02d}.csv",
    "app_memory_percentiles.anon.d{day:02d}.csv",
)


@dataclass(frozen=True, eq=False)
class TraceFunction:
    """One function of a trace. Arrays are copied and made read-only so a Trace is immutable.

    ``eq=False``: field-wise equality is ill-defined for numpy arrays, so identity is used.
    """

    name: str  # HashFunction (or a generated id)
    trigger: str  # http, timer, queue, event, orchestration, storage, others
    per_minute: np.ndarray  # int64 invocation counts, one per minute
    duration_avg_ms: float
    duration_pct_ms: np.ndarray  # float64 at DURATION_PCTS
    memory_avg_mb: float  # NaN when the memory file has no row for this function/app
    memory_pct_mb: np.ndarray  # float64 at MEMORY_PCTS (NaN when unknown)

    def __post_init__(self) -> None:
        for field, dtype, size in (
            ("per_minute", np.int64, None),
            ("duration_pct_ms", np.float64, len(DURATION_PCTS)),
            ("memory_pct_mb", np.float64, len(MEMORY_PCTS)),
        ):
            arr = np.array(getattr(self, field), dtype=dtype)  # always a private copy
            if arr.ndim != 1 or (size is not None and arr.size != size):
                raise ValueError(f"{self.name}: {field} has shape {arr.shape}")
            arr.flags.writeable = False
            object.__setattr__(self, field, arr)
        if (self.per_minute < 0).any():
            raise ValueError(f"{self.name}: negative invocation count")
        object.__setattr__(self, "duration_avg_ms", float(self.duration_avg_ms))
        object.__setattr__(self, "memory_avg_mb", float(self.memory_avg_mb))


@dataclass(frozen=True, eq=False)
class Trace:
    """A set of functions sharing one time axis of ``minutes`` one-minute bins."""

    functions: list[TraceFunction]
    minutes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "functions", list(self.functions))
        for f in self.functions:
            if f.per_minute.size != self.minutes:
                raise ValueError(f"{f.name}: {f.per_minute.size} minutes, trace has {self.minutes}")

    def total_invocations(self) -> int:
        return int(sum(int(f.per_minute.sum()) for f in self.functions))

    def arrivals(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(times_s float64 sorted ascending, function_index int32) for every invocation.

        The trace only has per-minute counts, so placement within a minute is synthesised:
        timer-triggered functions fire evenly spaced at a per-function seeded phase (so a timer
        stays periodic across minutes); the rest are uniform random in their minute.
        The draws come from a stream of their own: ``generate`` and ``build_workload`` draw from
        ``default_rng(seed)`` for the same seed, and sharing it put every timer's phase in the
        range of the draw that made it a timer (the first third of its minute).
        """
        rng = np.random.default_rng([seed, 3])
        fn_parts, min_parts, cnt_parts = [], [], []
        for i, f in enumerate(self.functions):  # only non-zero cells; no dense matrix
            nz = np.flatnonzero(f.per_minute)
            fn_parts.append(np.full(nz.size, i, dtype=np.int32))
            min_parts.append(nz)
            cnt_parts.append(f.per_minute[nz])
        if not fn_parts:
            return np.empty(0), np.empty(0, dtype=np.int32)
        cell_fn = np.concatenate(fn_parts)
        cell_min = np.concatenate(min_parts)
        cell_cnt = np.concatenate(cnt_parts)
        n = int(cell_cnt.sum())
        fn = np.repeat(cell_fn, cell_cnt)
        minute = np.repeat(cell_min, cell_cnt).astype(np.float64)
        rank = np.arange(n) - np.repeat(np.cumsum(cell_cnt) - cell_cnt, cell_cnt)
        count = np.repeat(cell_cnt, cell_cnt)
        is_timer = np.array([f.trigger == "timer" for f in self.functions], dtype=bool)
        phase = rng.random(len(self.functions))
        frac = np.where(is_timer[fn], (phase[fn] + rank) / count, rng.random(n))
        times = (minute + frac) * 60.0
        order = np.argsort(times, kind="stable")
        return times[order], fn[order]

    def sample_duration_ms(self, fn_index: int, rng: np.random.Generator, size) -> np.ndarray:
        """Draw durations from the function's percentile curve.

        Piecewise-linear inverse CDF through the percentile points, percentile 0/100 acting as
        min/max: the trace has no per-invocation durations, and this keeps the tail it reports.
        """
        curve = np.maximum.accumulate(self.functions[fn_index].duration_pct_ms)
        return np.interp(rng.random(size) * 100.0, DURATION_PCTS, curve)

    def slice(self, start_minute: int, minutes: int) -> Trace:
        """Minutes [start_minute, start_minute + minutes) of every function (e.g. an episode)."""
        if start_minute < 0 or minutes < 0 or start_minute + minutes > self.minutes:
            raise ValueError(f"slice [{start_minute}, +{minutes}) outside 0..{self.minutes}")
        end = start_minute + minutes
        return Trace(
            [_replace_counts(f, f.per_minute[start_minute:end]) for f in self.functions], minutes
        )

    def subset(self, indices) -> Trace:
        """The functions at ``indices`` (in that order), e.g. those an invoker host serves."""
        return Trace([self.functions[int(i)] for i in np.asarray(indices).ravel()], self.minutes)


def _replace_counts(f: TraceFunction, counts: np.ndarray) -> TraceFunction:
    return TraceFunction(
        f.name,
        f.trigger,
        counts,
        f.duration_avg_ms,
        f.duration_pct_ms,
        f.memory_avg_mb,
        f.memory_pct_mb,
    )


# ---------------------------------------------------------------------------- loading / writing


def _read_csv(path: Path, required: list[str]) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, fields) of the non-blank rows, checking columns and widths."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trace file not found")
    with path.open(newline="") as fh:
        rows = [(line, r) for line, r in enumerate(csv.reader(fh), start=1) if r]
    if not rows:
        raise ValueError(f"{path}: empty file (no header)")
    header = [h.strip() for h in rows[0][1]]
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise ValueError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")
    return header, rows[1:]


def _index(rows: list[tuple[int, list[str]]], cols: list[int]) -> dict:
    """Rows keyed by the values in ``cols`` (first row wins on duplicates)."""
    out: dict[tuple, tuple[int, list[str]]] = {}
    for line, row in rows:
        out.setdefault(tuple(row[c] for c in cols), (line, row))
    return out


def _numbers(path: Path, line: int, values: list[str], dtype) -> np.ndarray:
    try:
        return np.array([v.strip() for v in values], dtype=dtype)
    except ValueError as exc:
        raise ValueError(f"{path}:{line}: non-numeric value ({exc})") from None


def load_azure(path: str | Path, day: int = 1) -> Trace:
    """Load a trace directory in the sample layout or the real Azure 2019 layout.

    Sample layout: ``invocation.csv``, ``duration.csv``, ``memory.csv`` keyed by HashFunction.
    Real layout (used when ``invocation.csv`` is absent): the ``*.anon.dNN.csv`` files of
    ``day``; functions are keyed by (HashOwner, HashApp, HashFunction) and memory, which Azure
    reports per app, by (HashOwner, HashApp), so functions of one app share its memory row.
    Functions without a duration row are dropped (the simulator cannot size their work);
    functions without a memory row get NaN memory (the simulator must choose a default).
    """
    root = Path(path)
    names = _SAMPLE_FILES
    if not (root / names[0]).exists():
        names = tuple(n.format(day=day) for n in _REAL_FILES)
        if not (root / names[0]).exists():
            raise FileNotFoundError(
                f"{root}: neither {_SAMPLE_FILES[0]} (sample layout) nor "
                f"{names[0]} (real layout, day {day}) found"
            )
    inv_path, dur_path, mem_path = (root / n for n in names)

    inv_header, inv_rows = _read_csv(inv_path, ["HashFunction", "Trigger"])
    minute_cols = [i for i, h in enumerate(inv_header) if h.isdigit()]
    if [int(inv_header[i]) for i in minute_cols] != list(range(1, len(minute_cols) + 1)):
        raise ValueError(f"{inv_path}: minute columns must be 1..N in order")
    keys = [k for k in ("HashOwner", "HashApp", "HashFunction") if k in inv_header]

    dur_header, dur_rows = _read_csv(dur_path, keys + _DUR_COLS)
    durations = _index(dur_rows, [dur_header.index(k) for k in keys])

    mem_keys = [k for k in keys if k != "HashFunction"] or keys
    mem_header, mem_rows = _read_csv(mem_path, [])
    if "HashFunction" in mem_header:
        mem_keys = keys
    missing = [c for c in mem_keys + _MEM_COLS if c not in mem_header]
    if missing:
        raise ValueError(f"{mem_path}: missing column(s) {missing}")
    memory = _index(mem_rows, [mem_header.index(k) for k in mem_keys])

    dur_idx = [dur_header.index(c) for c in _DUR_COLS]
    mem_idx = [mem_header.index(c) for c in _MEM_COLS]
    key_idx = {k: inv_header.index(k) for k in keys}
    trig_idx = inv_header.index("Trigger")
    functions = []
    for line, row in inv_rows:
        key = {k: row[i] for k, i in key_idx.items()}
        counts = _numbers(inv_path, line, [row[i] for i in minute_cols], np.int64)
        if (counts < 0).any():
            raise ValueError(f"{inv_path}:{line}: negative invocation count")
        dur = durations.get(tuple(key.values()))
        if dur is None:
            continue
        d = _numbers(dur_path, dur[0], [dur[1][i] for i in dur_idx], np.float64)
        if not np.isfinite(d).all():
            raise ValueError(f"{dur_path}:{dur[0]}: non-finite duration")
        mem = memory.get(tuple(key[k] for k in mem_keys))
        m = (
            np.full(len(_MEM_COLS), np.nan)
            if mem is None
            else _numbers(mem_path, mem[0], [mem[1][i] for i in mem_idx], np.float64)
        )
        functions.append(
            TraceFunction(key["HashFunction"], row[trig_idx], counts, d[0], d[1:], m[0], m[1:])
        )
    return Trace(functions, len(minute_cols))


def write_azure(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` as the three sample-layout files; :func:`load_azure` reads it back.

    Functions with unknown (NaN) memory get no memory row, which loads back as NaN.
    Names must be unique because the sample layout joins the files on HashFunction.
    """
    names = [f.name for f in trace.functions]
    if len(set(names)) != len(names):
        raise ValueError("write_azure: function names must be unique (files join on them)")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with (root / "invocation.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["HashFunction", "Trigger"] + [str(m) for m in range(1, trace.minutes + 1)])
        for f in trace.functions:
            w.writerow([f.name, f.trigger] + f.per_minute.tolist())
    with (root / "duration.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["HashFunction", "Average", "Count", "Minimum", "Maximum"] + _DUR_COLS[1:])
        for f in trace.functions:
            pct = [repr(float(v)) for v in f.duration_pct_ms]
            w.writerow(
                [f.name, repr(f.duration_avg_ms), int(f.per_minute.sum()), pct[0], pct[-1]] + pct
            )
    with (root / "memory.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["HashFunction", "SampleCount"] + _MEM_COLS)
        for f in trace.functions:
            if not np.isnan(f.memory_avg_mb):
                w.writerow(
                    [f.name, int(f.per_minute.sum()), repr(f.memory_avg_mb)]
                    + [repr(float(v)) for v in f.memory_pct_mb]
                )


def sample_trace() -> Trace:
    """The bundled 10-function, 60-minute Azure sample (for tests and smoke runs)."""
    return load_azure(Path(__file__).parent / "data" / "azure2019-sample")


# ---------------------------------------------------------------------------- generator

_PATTERNS = ("timer", "poisson", "bursty", "diurnal", "sparse")
_PATTERN_P = (0.33, 0.20, 0.15, 0.12, 0.20)
_OTHER_TRIGGERS = ("http", "queue", "event", "orchestration", "storage", "others")
_OTHER_P = (0.50, 0.15, 0.12, 0.08, 0.07, 0.08)  # http ~ 0.67 * 0.5 ~ 1/3 of all functions
_TIMER_PERIODS = np.array([1, 1, 2, 5, 5, 10, 15, 30, 60])  # minutes between firings
_TIMER_FIRES = np.array([1] * 12 + [2, 4, 6, 12, 60])  # invocations per firing (sub-minute)
# Normal quantiles at the percentile points (0/100, infinite for a normal, clipped).
_Z_DUR = np.array([-3.0, -2.326, -0.674, 0.0, 0.674, 2.326, 3.2])
_Z_MEM = np.array([-2.326, -1.645, -0.674, 0.0, 0.674, 1.645, 2.326, 3.0])


MAX_DURATION_MS = 600_000.0
"""Longest generated duration (10 minutes, Azure Functions' maximum timeout)."""
MAX_CONCURRENCY = 8.0
"""Cap on one generated function's expected concurrency (rate x mean duration): without it the
independent heavy tails of popularity and duration now and then draw a single function that
needs more than a whole 20-invoker cluster, and every other invocation queues behind it."""


def generate(
    n_functions: int, minutes: int, seed: int, mean_rate_per_min: float | None = None
) -> Trace:
    """Synthesise an Azure-like trace, reproducible from ``seed``.

    Patterns: periodic timers (every k minutes, exactly periodic), Poisson-steady, bursty
    (on/off Markov-modulated Poisson), diurnal (slow sinusoid over a day) and sparse (a handful
    per hour). Non-timer rates are lognormal (sigma 2.2), giving the heavy-tailed popularity of
    the real trace. Durations: lognormal medians around 1 s (ms to minutes) with per-function
    right-skewed curves; memory: medians around 150 MB. ``mean_rate_per_min`` rescales the
    expected total invocations per minute (rates and timer loads are drawn first, so the trace
    shape does not depend on it); by default 1,000 functions x 60 min gives ~1e5 invocations.
    """
    rng = np.random.default_rng(seed)
    n, t = n_functions, np.arange(minutes)
    pattern = rng.choice(len(_PATTERNS), size=n, p=_PATTERN_P)
    other = rng.choice(_OTHER_TRIGGERS, size=n, p=_OTHER_P)
    rate = np.exp(rng.normal(np.log(0.3), 2.2, n))  # mean ~ 3.4 per minute
    rate[pattern == 4] = rng.uniform(1, 10, n)[pattern == 4] / 60.0  # sparse: 1-10 per hour
    period = rng.choice(_TIMER_PERIODS, size=n)
    fires = rng.choice(_TIMER_FIRES, size=n)
    offset = rng.integers(0, 10**6, size=n) % period
    timer_rate = fires / period
    rate[pattern == 0] = timer_rate[pattern == 0]
    scale = 1.0
    if mean_rate_per_min is not None and n > 0:
        scale = mean_rate_per_min / rate.sum()

    functions = []
    for i in range(n):
        p, r = _PATTERNS[pattern[i]], rate[i] * scale
        if p == "timer":
            k, c = int(period[i]), fires[i] * scale
            if c < 1:  # too few invocations per firing: fire less often instead
                k, c = max(1, int(round(k / c))), 1
            counts = np.where((t - offset[i] % k) % k == 0, int(round(c)), 0)
        elif p == "bursty":
            on_frac = rng.uniform(0.1, 0.4)
            mean_on = rng.uniform(1, 8)
            mean_off = mean_on * (1 - on_frac) / on_frac
            phase = (np.arange(2 * minutes + 2) + rng.integers(2)) % 2  # start on or off
            runs = rng.geometric(1 / np.where(phase == 1, mean_on, mean_off))
            state = np.repeat(phase, runs)[:minutes]
            counts = rng.poisson(r / on_frac * state)
        elif p == "diurnal":
            amp, ph = rng.uniform(0.3, 0.9), rng.uniform(0, 2 * np.pi)
            counts = rng.poisson(r * (1 + amp * np.sin(2 * np.pi * t / 1440 + ph)))
        else:  # poisson, sparse
            counts = rng.poisson(np.full(minutes, r))
        trigger = "timer" if p == "timer" else str(other[i])

        # Popular functions are short (as in the Azure 2019 trace): the median duration falls
        # with the function's rate.
        tilt = -0.35 * (np.log(max(rate[i], 1e-6)) - np.log(0.3))
        med = np.clip(np.exp(rng.normal(np.log(1000.0) + tilt, 1.4)), 5.0, 120_000.0)
        spread = rng.uniform(0.1, 0.9)
        z = _Z_DUR.copy()
        z[5:] += rng.pareto(2.0, 2).cumsum()  # fatter right tail than lognormal
        # A heavy Pareto tail can overflow exp(); no invocation outlives the platform's timeout.
        dur = np.maximum.accumulate(
            np.minimum(med * np.exp(np.minimum(spread * z, 30.0)), MAX_DURATION_MS)
        )
        dur_avg = float(((dur[1:] + dur[:-1]) * np.diff(DURATION_PCTS)).sum() / 200.0)
        concurrency = r / 60.0 * dur_avg / 1000.0
        if concurrency > MAX_CONCURRENCY:  # one function alone would need a whole cluster
            dur, dur_avg = (
                dur * (MAX_CONCURRENCY / concurrency),
                dur_avg * (MAX_CONCURRENCY / concurrency),
            )

        mmed = np.clip(np.exp(rng.normal(np.log(150.0), 0.45)), 32.0, 4096.0)
        ms = rng.uniform(0.01, 0.25)
        mem = mmed * np.exp(ms * _Z_MEM)
        functions.append(
            TraceFunction(
                f"fn{i:05d}", trigger, counts, dur_avg, dur, float(mmed * np.exp(ms * ms / 2)), mem
            )
        )
    return Trace(functions, minutes)
