"""The safeguard: the rules that keep a learned policy from slowing functions down.

Applied per resource before the policy chooses, exactly as the reference (Freyr) describes, with
threshold 0.9:

* first invocation of a function, or the one after a failure: run at the user's size (a
  "safeguard invocation"), measure, and calibrate the baseline duration;
* over-provisioned (last peak <= 0.9 x user setting):
    - last peak >= 0.9 x what it was last given: usage may be rising, pin the resource at the
      user's setting (a safeguard run for that resource, which resets its recent peak);
    - otherwise harvest: choose within [recent peak + 1 unit, user setting];
* under-provisioned (last peak > 0.9 x user setting): accelerate within
  [recent peak + 1 unit, per-function max]; with ``decline_when_queued``, while invocations
  wait for admission, within [min(that, user setting), per-function max].

For memory the "+ 1 unit" is ``mem_margin_units`` (default a quarter; the reference's is 1): the
box reaches toward the peak itself, until the function is OOM-killed once: from then on it keeps
the reference's unit, which is what covers a remembered spike that has decayed (below). With
``mem_harvest_after`` = N memory is harvested only once a function has run N invocations, so a
spike within its first N calls runs at the user's size and is remembered before any harvest;
with ``mem_margin_sd`` the margin is at least that many standard deviations of the function's
peaks, so a function whose working set varies gets room in proportion.

"Recent peak" is the maximum peak since that resource's last safeguard run. On top of the
reference we add the memory floor: a hard memory limit is never chosen below the container's
current usage plus a headroom, because the kernel would OOM-kill it on the spot. The floor wins
over every other rule, the user's size included: safety first.

Three more floors keep what the reference forgets, each a decayed maximum (``remember``: the
old value shrinks by ``DECAY`` per invocation of the function, half-life ``HALF_LIFE``
invocations, then the new observation raises it), which is O(1) per update and forgets a
function's old behaviour gradually, as Kubernetes' VPA does with its decaying peak histogram:

* **Memory peaks nobody announces.** A function may allocate several times its usual memory
  in some calls without a larger input (measured: a compression function's every 20th call,
  ~8x). Freyr's recent peak forgets such a spike as soon as a RISING pin resets it, and the
  next harvested spike is OOM-killed. The harvest floor is therefore the larger of the recent
  peak and the remembered peak (``mem_peak_memory_mb``). A failed run needed more than it was
  given and at most the user's size (which it would have had), so the remembered peak jumps
  to the user's size: an OOM-killed run's measured peak is only its limit, and remembering
  that would let the next spike be killed again, one unit higher each time. With a
  100-invocation half-life a spike every k-th call is remembered at >= 2^(-k/100) of its size
  (0.87 at k = 20): the reference's one unit of margin above it covers the rest for spikes up
  to ~7 units, the default quarter for spikes up to ~2; beyond, the give-back (and on v1 the OOM
  hold) catches what the decay lost.
* **Short bursts are left alone.** A CFS quota is a budget per period: CPU work that fits one
  period's quota runs at full speed, work beyond it waits for the next period (measured: a
  2-thread BLAS burst takes 13 / 49 / 105 ms at 1 / 0.5 / 0.25 core). An invocation shorter
  than one period, or a multi-threaded burst whose rate the 100 ms samples under-read, loses a
  whole period when harvested below its CPU work per period, and gains nothing from being
  harvested. ``burst_cores`` remembers each invocation's CPU work per period over the period,
  ``cpu_s / max(period, duration)`` cores, and CPU is never harvested below it (capped at the
  user's size: the rule harvests less, it never accelerates).
* **The input floor**, where the invoker reports each invocation's input size: a function's
  memory often grows with its input, and a harvested limit sized by the last peak OOM-kills
  the next, larger input faster than any 100 ms give-back can react (measured: a 250 MB
  allocation in ~100 ms). The safeguard remembers the largest memory growth (peak minus the
  usage at start) and the largest input, and never harvests below the current usage plus that
  growth, scaled up by how much larger this input is than the largest, plus the headroom
  (capped at the user's size: beyond it the user's own setting would fail too). For a growth
  a + b x with a >= 0 this is a bound that does not blow up for a function with a fixed part
  a, as a growth per input unit would for its smallest inputs (docs/duration-model.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from sidecar.core.grid import Alloc, ResourceGrid

FIRST = "first"
FAILURE = "failure"
RISING = "rising"
HARVEST = "harvest"
ACCELERATE = "accelerate"
MODES = (FIRST, FAILURE, RISING, HARVEST, ACCELERATE)
"""Why a resource got its range; a bounded set, so it is safe as a metric label."""
HALF_LIFE = 100.0
"""Invocations of a function over which a remembered peak, burst or input growth halves."""
DECAY = 0.5 ** (1.0 / HALF_LIFE)
CFS_PERIOD_S = 0.1
"""The kernel's default CFS period (``cpu.cfs_period_us`` 100000): the burst rule's period when
the caller does not name its own."""


def remember(memory: float, value: float) -> float:
    """A decayed maximum: ``memory`` shrunk by one invocation's ``DECAY``, raised to ``value``."""
    memory *= DECAY
    return value if value > memory else memory


