"""The invoker's memory pool (``bench real --memory-mb``): first come, first served, never more
than its memory at once (a call larger than the pool runs alone), nothing lost to a cancel."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.invoker.invoker import MemoryPool


@settings(max_examples=60, deadline=None)
@given(
    pool_mb=st.integers(64, 1024),
    calls=st.lists(
        st.tuples(st.integers(1, 1500), st.integers(0, 3), st.booleans()), min_size=1, max_size=12
    ),
)
def test_admits_in_arrival_order_within_its_memory_and_gives_all_back(
    pool_mb: int, calls: list[tuple[int, int, bool]]
) -> None:
    """Each call: (MB, how many loop turns it runs, whether it is cancelled while it may wait)."""
    pool = MemoryPool(pool_mb)
    admitted: list[int] = []
    peaks: list[float] = []

    async def call(i: int, mb: int, turns: int) -> None:
        async with pool.hold(mb):
            admitted.append(i)
            peaks.append(pool.used)
            assert pool.used <= pool_mb or pool.used == mb  # an oversized call runs alone
            for _ in range(turns + 1):
                await asyncio.sleep(0)

    async def main() -> None:
        tasks = [asyncio.create_task(call(i, mb, turns)) for i, (mb, turns, _) in enumerate(calls)]
        await asyncio.sleep(0)
        cancelled = {i for i, (*_, cancel) in enumerate(calls) if cancel}
        for i in cancelled:
            tasks[i].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert pool.used == 0 and not pool._queue  # every hold given back, nobody left waiting
        assert admitted == sorted(set(admitted))  # first come, first served, each once
        assert all(i in admitted for i in range(len(calls)) if i not in cancelled)

    asyncio.run(main())
    assert max(peaks, default=0) <= max(pool_mb, *(mb for mb, *_ in calls))


def test_a_call_that_does_not_fit_waits_and_the_next_waits_behind_it() -> None:
    pool = MemoryPool(512)
    order: list[str] = []

    async def call(name: str, mb: float, hold_s: float) -> None:
        async with pool.hold(mb):
            order.append(f"+{name}")
            await asyncio.sleep(hold_s)
            order.append(f"-{name}")

    async def main() -> None:
        a = asyncio.create_task(call("a", 384, 0.05))
        await asyncio.sleep(0)
        b = asyncio.create_task(call("b", 256, 0.0))  # does not fit beside a
        await asyncio.sleep(0)
        c = asyncio.create_task(call("c", 64, 0.0))  # would fit, but comes after b
        await asyncio.gather(a, b, c)

    asyncio.run(main())
    assert order[:3] == ["+a", "-a", "+b"] and "+c" in order[3:]


def test_refuses_a_pool_without_memory() -> None:
    for mb in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="needs some memory"):
            MemoryPool(mb)


def test_a_call_cancelled_just_as_it_is_admitted_gives_its_memory_back() -> None:
    pool = MemoryPool(512)

    async def main() -> None:
        first = pool.hold(512)
        await first.__aenter__()
        waiting = asyncio.create_task(pool.hold(256).__aenter__())
        await asyncio.sleep(0)  # it waits for the first call's memory
        await first.__aexit__(None, None, None)  # admits it: its turn has not come yet
        assert pool.used == 256
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pool.used == 0

    asyncio.run(main())
