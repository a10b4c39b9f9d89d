"""Read and write container cgroups (v1 and v2) behind one small typed interface.

This is the only module of the daemon that touches cgroupfs. Why it looks the way it does:

* The sidecar samples every container every 100 ms, so the files of ``read_usage`` stay open and
  are re-read with ``pread(fd, 4096, 0)``: cgroupfs regenerates a file's content on every read at
  offset 0, and this saves an open/close pair per file per tick. That costs ~5 fds per container
  (raise RLIMIT_NOFILE, systemd ``LimitNOFILE=``, for hundreds of containers). Limits and pid
  lists are read rarely, with a fresh open each time.
* The per-tick read is the budget's hot path (1% of a core for 100 containers at 10 Hz): paths
  are joined once, the two numbers read every tick (CPU and memory usage) are parsed with a bare
  ``int()`` of the bytes, key/value files with one ``split()``; ``read_usage(oom=, slow=,
  throttling=)`` lets the caller skip the slowly-changing files (and on v1 the CFS throttling
  counters, a file of their own, unless a harvested quota is watched), and on v1 ``oom_eventfd``
  has the kernel signal an OOM instead of the counter being polled. Anything unusual falls back
  to the careful parser, which names the file and the problem.
* A container can exit at any moment. Every OS error meaning "the cgroup is gone" (ENOENT of the
  directory, ENODEV on a kept fd whose cgroup was removed, ESRCH) becomes ``CgroupGone`` so the
  caller can forget the container instead of crashing; any other failure is ``CgroupIOError``.
  Both name the file.
* Memory is the resource that kills: ``write_limits`` refuses a hard limit below current usage plus
  the caller's headroom, raises memory before anything else and lowers it last.
* Limits use one v2-shaped vocabulary (cores, weight 1..10000, bytes, None = unlimited); v1 values
  are converted here and nowhere else.
"""

from __future__ import annotations

import abc
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Self

DEFAULT_ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("cpu", "cpuacct", "memory")
_V1_UNLIMITED = 2**62  # v1 reports "no limit" as PAGE_COUNTER_MAX pages, ~2**63 bytes
_MIN_QUOTA_US = 1000  # kernel minimum for cfs_quota_us and the quota of cpu.max
_Plan = list[tuple[str, str]]  # (file, value) writes, in order
_pread, _monotonic = os.pread, time.monotonic  # bound once: the per-tick path calls them 200x


class Usage(NamedTuple):
    """One sample of one container; counters are cumulative, the caller differentiates.

    Immutable; a NamedTuple rather than a frozen dataclass because one is built per container per
    tick and a tuple costs a third as much to build."""

    t_s: float  # time.monotonic() when read
    cpu_usage_s: float  # cumulative CPU seconds
    nr_throttled: int
    throttled_s: float
    mem_bytes: int  # v1 usage_in_bytes / v2 memory.current (both include page cache)
    mem_peak_bytes: int  # max usage since the last reset_peak(); -1 if the kernel has no peak
    oom_kills: int  # cumulative
    mem_pressure_some_avg10: float | None  # v2 PSI only (None on v1 or without PSI)
    nr_periods: int = 0  # CFS periods in which the cgroup ran with a quota (cumulative)
    mem_held: bool = False  # v1 under_oom as last read: a task waits at the limit (mem_oom_hold)


@dataclass(frozen=True, slots=True)
class Limits:
    """What a container may use. The defaults are the kernel's defaults (no limits)."""

    cpu_quota_cores: float | None = None  # None = unlimited
    cpu_period_us: int = 100_000
    cpu_weight: int = 100  # v2 weight 1..10000; see weight_to_shares for v1
    mem_limit_bytes: int | None = None  # hard limit; None = unlimited
    mem_high_bytes: int | None = None  # v2 memory.high (throttles); v1 soft_limit_in_bytes
    mem_oom_hold: bool = False
    """v1 memory.oom_control's oom_kill_disable: a task that outgrows the hard limit waits for
    more memory instead of being OOM-killed (the sidecar sets it only while it holds the limit
    below the user's size and watches the container; ignored on v2, whose memory.high never
    kills)."""