def burst_cores(cpu_s: float, duration_s: float, period_s: float) -> float:
    """Cores a CFS quota must give an invocation for its CPU work in one period to fit it: all of
    its work when it ran within one period, its work per period otherwise."""
    return cpu_s / (duration_s if duration_s > period_s else period_s)


@dataclass(frozen=True)
class SafeguardConfig:
    threshold: float = 0.9
    """Peak/allocation ratio that marks a resource as nearly used up (the reference's 0.9)."""
    mem_headroom_mb: float = 16.0
    """Memory floor = current usage + this headroom."""
    give_back_threshold: float = 0.9
    """Within an invocation, usage at this share of a harvested allocation returns the user's
    size."""
    mem_margin_units: float = 0.25
    """Memory's lower bound is the remembered peak plus this many grid units, for a function that
    has never failed (after a failed run, the reference's 1). A quarter, not the reference's 1:
    under the v1 OOM hold (or v2's ``memory.high``) a working set that outgrows the margin waits
    for the give-back instead of being killed, and the quarter unit held a quarter less memory
    on real functions at no speed cost measured (docs/learning.md, "A quarter-unit margin by
    default"). A node on the hard limit takes 1 unless its config sets it
    (``sidecar.config.HARD_MEM_MARGIN_UNITS``)."""
    mem_margin_sd: float = 0.0
    """Memory's margin is at least this many standard deviations of the function's successful
    peaks (a decayed mean and variance, ``SafeguardState.mem_peak_sd``); 0: off. A function whose
    working set varies gets room in proportion, a steady one keeps ``mem_margin_units``
    (docs/learning.md, "A margin from the function's own spread")."""
    mem_harvest_after: int = 0
    """Memory is harvested only once the function has run this many invocations (0: from its
    second, the reference's). A spike every k-th call first shows within a function's first k
    calls, and only a run at the user's size survives it; once seen, the remembered peak keeps it
    (docs/learning.md, "Seeing a spike before harvesting")."""
    decline_when_queued: bool = False
    """Under accelerate, also allow the user's size while invocations wait for admission (the
    caller's ``pending`` > 0): an acceleration holds cores and memory a queued invocation could
    start with. Pays in the simulator, where ``pending`` is the admission queue (a busy seed's
    p98 response time halves); off by default because a node's hook reports the invoker's
    backlog, which on the local invoker is the function's own, where an acceleration is what
    drains it (docs/learning.md, "Declining an acceleration while invocations wait")."""


