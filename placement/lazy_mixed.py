"""A chunked (Sarathi-style) mixed step with the decode batch kept lazy.

In chunked mode every step while prompts wait is a mixed step: all running decodes plus
prefill chunks up to `chunk_tokens`. Through `ColocatedPolicy.schedule` that costs O(batch)
per step (the decode batch materialised, one `can_append` per request, the context summed,
a token appended to each) and was most of a chunked replay's time. When the `LazyBatch`
tracks the whole decode batch and its next step needs no more blocks than are free (so
`DecodePolicy.schedule` would preempt nobody), the step is taken here at O(block_size) plus
its prefill chunks, doing what `schedule` + `complete` do, in the same order:

- the decode part takes its blocks first (`LazyBatch.need(1)`), then `PrefillPolicy.schedule`
  fills `chunk_tokens - batch size` from what is left, as in `ColocatedPolicy.schedule`;
- the step's time is `mixed_time` (or `decode_time` when no chunk fits) with the same sizes
  and context sum;
- when it ends, sampled prefill requests get their token first, then the decode batch
  advances one step; finished requests are handed on in `Batch.sampled`'s order, and new
  decodes join the running list after the finished ones left it.

Anything else (a step that would preempt, a batch not tracked lazily) goes through
`ColocatedPolicy.schedule` as before; tests/placement/test_lazy_mixed.py checks that both
give the same per-request times.
"""
from __future__ import annotations


def lazy_mixed_step(inst, now):
    """Start a mixed step of `inst` (an EngineInstance with `inst.lazy` set); events, or None
    if this step must go through `ColocatedPolicy.schedule` (it would preempt)."""
    lazy, bm, policy = inst.lazy, inst.bm, inst.policy
    size = len(lazy.state)
    n, m = len(inst.decode.running), inst.decode.max_batch_size
    if size != (n if n < m else m):
        return None
    budget = policy.chunk_tokens - size
    if budget <= 0:
        return None
    need = lazy.need(1)
    if need > bm.num_free_blocks:
        return None         # DecodePolicy.schedule would preempt: the real step does it
    bm.take_blocks(need)
    chunks = policy.prefill.schedule(now, token_budget=budget, max_chunk_tokens=budget)
    lat = inst.latency
    context = lazy.sum_tokens
    if chunks:
        inst.queued_tokens -= sum(c.num_tokens for c in chunks)
        t = lat.mixed_time([(c.num_tokens, c.start) for c in chunks], size, context)
    else:
        t = lat.decode_time(size, context)
    if inst.host_step_s is not None:
        t += inst.host_step_s()
    t /= inst.speed
    inst._mark_decode_step(now, None)
    inst.busy = True
    return [(now + t, _done, (inst, chunks))]


def _done(now, arg):
    inst, chunks = arg
    finished = []
    new_decode = []
    for c in chunks:
        if not c.is_last:
            continue
        r = c.request
        r.output_token_ids.append(0)
        if "first_token" not in r.times:
            inst.on_first_token(r, now)
        if len(r.output_token_ids) >= r.sampling.max_tokens:
            finished.append(r)
        elif not r.state.terminal:
            new_decode.append(r)
    inst.policy.prefill.complete(chunks)
    lazy = inst.lazy
    decoded = lazy.advance(1)
    for r in decoded:
        lazy.materialize(r)
        lazy.drop(r)
    for r in finished:
        inst.policy.release(r)
    inst._release(decoded)          # moves requests up into the batch (lazy) if any waited
    for r in new_decode:
        inst.decode.add(r, now)
        inst._track(r)
    finished.extend(decoded)
    return inst._after_step(now, finished)