class CgroupError(Exception):
    """Anything this module raises about cgroupfs; ``path`` is the file, ``errno`` the OS error."""

    def __init__(self, message: str, path: str | None = None, err: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = err


class CgroupGone(CgroupError):
    """The cgroup vanished (the container exited): forget it, do not retry."""


class CgroupIOError(CgroupError):
    """A file could not be read, written or parsed while the cgroup still exists."""


def weight_to_shares(weight: int) -> int:
    """v2 cpu.weight -> v1 cpu.shares: ``round(weight * 1024 / 100)``, clamped to 2..262144.

    This is systemd's CPUWeight -> CPUShares mapping: the defaults correspond (100 <-> 1024), and
    weight -> shares -> weight is exact for every weight 1..10000 (a weight step is 10.24 shares).
    """
    return max(2, min(262_144, round(weight * 1024 / 100)))


def shares_to_weight(shares: int) -> int:
    """v1 cpu.shares -> v2 weight: the inverse of weight_to_shares, clamped to 1..10000."""
    return max(1, min(10_000, round(shares * 100 / 1024)))


def _error(exc: OSError, path: str, action: str) -> CgroupError:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    dir_gone = exc.errno == errno.ENOENT and not os.path.isdir(os.path.dirname(path))
    if exc.errno in (errno.ENODEV, errno.ESRCH) or dir_gone:
        return CgroupGone(f"cgroup gone: cannot {action} {path} ({name})", path, exc.errno)
    hint = " (memory limit below current usage?)" if exc.errno == errno.EBUSY else ""
    return CgroupIOError(f"cannot {action} {path}: {name} {exc.strerror}{hint}", path, exc.errno)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _pread_all(fd: int) -> bytes:
    chunks = [os.pread(fd, 4096, 0)]
    while len(chunks[-1]) == 4096:  # rare (long pid lists): keep reading
        chunks.append(os.pread(fd, 4096, 4096 * len(chunks)))
    return b"".join(chunks)


def _read_once(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _pread_all(fd).decode()
        finally:
            os.close(fd)
    except OSError as exc:
        raise _error(exc, path, "read") from None


def _write_file(path: str, value: str) -> None:
    """One open/write/close; O_TRUNC as runc does (a no-op on cgroupfs, needed by file fixtures)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode() + b"\n")
        finally:
            os.close(fd)
    except OSError as exc:
        raise _error(exc, path, f"write {value!r} to") from None


def _int(text: str | bytes, path: str) -> int:
    try:
        return int(text)  # int() skips surrounding whitespace, also of bytes
    except ValueError:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        raise CgroupIOError(f"cannot parse {path}: {text.strip()[:80]!r}", path) from None


def _max_or_int(text: str, path: str) -> int | None:
    return None if text.strip() == "max" else _int(text, path)


def _psi_some_avg10(text: str, path: str) -> float:
    """PSI: "some avg10=0.00 avg60=0.00 avg300=0.00 total=0" (then a "full" line)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "some":
            fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
            try:
                return float(fields["avg10"])
            except (KeyError, ValueError):
                break
    raise CgroupIOError(f"cannot parse {path}: no 'some avg10=' in {text[:80]!r}", path)


def _quota_us(limits: Limits) -> int | None:
    cores = limits.cpu_quota_cores
    return None if cores is None else round(cores * limits.cpu_period_us)


def check_limits(limits: Limits) -> None:
    """Refuse what the kernel would refuse, before any write (a half-applied change is worse)."""
    problems = []
    if not 1000 <= limits.cpu_period_us <= 1_000_000:
        problems.append(f"cpu_period_us {limits.cpu_period_us} outside 1000..1000000")
    if (quota := _quota_us(limits)) is not None and quota < _MIN_QUOTA_US:
        problems.append(f"quota of {quota} us per period is below the kernel's {_MIN_QUOTA_US}")
    if not 1 <= limits.cpu_weight <= 10_000:
        problems.append(f"cpu_weight {limits.cpu_weight} outside 1..10000")
    if any(m is not None and m <= 0 for m in (limits.mem_limit_bytes, limits.mem_high_bytes)):
        problems.append("memory limits must be positive or None")
    if problems:
        raise ValueError(f"invalid {limits}: {'; '.join(problems)}")


class Cgroup(abc.ABC):
    """One container's cgroup. Not thread-safe: one owner (the sampling loop) per instance."""

    version: ClassVar[int]
    _MEM_CURRENT: ClassVar[str]  # file with the current memory usage
    _MEM_FILES: ClassVar[dict[str, str]]  # "limit"/"high" -> file
    _UNLIMITED: ClassVar[str]  # what a memory file takes for "no limit"

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._absent: set[str] = set()  # optional files known not to exist
        self._last: Limits | None = None  # last limits read or written; None = unknown
        self.writes = 0  # successful file writes, for tests and metrics
        # Values of the slowly-changing files as last read; None = read on the next read_usage.
        self._oom: int | None = None
        self._peak_seen: int | None = None
        self._psi: float | None = None

    @property
    @abc.abstractmethod
    def paths(self) -> tuple[str, ...]:
        """The cgroup directories (three on v1, one on v2)."""

    @abc.abstractmethod
    def read_usage(self, oom: bool = True, slow: bool = True, throttling: bool = False) -> Usage:
        """Read the counters. CPU and memory usage are always read; ``oom=False`` reuses the OOM
        counter of the last read and ``slow=False`` the slowly-changing rest: the memory peak
        (raised to the current usage), PSI and, on v1 (where it is a file of its own), the
        throttling counters, unless ``throttling`` (the throttle loop watches this container).
        That saves a pread and a parse per file (the sampler reads them every Nth tick). After
        ``reset_peak`` and on the first read everything is read."""

    @abc.abstractmethod
    def reset_peak(self) -> None:
        """Start a new peak-memory window (the sidecar does this per invocation)."""

    @abc.abstractmethod
    def _p(self, name: str) -> str:
        """Absolute path of a cgroup file by its name."""

    @abc.abstractmethod
    def _read_limits(self) -> Limits: ...

    @abc.abstractmethod
    def _plan_cpu(self, old: Limits, new: Limits) -> _Plan: ...

    def _plan_mem(self, kind: str, value: int | None) -> _Plan:
        return [(self._p(self._MEM_FILES[kind]), self._UNLIMITED if value is None else str(value))]

    def _plan_hold(self, hold: bool) -> _Plan:
        """Writes that set ``Limits.mem_oom_hold`` (none on v2: it has no such switch)."""
        return []

    def read_limits(self) -> Limits:
        """Read the limits from the kernel (someone else may have changed them)."""
        self._last = self._read_limits()
        return self._last

    def write_limits(self, limits: Limits, *, headroom_bytes: int, force: bool = False) -> None:
        """Apply ``limits``, writing only the files whose value differs from the last known limits.

        A hard memory limit below current usage + ``headroom_bytes`` is refused with ValueError
        before anything is written (the kernel would OOM-kill or fail with EBUSY); ``force=True``
        skips that check (tests use it). Raised memory is written first, so a container that also
        gets more CPU never runs faster into its old memory wall; lowered memory is written last.
        If a write fails, the limits are re-read before the next diff.
        """
        check_limits(limits)
        old = self._last if self._last is not None else self.read_limits()
        new_mem, old_mem = limits.mem_limit_bytes, old.mem_limit_bytes
        changed = new_mem != old_mem
        raising = changed and (new_mem is None or (old_mem is not None and new_mem > old_mem))
        lowering = changed and not raising
        if lowering and not force:
            current = self._num(self._MEM_CURRENT)
            if new_mem is not None and new_mem < current + headroom_bytes:
                raise ValueError(
                    f"refusing memory limit {new_mem} B: usage {current} B + headroom "
                    f"{headroom_bytes} B in {self.paths[-1]}"
                )
        hold = limits.mem_oom_hold
        # the hold goes on before the limit comes down, and off only after it went up: a task
        # waiting at the old limit is woken by the raise, not killed by the hold going off
        plan = self._plan_hold(hold) if hold and not old.mem_oom_hold else []
        plan += self._plan_mem("limit", new_mem) if raising else []
        plan += self._plan_cpu(old, limits)
        if limits.mem_high_bytes != old.mem_high_bytes:
            plan += self._plan_mem("high", limits.mem_high_bytes)
        if lowering:
            plan += self._plan_mem("limit", new_mem)
        if old.mem_oom_hold and not hold:
            plan += self._plan_hold(hold)
        try:
            for path, value in plan:
                self._write(path, value)
        except CgroupError:
            self._last = None
            raise
        self._last = limits

    def pids(self) -> list[int]:
        """Processes in the cgroup (the union over the v1 hierarchies)."""
        found: set[int] = set()
        for path in (os.path.join(d, "cgroup.procs") for d in self.paths):
            found.update(_int(word, path) for word in _read_once(path).split())
        return sorted(found)

    def close(self) -> None:
        """Close the kept file descriptors; the object stays usable (they reopen on demand)."""
        for fd in self._fds.values():
            _close_quietly(fd)
        self._fds.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, path: str, value: str) -> None:
        _write_file(path, value)
        self.writes += 1

    def _read(self, path: str, flags: int = os.O_RDONLY) -> str:
        return self._read_bytes(path, flags).decode()

    def _read_bytes(self, path: str, flags: int = os.O_RDONLY) -> bytes:
        """pread through a kept fd; reopen once if the fd was closed under us (EBADF)."""
        for attempt in (1, 2):
            fd = self._fds.get(path)
            try:
                if fd is None:
                    fd = self._fds[path] = os.open(path, flags | os.O_CLOEXEC)
                return _pread_all(fd)
            except OSError as exc:
                self._fds.pop(path, None)
                if exc.errno == errno.EBADF and attempt == 1:
                    continue  # not ours any more: do not close it
                if fd is not None:
                    _close_quietly(fd)
                raise _error(exc, path, "read") from None
        raise AssertionError("unreachable")

    def _raw(self, path: str) -> bytes:
        """The per-tick read: one pread on the kept fd; anything unusual takes _read_bytes."""
        fd = self._fds.get(path)
        if fd is not None:
            try:
                data = os.pread(fd, 4096, 0)
                if len(data) < 4096:
                    return data
            except OSError:
                pass  # _read_bytes re-reads, reopens after EBADF or names the error
        return self._read_bytes(path)

    def _read_optional(self, path: str, flags: int = os.O_RDONLY) -> str | None:
        """Like _read, but None if the file does not exist (older kernel, PSI disabled)."""
        if path in self._absent:
            return None
        try:
            return self._read(path, flags)
        except CgroupIOError as exc:
            if exc.errno not in (errno.ENOENT, errno.EOPNOTSUPP):
                raise
            self._absent.add(path)
            return None

    def _num(self, name: str) -> int:
        path = self._p(name)
        return _int(self._read(path), path)

    def _keyed(self, name: str, *required: str, data: bytes | None = None) -> dict[str, int]:
        """Parse "key value" lines (cpu.stat, memory.events, memory.oom_control)."""
        path = self._p(name)
        text = (self._read_bytes(path) if data is None else data).decode(errors="replace")
        out: dict[str, int] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise CgroupIOError(f"cannot parse {path}: line {line[:80]!r}", path)
            out[parts[0]] = int(parts[1])
        if missing := [key for key in required if key not in out]:
            raise CgroupIOError(f"cannot parse {path}: no {', '.join(missing)}", path)
        return out

    def _keyed_fast(self, path: str, data: bytes, *keys: bytes) -> list[int]:
        """The values of ``keys`` in a "key value" file: one split, no per-line Python."""
        toks = data.split()
        if not len(toks) & 1:
            pairs = dict(zip(toks[::2], toks[1::2]))
            try:
                return [int(pairs[k]) for k in keys]
            except (KeyError, ValueError):
                pass
        name = path.rsplit("/", 1)[-1]  # malformed: the line parser names the problem
        got = self._keyed(name, *(k.decode() for k in keys), data=data)
        return [got[k.decode()] for k in keys]


class CgroupV1(Cgroup):
    """A container in the v1 cpu, cpuacct and memory hierarchies, e.g. ``docker/<id>``."""

    version = 1
    _MEM_CURRENT = "memory.usage_in_bytes"
    _MEM_FILES: ClassVar[dict[str, str]] = {
        "limit": "memory.limit_in_bytes",
        "high": "memory.soft_limit_in_bytes",
    }
    _UNLIMITED = "-1"

    def __init__(self, rel_path: str, root: str = DEFAULT_ROOT) -> None:
        super().__init__()
        self.rel_path = rel_path.strip("/")
        self.root = root
        self._efd: int | None = None  # OOM notification eventfd (oom_eventfd)
        self._held = False  # under_oom as last read
        self._fast: tuple[int, int] | None = None  # kept fds of cpuacct.usage, usage_in_bytes
        self._throttled = (0, 0, 0)  # nr_periods, nr_throttled, throttled_time (ns) as last read
        self._files = tuple(
            self._p(name)
            for name in (
                "cpuacct.usage",
                "cpu.stat",
                "memory.usage_in_bytes",
                "memory.max_usage_in_bytes",
                "memory.oom_control",
            )
        )

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(os.path.join(self.root, c, self.rel_path) for c in V1_CONTROLLERS)

    def _p(self, name: str) -> str:
        """The file's prefix ("cpu", "cpuacct", "memory") names its hierarchy."""
        return os.path.join(self.root, name.split(".", 1)[0], self.rel_path, name)

    def read_usage(self, oom: bool = True, slow: bool = True, throttling: bool = False) -> Usage:
        t = _monotonic()
        fast = self._fast
        if fast is not None:  # the per-tick path: two preads on kept fds, no helper calls
            try:
                cpu_ns, mem = int(_pread(fast[0], 64, 0)), int(_pread(fast[1], 64, 0))
            except (OSError, ValueError):  # a closed fd, the cgroup gone: the careful way
                fast = None
            else:
                if not (oom or slow or throttling) and (peak := self._peak_seen) is not None:
                    periods, nr, ns = self._throttled
                    return Usage(
                        t, cpu_ns / 1e9, nr, ns / 1e9, mem, peak if peak > mem else mem,
                        self._oom, None, periods, self._held,
                    )  # fmt: skip
        raw, (f_cpu, f_stat, f_mem, f_peak, f_oom) = self._raw, self._files
        if fast is None:
            cpu_ns, mem = _int(raw(f_cpu), f_cpu), _int(raw(f_mem), f_mem)
            self._fast = (self._fds[f_cpu], self._fds[f_mem])
        first = self._peak_seen is None
        if slow or first:
            self._peak_seen = max_usage = _int(raw(f_peak), f_peak)
        else:
            max_usage = self._peak_seen if self._peak_seen > mem else mem
        if slow or first or throttling:
            toks = (data := raw(f_stat)).split()  # nr_periods N nr_throttled N throttled_time N
            if len(toks) >= 6 and toks[2] == b"nr_throttled" and toks[4] == b"throttled_time":
                try:
                    self._throttled = int(toks[1]), int(toks[3]), int(toks[5])
                except ValueError:
                    self._throttled = self._v1_stat(f_stat, data)
            else:
                self._throttled = self._v1_stat(f_stat, data)
        if oom or self._oom is None:
            toks = (data := raw(f_oom)).split()  # oom_kill_disable 0 under_oom 0 oom_kill N
            if len(toks) == 6 and toks[4] == b"oom_kill" and toks[5].isdigit():
                self._oom, self._held = int(toks[5]), toks[3] == b"1"
            else:
                self._oom, under = self._keyed_fast(f_oom, data, b"oom_kill", b"under_oom")
                self._held = under == 1
        periods, nr_throttled, throttled_ns = self._throttled
        return Usage(
            t,
            cpu_ns / 1e9,
            nr_throttled,
            throttled_ns / 1e9,
            mem,
            max_usage,
            self._oom,
            None,
            periods,
            self._held,
        )

    def _v1_stat(self, path: str, data: bytes) -> tuple[int, int, int]:
        periods, nr, ns = self._keyed_fast(
            path, data, b"nr_periods", b"nr_throttled", b"throttled_time"
        )
        return periods, nr, ns

    def oom_eventfd(self) -> int | None:
        """An eventfd the kernel signals on every OOM in this cgroup (and on its removal).

        Registered through ``cgroup.event_control`` on ``memory.oom_control`` (the v1 notification
        API), so the sampler learns of an OOM kill with one epoll_wait per tick for all containers
        instead of a read per container. The kernel drops the registration when the eventfd is
        closed (``close``) or the cgroup removed. None where the kernel refuses it.
        """
        if self._efd is not None:
            return self._efd
        f_oom = self._files[4]
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            return None
        try:
            self._read_bytes(f_oom)  # opens (and keeps) the fd the registration names
            control = os.path.join(self.root, "memory", self.rel_path, "cgroup.event_control")
            _write_file(control, f"{efd} {self._fds[f_oom]}")
        except (CgroupError, KeyError):
            os.close(efd)
            return None
        self._efd = efd
        return efd

    def close(self) -> None:
        self._fast = None
        super().close()
        if self._efd is not None:
            _close_quietly(self._efd)
            self._efd = None

    def _read_limits(self) -> Limits:
        def num(name: str) -> int:
            return _int(_read_once(path := self._p(name)), path)

        def mem(name: str) -> int | None:
            value = num(name)
            return None if value >= _V1_UNLIMITED or value < 0 else value

        quota, period = num("cpu.cfs_quota_us"), num("cpu.cfs_period_us")
        return Limits(
            cpu_quota_cores=None if quota < 0 else quota / period,
            cpu_period_us=period,
            cpu_weight=shares_to_weight(num("cpu.shares")),
            mem_limit_bytes=mem("memory.limit_in_bytes"),
            mem_high_bytes=mem("memory.soft_limit_in_bytes"),
            mem_oom_hold=self._keyed("memory.oom_control", "oom_kill_disable")["oom_kill_disable"]
            == 1,
        )

    def _plan_cpu(self, old: Limits, new: Limits) -> _Plan:
        plan: _Plan = []
        if new.cpu_period_us != old.cpu_period_us:
            plan.append((self._p("cpu.cfs_period_us"), str(new.cpu_period_us)))
        if (quota := _quota_us(new)) != _quota_us(old):
            plan.append((self._p("cpu.cfs_quota_us"), str(-1 if quota is None else quota)))
        if new.cpu_weight != old.cpu_weight:
            plan.append((self._p("cpu.shares"), str(weight_to_shares(new.cpu_weight))))
        return plan

    def _plan_mem(self, kind: str, value: int | None) -> _Plan:
        """The memory+swap limit moves with the hard limit, keeping the swap the user was given.

        Docker sets memsw to the limit plus ``--memory-swap``'s extra (twice the limit by
        default). Left alone, a harvested container could swap past its harvested box, and an
        accelerated one (whose memsw must rise first: the kernel wants limit <= memsw, EINVAL
        otherwise) kept the raised memsw after its restore. So memsw = limit + the swap it had:
        raised before the limit, lowered after it; an unlimited memsw stays unlimited.
        """
        plan = super()._plan_mem(kind, value)
        memsw_path = self._p("memory.memsw.limit_in_bytes")
        if kind == "high" or not os.path.exists(memsw_path):
            return plan
        memsw = _int(_read_once(memsw_path), memsw_path)
        if memsw >= _V1_UNLIMITED:
            return plan
        limit_path = self._p("memory.limit_in_bytes")
        limit = _int(_read_once(limit_path), limit_path)  # finite: the kernel keeps it <= memsw
        if value is None:
            return [(memsw_path, "-1"), *plan]
        memsw_plan = [(memsw_path, str(value + memsw - limit))]
        return memsw_plan + plan if value > limit else plan + memsw_plan

    def _plan_hold(self, hold: bool) -> _Plan:
        return [(self._p("memory.oom_control"), "1" if hold else "0")]

    def reset_peak(self) -> None:
        self._peak_seen = None
        self._write(self._p("memory.max_usage_in_bytes"), "0")


class CgroupV2(Cgroup):
    """A container in the unified hierarchy, given its absolute directory."""

    version = 2
    _MEM_CURRENT = "memory.current"
    _MEM_FILES: ClassVar[dict[str, str]] = {"limit": "memory.max", "high": "memory.high"}
    _UNLIMITED = "max"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._files = tuple(
            self._p(n) for n in ("cpu.stat", "memory.current", "memory.events", "memory.pressure")
        )
        self._peak_rw: bool | None = None  # memory.peak opened read-write (kernel >= 6.12)?
        self._sw_base: int | None = None  # kernel peak at a software reset; None = no such reset
        self._sw_peak = 0  # max memory.current seen since a software reset

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name)

    def read_usage(self, oom: bool = True, slow: bool = True, throttling: bool = False) -> Usage:
        t = time.monotonic()
        raw, (f_stat, f_mem, f_events, f_psi) = self._raw, self._files
        toks = (data := raw(f_stat)).split()  # usage and throttling alike: one file on v2
        if not len(toks) & 1 and toks[:1] == [b"usage_usec"] and toks[1].isdigit():
            stat = dict(zip(toks[::2], toks[1::2]))
            try:
                # Without the cpu controller cpu.stat has only usage: nothing was throttled.
                usage_us = int(toks[1])
                periods = int(stat.get(b"nr_periods", 0))
                nr_throttled = int(stat.get(b"nr_throttled", 0))
                throttled_us = int(stat.get(b"throttled_usec", 0))
            except ValueError:
                usage_us, periods, nr_throttled, throttled_us = self._stat_slow(f_stat, data)
        else:
            usage_us, periods, nr_throttled, throttled_us = self._stat_slow(f_stat, data)
        mem = _int(raw(f_mem), f_mem)
        if oom or self._oom is None:
            (self._oom,) = self._keyed_fast(f_events, raw(f_events), b"oom_kill")
        if slow or self._peak_seen is None:
            self._peak_seen = mem_peak = self._peak(mem)
            psi = self._read_optional(f_psi)
            self._psi = None if psi is None else _psi_some_avg10(psi, f_psi)
        else:
            if self._sw_base is not None:
                self._sw_peak = max(self._sw_peak, mem)
            mem_peak = -1 if self._peak_seen < 0 else max(self._peak_seen, mem)
        return Usage(
            t,
            usage_us / 1e6,
            nr_throttled,
            throttled_us / 1e6,
            mem,
            mem_peak,
            self._oom,
            self._psi,
            periods,
        )

    def _stat_slow(self, path: str, data: bytes) -> tuple[int, int, int, int]:
        stat = self._keyed("cpu.stat", "usage_usec", data=data)
        return (
            stat["usage_usec"],
            stat.get("nr_periods", 0),
            stat.get("nr_throttled", 0),
            stat.get("throttled_usec", 0),
        )

    def _peak_text(self) -> str | None:
        """memory.peak, kept open read-write when the kernel allows it.

        Since Linux 6.12 a write to memory.peak resets the peak *for reads through the same open
        file*, so the reset must go through the fd we read with; older kernels refuse O_RDWR.
        """
        path = self._p("memory.peak")
        if self._peak_rw is None:
            try:
                self._fds[path] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                self._peak_rw = True
            except OSError:
                self._peak_rw = False  # read-only or absent: _read_optional tells which
        return self._read_optional(path, os.O_RDWR if self._peak_rw else os.O_RDONLY)

    def _peak(self, current: int) -> int:
        if (text := self._peak_text()) is None:
            return -1
        kernel = _int(text, self._p("memory.peak"))
        if self._sw_base is None:
            return kernel
        self._sw_peak = max(self._sw_peak, current)
        # A kernel peak above its value at the reset was reached after the reset: it is exact.
        return kernel if kernel > self._sw_base else self._sw_peak

    def reset_peak(self) -> None:
        """Reset memory.peak; where it is read-only (kernels < 6.12) track the peak in software.

        The software peak is the max of memory.current over samples since the reset (a lower bound
        between samples) unless the kernel's all-time peak has moved past its value at the reset.
        """
        path = self._p("memory.peak")
        self._peak_seen = None
        if (text := self._peak_text()) is None:
            return  # no kernel peak at all: Usage.mem_peak_bytes stays -1
        if self._peak_rw and (fd := self._fds.get(path)) is not None:
            try:
                os.pwrite(fd, b"reset\n", 0)
                self.writes += 1
                self._sw_base = None
                return
            except OSError as exc:
                if exc.errno in (errno.ENODEV, errno.ESRCH, errno.ENOENT):
                    raise _error(exc, path, "reset") from None
                self._peak_rw = False
        self._sw_base = _int(text, path)
        self._sw_peak = self._num("memory.current")

    def _read_limits(self) -> Limits:
        text = _read_once(path := self._p("cpu.max"))
        if len(parts := text.split()) != 2:
            raise CgroupIOError(f"cannot parse {path}: {text.strip()[:80]!r}", path)
        quota, period = _max_or_int(parts[0], path), _int(parts[1], path)

        def read(name: str) -> int | None:
            return _max_or_int(_read_once(p := self._p(name)), p)

        return Limits(
            cpu_quota_cores=None if quota is None else quota / period,
            cpu_period_us=period,
            cpu_weight=_int(_read_once(p := self._p("cpu.weight")), p),
            mem_limit_bytes=read("memory.max"),
            mem_high_bytes=read("memory.high"),
        )

    def _plan_cpu(self, old: Limits, new: Limits) -> _Plan:
        plan: _Plan = []
        quota = _quota_us(new)
        if quota != _quota_us(old) or new.cpu_period_us != old.cpu_period_us:
            max_value = f"{'max' if quota is None else quota} {new.cpu_period_us}"
            plan.append((self._p("cpu.max"), max_value))
        if new.cpu_weight != old.cpu_weight:
            plan.append((self._p("cpu.weight"), str(new.cpu_weight)))
        return plan


