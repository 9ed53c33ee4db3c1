"""Batching policies for prefill and decode. Time is always an argument (`now_s`): the workers
pass the wall clock, the simulator in `placement/` passes its simulated clock.

A policy decides *what* runs next and keeps block tables; it never runs a model. One call to
`schedule` returns a `Batch`; after the batch has run, the caller reports the sampled tokens
with `complete`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.request import FinishReason, Request, RequestState


@dataclass
class PrefillChunk:
    """Compute KV for tokens [start, start + num_tokens) of `request.all_token_ids`."""
    request: Request
    start: int
    num_tokens: int
    is_last: bool = False   # reaches the end of the known tokens, so it samples a new token

    def __post_init__(self):
        # Fixed at schedule time: appending the sampled token later must not change it.
        self.is_last = self.start + self.num_tokens == self.request.num_tokens


@dataclass
class Batch:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefill)

    @property
    def sampled(self) -> list[Request]:
        """Requests that get a new token from this batch, in the order tokens are returned."""
        return [c.request for c in self.prefill if c.is_last] + list(self.decode)


class PrefillPolicy:
    """First come, first served prefill under a token budget.

    A request longer than the budget runs alone. The head of the queue waits for blocks rather
    than being overtaken (FCFS), which is also the back-pressure: a prefill instance whose KV is
    still waiting for transfer stops admitting.
    """

    def __init__(self, block_manager: BlockManager, max_batch_tokens: int = 8192,
                 max_batch_size: int = 256):
        self.bm = block_manager
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.waiting: deque[Request] = deque()

    def add(self, req: Request, now_s: float) -> None:
        req.mark("queued", now_s)
        self.waiting.append(req)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)

    def remove(self, req: Request) -> bool:
        # Test membership first: deque.remove's miss path formats repr(req), prompt and all,
        # which costs ~0.25 ms for a 1k-token prompt on every finished request.
        if req in self.waiting:
            self.waiting.remove(req)
            return True
        return False

    def complete(self, chunks: list[PrefillChunk]) -> None:
        """After the chunks ran: their tokens' KV is in the cache (and may now be shared)."""
        for c in chunks:
            req = c.request
            done = c.start + c.num_tokens
            # max: with async scheduling the request's next chunk may be running already.
            req.num_computed_tokens = max(req.num_computed_tokens, done)
            self.bm.commit(req.block_ids, req.all_token_ids, done)

    def schedule(self, now_s: float, token_budget: int | None = None,
                 max_chunk_tokens: int | None = None) -> list[PrefillChunk]:
        """Take requests from the head of the queue while they fit. With `max_chunk_tokens`,
        a request may be split over several calls (chunked prefill)."""
        budget = self.max_batch_tokens if token_budget is None else token_budget
        chunks: list[PrefillChunk] = []
        used = 0
        while self.waiting and len(chunks) < self.max_batch_size:
            req = self.waiting[0]
            if not req.block_ids:
                if not self.bm.can_allocate(req.all_token_ids):
                    break
                req.block_ids, req.num_cached_tokens = self.bm.allocate(req.all_token_ids)
                req.num_computed_tokens = req.num_cached_tokens
            remaining = req.num_tokens - req.num_computed_tokens
            take = remaining
            if max_chunk_tokens is not None:
                take = min(take, budget - used)
            elif chunks and used + take > budget:
                break
            if take <= 0:
                break
            chunks.append(PrefillChunk(req, req.num_computed_tokens, take))
            used += take
            if req.state is RequestState.QUEUED:
                req.transition(RequestState.PREFILLING)
                req.mark("prefill_start", now_s)
            if take < remaining:
                break       # a partly prefilled request stays at the head of the queue
            self.waiting.popleft()
        return chunks


