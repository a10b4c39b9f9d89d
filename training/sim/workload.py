"""From a trace to a workload: each function's true demand, its user's size, every invocation's
draw.

The trace gives arrival times, a duration distribution and a memory distribution per function.
What no trace records, and the simulator must invent honestly, is how a function responds to
resources. Per function we draw:

* ``parallelism`` (cores): the CPU it can use; extra cores beyond it do not help;
* ``cpu_frac``: the share of its run that is CPU-bound (the rest waits on I/O);
* ``mem_pressure``: slowdown when memory is tight, 0 by default (measured real functions ran as
  fast at their peak memory as at twice it; below it they are OOM-killed);
* ``worker_mb``: the warm worker's idle memory (runtime, libraries, cached inputs), which the
  container's limit must hold on top of the invocation's own memory;
* the user's size: memory from the trace's peak memory times an over-provisioning factor, CPU
  proportional to memory (as on OpenWhisk and Lambda); parallelism is drawn relative to the
  user's CPU, so some functions are over- and some under-provisioned.

Per invocation (input-dependent): one quantile ``q`` drives both the duration draw (the trace's
percentile curve) and the working set (the worker's idle memory plus the trace's memory curve),
so big inputs are slow and memory-hungry together; plus run-to-run noise and a cold-start draw.
The invocation's ``input_size`` (what an invoker reports, in units of the function's own: bytes,
rows, pixels) follows the same ``q``: log-uniform between a function's smallest and largest
input, as the local invoker's real functions draw theirs, times log-normal noise, so it predicts
duration and memory well but not exactly. Some functions (``spike_share``) spike: every k-th
call's own memory is several times its usual one with no larger input, as a real compression
function's every 20th call allocates ~8x (docs/duration-model.md). Inputs and spikes have their
own random stream: every other draw of a seed is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sidecar.core.grid import ResourceGrid
from training.traces import DURATION_PCTS, MEMORY_PCTS, Trace


@dataclass(frozen=True)
class WorkloadConfig:
    over_provision_log_mean: float = 0.45
    """log of the median factor user memory / peak working set (e^0.45 ~ 1.6x)."""
    over_provision_log_sd: float = 0.45
    user_cpu_per_mem_unit: float = 0.5
    """CPU follows memory: user CPU units per user memory unit (0.5: 512 MB gets 4 cores)."""
    parallelism_log_mean: float = -0.3
    """log of the median ratio parallelism / user cores (e^-0.3 ~ 0.74: ~55% of functions over-,
    ~45% under-provisioned on CPU)."""
    parallelism_log_sd: float = 1.0
    max_duration_s: float = 300.0
    """Azure functions time out at 5 minutes; longer draws are clipped."""
    noise_sd: float = 0.05
    """Run-to-run log-normal noise on execution time."""
    cold_start_base_s: float = 0.3
    cold_start_per_gb_s: float = 1.0
    mem_pressure_max: float = 0.0
    """Upper bound of the per-function memory-pressure slowdown beta (uniform draw). 0: ten real
    functions ran as fast at 1.0x / 1.25x their peak as at 2x (no swap; docs/duration-model.md),
    and a limit below the real need is an OOM kill, not a slowdown."""
    worker_idle_mb_min: float = 8.0
    worker_idle_mb_max: float = 80.0
    """The warm worker's idle memory is drawn log-uniformly in [min, max] per function and added
    to every invocation's working set: 8 MB (bare Python worker) to ~80 MB (numpy and a cached
    16 MB input), measured on the real functions' containers (docs/duration-model.md)."""
    input_span_min: float = 2.5
    input_span_max: float = 12.0
    """A function's largest input over its smallest is drawn log-uniformly in [min, max]: the
    local invoker's ten real functions span 2.8x (matmul) to 12x (compress, sleepy)."""
    input_noise_sd: float = 0.25
    """Log-normal noise on the input size: inputs of one size differ in content (how well they
    compress, how many edges a graph has), so the input predicts duration and memory imperfectly
    (rank correlation ~0.9 for a 6x span)."""
    spike_share: float = 0.05
    """Share of functions whose memory spikes in some calls without a larger input (one of the
    invoker's ten real functions does; a modest share of a population)."""
    spike_every_min: int = 10
    spike_every_max: int = 40
    """A spiky function spikes every k-th call, k uniform in [min, max] (the real one: 20)."""
    spike_factor_min: float = 4.0
    spike_factor_max: float = 8.0
    """A spike multiplies the call's own memory (working set minus the worker's idle memory) by a
    factor log-uniform in [min, max] (the real one: ~8x), at most up to the user's size (the user
    sized the function to survive its spikes)."""