def v2_base(root: str) -> str | None:
    """The unified mount that holds cpu and memory: root (pure v2) or root/unified (hybrid);
    None on a v1 host. Runtimes and the local invoker place v2 cgroup paths under it."""
    for base in (root, os.path.join(root, "unified")):
        try:
            with open(os.path.join(base, "cgroup.controllers")) as fh:
                if {"cpu", "memory"} <= set(fh.read().split()):
                    return base
        except OSError:
            continue
    return None


def detect_version(root: str = DEFAULT_ROOT) -> int:
    """2 if cpu and memory are in the unified hierarchy; 1 if they are v1 hierarchies (also in the
    hybrid layout, where v2 is mounted at root/unified without them)."""
    if v2_base(root) is not None:
        return 2
    if all(os.path.exists(os.path.join(root, c, "cgroup.procs")) for c in ("cpu", "memory")):
        return 1
    raise CgroupError(f"no cpu and memory cgroup controllers under {root}", root)


def open_cgroup(rel_path: str, root: str = DEFAULT_ROOT, version: int | None = None) -> Cgroup:
    """Open a container's cgroup by its path relative to the hierarchy (e.g. ``docker/<id>``)."""
    if (version or detect_version(root)) == 1:
        return CgroupV1(rel_path, root)
    return CgroupV2(os.path.join(v2_base(root) or root, rel_path.strip("/")))