class DecodePolicy:
    """Continuous batching: every running request advances one token per step. When a step
    needs a block and none is free, the most recently added request is preempted (its blocks
    freed, back to QUEUED for recompute) until the rest fit."""

    def __init__(self, block_manager: BlockManager, max_batch_size: int = 256):
        self.bm = block_manager
        self.max_batch_size = max_batch_size
        self.running: list[Request] = []

    def add(self, req: Request, now_s: float) -> None:
        if req.state is not RequestState.DECODING:
            req.transition(RequestState.DECODING)
        req.mark("decode_start", now_s)
        self.running.append(req)

    def remove(self, req: Request) -> bool:
        if req in self.running:
            self.running.remove(req)
            return True
        return False

    def schedule(self, now_s: float, exclude: frozenset[int] = frozenset()) -> tuple[list[Request], list[Request]]:
        """`exclude`: ids (id()) of running requests to leave out of this step (async
        scheduling: requests that end in the step still running, whatever token they get)."""
        batch: list[Request] = []
        preempted: list[Request] = []
        running = [r for r in self.running if id(r) not in exclude] if exclude else self.running
        candidates = list(running[:self.max_batch_size])
        while candidates:
            req = candidates.pop(0)
            while not self.bm.can_append(req.block_ids, req.num_tokens):
                victim = candidates.pop() if candidates else req
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                self.bm.append(req.block_ids, req.num_tokens)
                batch.append(req)
        return batch, preempted

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.bm.free(req.block_ids)
        req.reset_for_recompute()

    # Fast-forward: many steps at once, for the simulator in placement/ -------------------
    def max_steps_without_preemption(self, max_steps: int) -> int:
        """How many consecutive steps (at most `max_steps`) the current batch can run before a
        step would need a KV block that is not free, if nobody joins or leaves meanwhile and
        every batch request gets one token after each step."""
        batch = self.running[:self.max_batch_size]
        if max_steps <= 0 or not batch:
            return max(0, max_steps)
        free = self.bm.num_free_blocks
        if self._blocks_needed(batch, max_steps) <= free:
            return max_steps
        lo, hi = 0, max_steps           # needed(lo) <= free < needed(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._blocks_needed(batch, mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def blocks_needed(self, num_steps: int, exclude: frozenset[int] = frozenset()) -> int:
        """KV blocks the current batch (as `schedule(now, exclude)` forms it) still has to take
        for its next `num_steps` steps."""
        running = [r for r in self.running if id(r) not in exclude] if exclude else self.running
        return self._blocks_needed(running[:self.max_batch_size], num_steps)

    def _blocks_needed(self, batch: list[Request], num_steps: int) -> int:
        # Step k (0-based) must hold num_tokens + k tokens: the step's input token included.
        bs = self.bm.block_size
        need = 0
        for r in batch:
            last = len(r.prompt_token_ids) + len(r.output_token_ids) + num_steps - 1
            extra = -(-last // bs) - len(r.block_ids)
            if extra > 0:
                need += extra
        return need

    def fast_forward(self, num_steps: int) -> list[Request]:
        """Allocate at once the blocks of `num_steps` consecutive steps of the current batch:
        what `num_steps` calls of schedule() allocate when every batch request gets one token
        after each step and no step preempts (max_steps_without_preemption tells how many
        steps that holds for). Returns the batch; the caller appends `num_steps` tokens to
        each of its requests."""
        batch = self.running[:self.max_batch_size]
        append = self.bm.append
        for r in batch:
            append(r.block_ids, len(r.prompt_token_ids) + len(r.output_token_ids) + num_steps - 1)
        return batch


class ColocatedPolicy:
    """Prefill and decode on one instance.

    mode="prefill_first" (vLLM's default before chunking): a waiting prefill runs before the
    next decode step. mode="chunked" (Sarathi-Serve): every step carries all running decodes
    and fills the rest of `chunk_tokens` with prefill chunks.
    Preempted requests go back to the head of the prefill queue for recompute.
    """

    def __init__(self, block_manager: BlockManager, max_batch_tokens: int = 8192,
                 max_batch_size: int = 256, mode: str = "prefill_first", chunk_tokens: int = 512):
        if mode not in ("prefill_first", "chunked"):
            raise ValueError(f"mode must be prefill_first or chunked, got {mode!r}")
        self.bm = block_manager
        self.prefill = PrefillPolicy(block_manager, max_batch_tokens, max_batch_size)
        self.decode = DecodePolicy(block_manager, max_batch_size)
        self.mode = mode
        self.chunk_tokens = chunk_tokens

    def add(self, req: Request, now_s: float) -> None:
        self.prefill.add(req, now_s)

    @property
    def has_work(self) -> bool:
        return bool(self.prefill.waiting or self.decode.running)

    def schedule(self, now_s: float, exclude: frozenset[int] = frozenset()) -> Batch:
        if self.mode == "chunked":
            decode, preempted = self.decode.schedule(now_s, exclude)
            self._requeue(preempted)
            budget = self.chunk_tokens - len(decode)
            prefill = self.prefill.schedule(now_s, token_budget=budget, max_chunk_tokens=budget) if budget > 0 else []
            return Batch(prefill=prefill, decode=decode, preempted=preempted)
        prefill = self.prefill.schedule(now_s)
        if prefill:
            return Batch(prefill=prefill)
        decode, preempted = self.decode.schedule(now_s, exclude)
        self._requeue(preempted)
        return Batch(decode=decode, preempted=preempted)

    def _requeue(self, preempted: list[Request]) -> None:
        for req in reversed(preempted):
            self.prefill.waiting.appendleft(req)

    def complete(self, batch: Batch, finished: list[Request], now_s: float) -> None:
        """After the batch ran and tokens were appended: advance chunk progress, move finished
        prefills into decode, and free finished requests."""
        done = set(id(r) for r in finished)
        self.prefill.complete(batch.prefill)
        for c in batch.prefill:
            # A request cancelled while its (re)computation ran is terminal: it does not decode.
            if c.is_last and id(c.request) not in done and not c.request.state.terminal:
                self.decode.add(c.request, now_s)
        for req in finished:
            self.release(req)

    def release(self, req: Request) -> None:
        """Drop a request from every queue and free its blocks (finish, cancel, failure)."""
        self.prefill.remove(req)
        self.decode.remove(req)
        if req.block_ids:
            self.bm.free(req.block_ids)


def finish(req: Request, reason: FinishReason, now_s: float) -> None:
    """Move a request to its terminal state for `reason` and stamp the time."""
    state = {FinishReason.CANCELLED: RequestState.CANCELLED,
             FinishReason.ERROR: RequestState.FAILED}.get(reason, RequestState.FINISHED)
    req.finish_reason = reason
    req.transition(state)
    req.mark("finish", now_s)