@dataclass
class Workload:
    """Everything about the functions and invocations; the cluster adds placement and contention."""

    n_functions: int
    # per function
    user_cpu: np.ndarray  # grid units
    user_mem: np.ndarray  # grid units
    parallelism: np.ndarray  # cores
    cpu_frac: np.ndarray
    mem_pressure: np.ndarray
    worker_mb: np.ndarray  # idle memory of the warm worker, included in working_set_mb
    # per invocation, sorted by arrival
    arrival_s: np.ndarray
    fn: np.ndarray
    duration_s: np.ndarray  # at the user's size, in isolation, before noise
    working_set_mb: np.ndarray  # the worker's idle memory included
    noise: np.ndarray
    cold_start_s: np.ndarray
    input_size: np.ndarray  # what the invoker reports, in the function's own units
    spike: np.ndarray  # bool: this call's memory spikes (allocated at once, not grown)

    @property
    def n_invocations(self) -> int:
        return len(self.arrival_s)

    def scaled(self, load: float) -> Workload:
        """The same invocations arriving ``load`` times as fast (arrival times divided by it), so
        runs at different loads stay paired invocation by invocation."""
        if not load > 0.0:
            raise ValueError(f"load must be positive, got {load}")
        return replace(self, arrival_s=self.arrival_s / load)

    def provisioning(self, grid: ResourceGrid) -> dict[str, float]:
        """Share of functions over-/under-provisioned per resource (peak vs 0.9 x user size)."""
        user_cores = self.user_cpu * grid.cpu_unit_cores
        peak_ws = np.zeros(self.n_functions)
        np.maximum.at(peak_ws, self.fn, self.working_set_mb)
        user_mb = self.user_mem * grid.mem_unit_mb
        cpu_peak = np.minimum(self.parallelism, user_cores)
        return {
            "cpu_over": float(np.mean(cpu_peak <= 0.9 * user_cores)),
            "cpu_under": float(np.mean(self.parallelism > 0.9 * user_cores)),
            "mem_over": float(np.mean(peak_ws <= 0.9 * user_mb)),
        }


def _interp_curve(q: np.ndarray, pcts: tuple[int, ...], values: np.ndarray) -> np.ndarray:
    return np.interp(q * 100.0, np.asarray(pcts, dtype=np.float64), values)