def join_in_child(cg: Cgroup) -> Callable[[], None]:
    """A ``preexec_fn`` that moves the child into ``cg`` between fork and exec, so none of the
    program's work runs outside it (the paths are computed here: only writes in the child)."""
    files = [os.path.join(d, "cgroup.procs") for d in cg.paths]

    def join() -> None:
        pid = str(os.getpid()).encode()
        for path in files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return join


def create_v1(rel_path: str, root: str = DEFAULT_ROOT) -> CgroupV1:
    """Create the cgroup in the cpu, cpuacct and memory hierarchies (tests, the local invoker)."""
    for controller in V1_CONTROLLERS:
        path = os.path.join(root, controller, rel_path.strip("/"))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise CgroupIOError(f"cannot create {path}: {exc.strerror}", path, exc.errno) from None
    return CgroupV1(rel_path, root)


def remove_v1(rel_path: str, root: str = DEFAULT_ROOT, timeout_s: float = 2.0) -> None:
    """Remove the cgroup from the three hierarchies; idempotent (see ``_remove_dir``)."""
    for controller in V1_CONTROLLERS:
        _remove_dir(os.path.join(root, controller, rel_path.strip("/")), timeout_s)


def _v2_base_or_raise(root: str) -> str:
    base = v2_base(root)
    if base is None:
        raise CgroupError(f"no unified (v2) hierarchy with cpu and memory under {root}", root)
    return base