@dataclass
class SafeguardState:
    """What the safeguard remembers about one function (peaks in cores and MB)."""

    calibrate: str | None = FIRST
    """FIRST or FAILURE while the next invocation must run at the user's size; None otherwise."""
    last_alloc: Alloc | None = None
    last_cpu_peak_cores: float = 0.0
    last_mem_peak_mb: float = 0.0
    recent_cpu_peak_cores: float = 0.0
    recent_mem_peak_mb: float = 0.0
    failures: int = 0
    mem_peak_memory_mb: float = 0.0
    """Remembered memory peak (decayed maximum, ``remember``), MB."""
    burst_cores: float = 0.0
    """Remembered CPU work per CFS period over the period (decayed maximum), cores."""
    input_growth_mb: float = 0.0
    """Remembered memory growth within an invocation (decayed maximum of peak minus the usage at
    start) of the invocations that reported an input, MB; 0 until inputs are reported."""
    input_max: float = 0.0
    """Remembered input size (decayed maximum) of those invocations."""
    runs: int = 0
    """Invocations observed, failed ones included (``SafeguardConfig.mem_harvest_after``)."""
    mem_peak_w: float = 0.0
    mem_peak_sum: float = 0.0
    mem_peak_sq: float = 0.0
    """Decayed weight, sum and sum of squares of the successful runs' memory peaks (MB): their
    decayed mean and variance, exact from the first run (``mem_peak_sd``)."""

    @property
    def mem_peak_sd(self) -> float:
        """Standard deviation of the successful runs' memory peaks, decayed as ``remember``."""
        if self.mem_peak_w <= 0.0:
            return 0.0
        mean = self.mem_peak_sum / self.mem_peak_w
        var = self.mem_peak_sq / self.mem_peak_w - mean * mean
        return math.sqrt(var) if var > 0.0 else 0.0

    def observe(
        self,
        guard: Guard,
        alloc: Alloc,
        cpu_peak_cores: float,
        mem_peak_mb: float,
        failed: bool,
        input_size: float | None = None,
        mem_start_mb: float = 0.0,
        cpu_s: float = 0.0,
        duration_s: float = 0.0,
        period_s: float = CFS_PERIOD_S,
        user_mem_mb: float = 0.0,
    ) -> None:
        """Record the end of an invocation that was decided under ``guard`` and ran at ``alloc``.

        ``input_size`` and the usage at its start (when known) feed the input floor; its CPU
        work ``cpu_s`` (core-seconds) and ``duration_s`` under a CFS period ``period_s`` the
        burst rule; a failed run's memory need is remembered as the user's ``user_mem_mb``. An
        OOM-killed run's peak counts for the input growth: it is a lower bound of its need."""
        self.runs += 1
        need = mem_peak_mb if not failed or mem_peak_mb > user_mem_mb else user_mem_mb
        self.mem_peak_memory_mb = remember(self.mem_peak_memory_mb, need)
        if input_size is not None and input_size > 0.0:
            growth = mem_peak_mb - mem_start_mb
            self.input_growth_mb = remember(self.input_growth_mb, growth if growth > 0.0 else 0.0)
            self.input_max = remember(self.input_max, input_size)
        if failed:
            self.failures += 1
            self.calibrate = FAILURE
            return
        self.mem_peak_w = self.mem_peak_w * DECAY + 1.0
        self.mem_peak_sum = self.mem_peak_sum * DECAY + mem_peak_mb
        self.mem_peak_sq = self.mem_peak_sq * DECAY + mem_peak_mb * mem_peak_mb
        if guard.cpu_mode in (FIRST, FAILURE, RISING):
            self.recent_cpu_peak_cores = cpu_peak_cores
        else:
            self.recent_cpu_peak_cores = max(self.recent_cpu_peak_cores, cpu_peak_cores)
        if guard.mem_mode in (FIRST, FAILURE, RISING):
            self.recent_mem_peak_mb = mem_peak_mb
        else:
            self.recent_mem_peak_mb = max(self.recent_mem_peak_mb, mem_peak_mb)
        self.burst_cores = remember(self.burst_cores, burst_cores(cpu_s, duration_s, period_s))
        self.last_alloc = alloc
        self.last_cpu_peak_cores = cpu_peak_cores
        self.last_mem_peak_mb = mem_peak_mb
        if guard.calibrating:
            self.calibrate = None


class Guard(NamedTuple):
    """The safeguard's verdict for one invocation: allowed ranges (units) and the action mask.

    A NamedTuple, not a dataclass: one is built per decision on the simulator's hot path.
    """

    cpu_lo: int
    cpu_hi: int
    mem_lo: int
    mem_hi: int
    cpu_mode: str
    mem_mode: str
    mask: np.ndarray

    @property
    def calibrating(self) -> bool:
        """A first or after-failure run: both resources pinned at the user's size."""
        return self.cpu_mode in (FIRST, FAILURE)

    def sets_baseline(self, alloc: Alloc, user: Alloc, failed: bool) -> bool:
        """Whether a run decided under this guard measures the function at the user's size (its
        statistics' baseline): it succeeded at the user's size, or it calibrated with memory the
        floor lifted above it (the user's memory would not hold the idle usage, so no run can
        come closer, and without it the function would never get a baseline)."""
        if failed or alloc.cpu != user.cpu:
            return False
        return alloc.mem == user.mem or (self.calibrating and alloc.mem > user.mem)

    @property
    def reason(self) -> str:
        return f"cpu={self.cpu_mode},mem={self.mem_mode}"

    def allows(self, alloc: Alloc) -> bool:
        return self.cpu_lo <= alloc.cpu <= self.cpu_hi and self.mem_lo <= alloc.mem <= self.mem_hi


