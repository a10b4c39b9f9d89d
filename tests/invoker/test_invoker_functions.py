"""Every real function runs, returns a checksum, and takes longer on a larger input."""

from __future__ import annotations

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