def create_v2(rel_path: str, root: str = DEFAULT_ROOT) -> CgroupV2:
    """Create the cgroup under the unified mount, with cpu and memory enabled down to it.

    v2 gives a cgroup a controller's files only if its parent lists the controller in
    ``cgroup.subtree_control``, so ``+cpu +memory`` is written there at every level from the mount
    down to the new cgroup's parent (a no-op where already enabled). The leaf's own
    subtree_control is left alone: processes live in it, and v2 forbids a cgroup with processes
    from enabling controllers for children ("no internal processes").
    """
    base = _v2_base_or_raise(root)
    parts = [p for p in rel_path.strip("/").split("/") if p]
    path = base
    for part in parts:
        _write_file(os.path.join(path, "cgroup.subtree_control"), "+cpu +memory")
        path = os.path.join(path, part)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise CgroupIOError(f"cannot create {path}: {exc.strerror}", path, exc.errno) from None
    return CgroupV2(path)


def remove_v2(rel_path: str, root: str = DEFAULT_ROOT, timeout_s: float = 2.0) -> None:
    """Remove the cgroup from the unified hierarchy; idempotent (see ``_remove_dir``)."""
    _remove_dir(os.path.join(_v2_base_or_raise(root), rel_path.strip("/")), timeout_s)


