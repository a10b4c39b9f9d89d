"""Byte units shared by the node, the simulator, the trainer and the tests (one definition)."""

MB = 2**20
"""One mebibyte: the grid, the configs and the API give memory in MB, the kernel in bytes."""
