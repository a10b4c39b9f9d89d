"""Every real function runs, returns a checksum, and takes longer on a larger input."""

from __future__ import annotations

import numpy as np
import pytest

from training.invoker.functions import SPECS, run, warm


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_function_runs_and_grows_with_input(spec) -> None:
    warm(spec.name)
    small, large = spec.input_size(0.0), spec.input_size(0.5)
    # best of two runs: robust to a neighbour's burst on a shared machine
    t_small = min(run(spec.name, small)[0] for _ in range(2))
    t_large = run(spec.name, large)[0]
    assert isinstance(run(spec.name, small)[1], int)  # a checksum, nothing optimised away
    assert t_large > 1.3 * t_small, (spec.name, t_small, t_large)


def test_specs_mix_over_and_under_provisioned_users() -> None:
    from training.invoker.functions import DEFAULT_RATIO

    cores = {s.name: s.mem_mb * DEFAULT_RATIO for s in SPECS}
    assert len(SPECS) >= 8 and len(set(cores)) == len(SPECS)
    assert cores["pyloop"] < 1 and cores["matmul"] < 2  # under-provisioned on CPU
    assert cores["sleepy"] >= 2 and cores["graph"] >= 2  # over-provisioned on CPU


def test_every_function_plays_a_share_of_the_trace() -> None:
    """Eleven functions on the sample's ten trace functions: the eleventh (spiky) takes turns
    with the first (pyloop); the other nine keep theirs, as with ten."""
    from collections import Counter

    from training.invoker.functions import spikes
    from training.invoker.invoker import schedule

    arrivals = schedule(2.0)
    by = Counter(a.container for a in arrivals)
    assert set(by) == {s.name for s in SPECS}
    ten = Counter(a.container for a in schedule(2.0, functions=SPECS[:10]))
    assert by["pyloop"] + by["spiky"] == ten["pyloop"] and abs(by["pyloop"] - by["spiky"]) <= 1
    assert all(by[n] == ten[n] for n in ten if n != "pyloop")
    sizes = [a.size for a in arrivals if a.container == "spiky"]
    assert min(sizes) >= 1 and max(sizes) <= 8
    # about one input in five spikes, whatever its size
    drawn = [SPECS[-1].input_size(u) for u in np.linspace(0, 1, 2001)]
    assert 0.15 < np.mean([spikes(x) for x in drawn]) < 0.25
