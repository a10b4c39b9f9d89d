"""Per-function statistics, kept incrementally: O(1) per update, never a rescan of history.

The reference code rescanned every past invocation per decision (O(history)); on a long-running
host that grows without bound. Means here are exponentially weighted so they also follow a
function whose behaviour drifts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EWMA_ALPHA = 0.2
"""Weight of the newest observation in every running mean (about the last 5-10 invocations)."""


def _ewma(mean: float, value: float, count: int) -> float:
    # The first observations use a plain running mean so early values are not biased to 0.
    alpha = max(EWMA_ALPHA, 1.0 / count)
    return mean + alpha * (value - mean)


@dataclass
class FunctionStats:
    """What the policy knows about one function; updated at each invocation's start and end."""

    arrivals: int = 0
    completions: int = 0
    last_arrival_s: float = math.nan
    mean_iat_s: float = math.nan
    """Mean inter-arrival time (EWMA), seconds; NaN until two arrivals were seen."""
    mean_cpu_peak_cores: float = 0.0
    mean_mem_peak_mb: float = 0.0
    last_cpu_peak_cores: float = 0.0
    last_mem_peak_mb: float = 0.0
    mean_duration_s: float = 0.0
    baseline_duration_s: float = math.nan
    """Mean execution time at the user's size, from safeguard (user-size) runs; NaN until one
    ran."""
    baseline_runs: int = 0
    last_safeguard_s: float = math.nan
    inputs: int = 0
    """Completed invocations that reported an input size."""
    mean_log_input: float = 0.0
    """EWMA of the natural log of the reported input sizes (their geometric mean, in log space):
    the reference an invocation's input is compared with (``input_vs_history``)."""

    def on_arrival(self, now_s: float) -> None:
        if self.arrivals > 0:
            iat = max(0.0, now_s - self.last_arrival_s)
            self.mean_iat_s = (
                iat if self.arrivals == 1 else _ewma(self.mean_iat_s, iat, self.arrivals)
            )
        self.arrivals += 1
        self.last_arrival_s = now_s

    def on_completion(
        self,
        now_s: float,
        duration_s: float,
        cpu_peak_cores: float,
        mem_peak_mb: float,
        at_user_size: bool,
        input_size: float | None = None,
    ) -> None:
        """Record a finished invocation; a run at the user's size (re)calibrates the baseline.

        ``input_size`` (when the invoker reports one; > 0) joins the input history."""
        self.completions += 1
        n = self.completions
        a = EWMA_ALPHA if n * EWMA_ALPHA >= 1.0 else 1.0 / n  # _ewma's weight, inlined: hot path
        self.mean_cpu_peak_cores += a * (cpu_peak_cores - self.mean_cpu_peak_cores)
        self.mean_mem_peak_mb += a * (mem_peak_mb - self.mean_mem_peak_mb)
        self.last_cpu_peak_cores = cpu_peak_cores
        self.last_mem_peak_mb = mem_peak_mb
        self.mean_duration_s += a * (duration_s - self.mean_duration_s)
        if at_user_size and duration_s > 0.0:  # a zero-length run measures nothing
            self.baseline_runs += 1
            if self.baseline_runs == 1:
                self.baseline_duration_s = duration_s
            else:
                self.baseline_duration_s = _ewma(
                    self.baseline_duration_s, duration_s, self.baseline_runs
                )
            self.last_safeguard_s = now_s
        if input_size is not None and input_size > 0.0:
            self.inputs = k = self.inputs + 1
            a = EWMA_ALPHA if k * EWMA_ALPHA >= 1.0 else 1.0 / k
            self.mean_log_input += a * (math.log(input_size) - self.mean_log_input)

    def input_vs_history(self, input_size: float | None) -> float:
        """log2 of ``input_size`` over the geometric mean of the inputs seen; NaN when either is
        unknown."""
        if input_size is None or not input_size > 0.0 or self.inputs == 0:
            return math.nan
        return (math.log(input_size) - self.mean_log_input) / math.log(2.0)

    def rate_per_s(self) -> float:
        """Invocation rate implied by the mean inter-arrival time (0 when unknown)."""
        if math.isnan(self.mean_iat_s) or self.mean_iat_s <= 0:
            return 0.0
        return 1.0 / self.mean_iat_s
