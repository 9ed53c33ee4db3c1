"""`n` completions of one prompt: n requests on the cluster, one merged stream of
(index, StreamDelta). Shared by the gRPC and HTTP fronts.

Every child is validated and admitted before any token is streamed; if one is refused, the
ones already admitted are cancelled (nothing half done). When the caller stops iterating
(client gone, deadline), every unfinished child is cancelled, which frees its KV blocks on
both pools."""
from __future__ import annotations

import asyncio
import dataclasses

from engine.sampling_params import MAX_SEED, SamplingParams


def child_params(sp: SamplingParams, index: int) -> SamplingParams:
    """Child i of a seeded request draws from seed + i, so the n completions differ but each is
    reproducible."""
    seed = None if sp.seed is None else (sp.seed + index) % (MAX_SEED + 1)
    return dataclasses.replace(sp, n=1, seed=seed)


async def submit_n(cluster, prompt, sp: SamplingParams, request_id: str) -> list:
    """Admit the n children (ids request_id, or request_id-i when n > 1); all or none."""
    tracked = []
    try:
        for i in range(sp.n):
            rid = request_id if sp.n == 1 else f"{request_id}-{i}"
            tracked.append(await cluster.submit(prompt, child_params(sp, i), rid))
    except BaseException:
        for t in tracked:
            await asyncio.shield(cluster.acancel(t.request_id))
        raise
    return tracked


async def stream_n(cluster, tracked: list):
    """Yield (index, StreamDelta) from every child as they arrive, until each has finished."""
    if len(tracked) == 1:
        try:
            async for item in cluster.controller.stream(tracked[0]):
                yield 0, item
        finally:
            await cancel_open(cluster, tracked)
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, t):
        try:
            async for item in cluster.controller.stream(t):
                q.put_nowait((i, item))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            q.put_nowait((i, e))
    tasks = [asyncio.ensure_future(pump(i, t)) for i, t in enumerate(tracked)]
    try:
        left = len(tracked)
        while left:
            i, item = await q.get()
            if isinstance(item, Exception):
                raise item
            if item.finish_reason is not None:
                left -= 1
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await cancel_open(cluster, tracked)


async def cancel_open(cluster, tracked: list) -> None:
    for t in tracked:
        if not t.closed:          # cancelled, disconnected or past its deadline
            await asyncio.shield(cluster.acancel(t.request_id))