def _range(
    user: int,
    last_peak: float,
    last_alloc: int,
    recent_peak: float,
    unit: float,
    margin: float,
    top: int,
    thr: float,
    queued: bool,
) -> tuple[int, int, str]:
    """One resource's allowed range in units (peaks and unit in physical quantities); ``margin``:
    units above the recent peak; ``queued``: an acceleration may be declined
    (``SafeguardConfig.decline_when_queued``)."""
    user_q = user * unit
    lo = min(top, max(1, math.ceil(recent_peak / unit + margin - 1e-9)))
    if last_peak <= thr * user_q:
        if last_peak >= thr * last_alloc * unit:
            return user, user, RISING
        return min(lo, user), user, HARVEST
    return (min(lo, user) if queued else lo), top, ACCELERATE


def _mem_margin(cfg: SafeguardConfig, state: SafeguardState, unit_mb: float) -> float:
    """Memory's margin above the peak, in units: ``mem_margin_units`` for a function never
    OOM-killed (one unit after a kill), raised to ``mem_margin_sd`` deviations of its peaks."""
    margin = cfg.mem_margin_units if state.failures == 0 else 1.0
    if cfg.mem_margin_sd > 0.0:
        spread = cfg.mem_margin_sd * state.mem_peak_sd / unit_mb
        if spread > margin:
            margin = spread
    return margin


def guard(
    grid: ResourceGrid,
    user: Alloc,
    state: SafeguardState,
    mem_usage_mb: float = 0.0,
    cfg: SafeguardConfig = SafeguardConfig(),
    input_size: float | None = None,
    pending: int = 0,
) -> Guard:
    """Allowed (cpu, mem) ranges and the mask over the grid's candidates for the next invocation.

    ``mem_usage_mb`` is the container's current memory usage (0 for a new container);
    ``input_size`` the invocation's input, when the invoker reports it (the input floor);
    ``pending`` the invocations waiting for admission, when the caller knows them.
    """
    queued = cfg.decline_when_queued and pending > 0
    mem_peak = state.recent_mem_peak_mb
    if state.mem_peak_memory_mb > mem_peak:
        mem_peak = state.mem_peak_memory_mb
    if state.calibrate is not None or state.last_alloc is None:
        mode = state.calibrate or FIRST
        cpu_lo = cpu_hi = user.cpu
        mem_lo = mem_hi = user.mem
        cpu_mode = mem_mode = mode
    else:
        cpu_lo, cpu_hi, cpu_mode = _range(
            user.cpu,
            state.last_cpu_peak_cores,
            state.last_alloc.cpu,
            state.recent_cpu_peak_cores,
            grid.cpu_unit_cores,
            1.0,
            grid.cpu_units,
            cfg.threshold,
            queued,
        )
        mem_lo, mem_hi, mem_mode = _range(
            user.mem,
            state.last_mem_peak_mb,
            state.last_alloc.mem,
            mem_peak,
            grid.mem_unit_mb,
            _mem_margin(cfg, state, grid.mem_unit_mb),
            grid.mem_units,
            cfg.threshold,
            queued,
        )
        if mem_mode == HARVEST and state.runs < cfg.mem_harvest_after:
            mem_lo = user.mem
    if state.burst_cores > (cpu_lo - 1) * grid.cpu_unit_cores:  # may need more units
        burst = min(user.cpu, grid.cpu_units_ceil(state.burst_cores))
        if burst > cpu_lo:
            cpu_lo = burst
            cpu_hi = max(cpu_hi, burst)
    if input_size is not None and state.input_growth_mb > 0.0:
        growth = state.input_growth_mb
        if input_size > state.input_max:
            growth *= input_size / state.input_max
        need_mb = mem_usage_mb + growth + cfg.mem_headroom_mb
        need = min(user.mem, grid.mem_units_ceil(need_mb))
        if need > mem_lo:
            mem_lo = need
            mem_hi = max(mem_hi, need)
    floor = min(grid.mem_units, grid.mem_units_ceil(mem_usage_mb + cfg.mem_headroom_mb))
    if floor > mem_lo:
        mem_lo = floor
        mem_hi = max(mem_hi, floor)
    mask = grid.range_mask(cpu_lo, cpu_hi, mem_lo, mem_hi)
    return Guard(cpu_lo, cpu_hi, mem_lo, mem_hi, cpu_mode, mem_mode, mask)


def give_back_needed(usage: float, allocated: float, user: float, cfg: SafeguardConfig) -> bool:
    """True when a harvested resource is nearly used up mid-invocation: raise it to the user's size.

    Checked on every 100 ms sample; only harvested allocations (below the user's size) qualify.
    """
    return allocated < user and usage >= cfg.give_back_threshold * allocated
