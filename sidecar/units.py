"""Units and size bounds shared by the node, the simulator, the trainer and the tests (one
definition)."""

MB = 2**20
"""One mebibyte: the grid, the configs and the API give memory in MB, the kernel in bytes."""

MIN_USER_CORES = 0.01
"""The smallest user CPU: the kernel's smallest CFS quota (1,000 us) in a 100 ms period."""

MIN_USER_MEM_MB = 4.0
"""The smallest user memory, unless ``[safeguard] mem_headroom_mb`` is larger."""


def min_user_mem_mb(headroom_mb: float) -> float:
    """The smallest user memory with a safeguard headroom of ``headroom_mb`` (a hard limit is
    never written below usage + headroom): what a hook and the config may give."""
    return max(MIN_USER_MEM_MB, headroom_mb)