def build_workload(
    trace: Trace, grid: ResourceGrid, seed: int, cfg: WorkloadConfig = WorkloadConfig()
) -> Workload:
    """Draw a reproducible workload (same trace, grid and seed -> same workload)."""
    rng = np.random.default_rng(seed)
    nf = len(trace.functions)
    arrival_s, fn = trace.arrivals(seed)
    n = len(arrival_s)
    q = rng.random(n)

    duration_s = np.empty(n)
    working_set = np.empty(n)
    user_mem = np.empty(nf, dtype=np.int64)
    order = np.argsort(fn, kind="stable")
    bounds = np.searchsorted(fn[order], np.arange(nf + 1))
    over = np.exp(rng.normal(cfg.over_provision_log_mean, cfg.over_provision_log_sd, nf))
    # Its own stream: the worker draw leaves every other draw of a seed as it was.
    worker_mb = np.exp(
        np.random.default_rng([seed, 1]).uniform(
            np.log(cfg.worker_idle_mb_min), np.log(cfg.worker_idle_mb_max), nf
        )
    )
    # Inputs and spikes, on a stream of their own too.
    rng_in = np.random.default_rng([seed, 2])
    input_lo = np.exp(rng_in.uniform(0.0, np.log(1e5), nf))
    input_span = np.exp(rng_in.uniform(np.log(cfg.input_span_min), np.log(cfg.input_span_max), nf))
    noise_in = np.exp(rng_in.normal(0.0, cfg.input_noise_sd, n))
    input_size = input_lo[fn] * input_span[fn] ** q * noise_in
    spiky = rng_in.random(nf) < cfg.spike_share
    spike_every = rng_in.integers(cfg.spike_every_min, cfg.spike_every_max + 1, nf)
    spike_phase = rng_in.integers(0, spike_every)
    spike_factor = np.exp(
        rng_in.uniform(np.log(cfg.spike_factor_min), np.log(cfg.spike_factor_max), nf)
    )
    spike = np.zeros(n, dtype=bool)
    for f, tf in enumerate(trace.functions):
        idx = order[bounds[f] : bounds[f + 1]]
        mem_pct = tf.memory_pct_mb
        if not np.all(np.isfinite(mem_pct)):
            # Unknown memory: a typical Azure function (median ~150 MB) with a modest spread.
            base = rng.lognormal(np.log(150.0), 0.5)
            mem_pct = base * np.linspace(0.7, 1.3, len(MEMORY_PCTS))
        # Working set of this function's invocations: the worker's idle memory plus the trace's
        # memory curve, capped so the largest input still fits the grid's maximum memory (and
        # the worker takes at most half of that on a small grid).
        cap = grid.max_mb * 0.95
        worker_mb[f] = min(worker_mb[f], 0.5 * cap)
        mem_pct = worker_mb[f] + np.minimum(np.maximum.accumulate(mem_pct), cap - worker_mb[f])
        peak_ws = float(mem_pct[-1])
        user_mem[f] = min(grid.mem_units, max(1, grid.mem_units_ceil(peak_ws * max(1.0, over[f]))))
        if len(idx):
            qi = q[idx]
            curve = np.maximum.accumulate(tf.duration_pct_ms) / 1e3
            duration_s[idx] = np.minimum(
                _interp_curve(qi, DURATION_PCTS, curve), cfg.max_duration_s
            )
            working_set[idx] = _interp_curve(qi, MEMORY_PCTS, mem_pct)
            if spiky[f]:
                hit = idx[(np.arange(len(idx)) + spike_phase[f]) % spike_every[f] == 0]
                own = working_set[hit] - worker_mb[f]
                user_mb = user_mem[f] * grid.mem_unit_mb
                working_set[hit] = np.maximum(
                    working_set[hit], np.minimum(worker_mb[f] + own * spike_factor[f], user_mb)
                )
                spike[hit] = True
    duration_s = np.maximum(duration_s, 1e-3)

    # CPU follows memory: the user's cores are proportional to the user's memory units.
    user_cpu = np.clip(np.round(user_mem * cfg.user_cpu_per_mem_unit), 1, grid.cpu_units)
    user_cores = user_cpu * grid.cpu_unit_cores
    ratio = np.exp(rng.normal(cfg.parallelism_log_mean, cfg.parallelism_log_sd, nf))
    parallelism = np.clip(ratio * user_cores, 0.05, 2 * grid.max_cores)
    cpu_frac = rng.beta(4.0, 1.5, nf)  # mostly CPU-bound, some mostly waiting
    waiting = rng.random(nf) < 0.15
    cpu_frac[waiting] = rng.uniform(0.02, 0.2, waiting.sum())
    mem_pressure = rng.uniform(0.0, cfg.mem_pressure_max, nf)

    noise = np.exp(rng.normal(0.0, cfg.noise_sd, n))
    user_mb = user_mem[fn] * grid.mem_unit_mb
    cold = (cfg.cold_start_base_s + cfg.cold_start_per_gb_s * user_mb / 1024.0) * np.exp(
        rng.normal(0.0, 0.2, n)
    )
    return Workload(
        n_functions=nf,
        user_cpu=user_cpu.astype(np.int64),
        user_mem=user_mem,
        parallelism=parallelism,
        cpu_frac=cpu_frac,
        mem_pressure=mem_pressure,
        worker_mb=worker_mb,
        arrival_s=arrival_s.astype(np.float64),
        fn=fn.astype(np.int64),
        duration_s=duration_s,
        working_set_mb=working_set,
        noise=noise,
        cold_start_s=cold,
        input_size=input_size,
        spike=spike,
    )