def create(rel_path: str, root: str = DEFAULT_ROOT, version: int | None = None) -> Cgroup:
    """Create a cgroup in the host's hierarchy (``version`` None: detected)."""
    if (version or detect_version(root)) == 1:
        return create_v1(rel_path, root)
    return create_v2(rel_path, root)


def remove(
    rel_path: str, root: str = DEFAULT_ROOT, version: int | None = None, timeout_s: float = 2.0
) -> None:
    """Remove a cgroup made by ``create`` (``version`` None: detected); idempotent."""
    if (version or detect_version(root)) == 1:
        remove_v1(rel_path, root, timeout_s)
    else:
        remove_v2(rel_path, root, timeout_s)


def _remove_dir(path: str, timeout_s: float) -> None:
    """rmdir one cgroup directory, moving its processes to the parent first; idempotent.

    A cgroup with processes cannot be removed (v1 and v2), so they are moved to the parent's
    cgroup.procs first; exiting processes can linger for a moment, hence the retries on EBUSY
    until ``timeout_s``.
    """
    parent_procs = os.path.join(os.path.dirname(path), "cgroup.procs")
    deadline = time.monotonic() + timeout_s
    while os.path.isdir(path):
        try:
            for pid in _read_once(os.path.join(path, "cgroup.procs")).split():
                try:
                    _write_file(parent_procs, pid)
                except CgroupError:
                    pass  # exited meanwhile (ESRCH); rmdir tells whether it matters
            os.rmdir(path)
        except (FileNotFoundError, CgroupGone):
            break
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupIOError(
                    f"cannot remove {path}: {exc.strerror}", path, exc.errno
                ) from None
            time.sleep(0.01)
