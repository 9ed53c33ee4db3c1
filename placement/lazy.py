"""A decode batch advanced lazily: O(1) per join and per finish instead of O(batch) per run.

At high load a decode instance runs hundreds of requests and something happens every step or
two (a join, a finish), so even one pass over the batch per fast-forward run costs as much as
stepping. `LazyBatch` keeps, per running request, the step counter and token count when it was
last brought up to date, and for the whole batch:

- a heap of the step at which each request reaches its output length;
- the sum of context tokens (it grows by the batch size per step);
- when each request needs its next KV block. A request whose block table is full up to its
  tokens needs a new block every `block_size` steps, at steps of one residue modulo
  `block_size`, so a histogram over residues answers "blocks needed by the next j steps" in
  O(block_size). A request just admitted may have up to one spare block; it is counted on its
  own until its first step has run.

Blocks are taken from the (counting) block manager in bulk per run and attributed to block
tables, and tokens appended to requests, only when a request leaves (finishes) or when the
whole batch must be real again for a step through `ColocatedPolicy.schedule` (`materialize`).
The simulator's tests check that this gives the same answers as plain engine steps.
"""
from __future__ import annotations

import heapq
from itertools import repeat


class LazyBatch:
    """Lazy state of every request in a DecodePolicy's running list (all in the batch)."""

    def __init__(self, block_size: int):
        self.bs = block_size
        self.step = 0                       # decode steps run since the batch was built
        self.hist = [0] * block_size        # requests per block-need residue (settled ones)
        self.fresh: dict[int, int] = {}     # id(req) -> first block-need step, until settled
        self.state: dict[int, list] = {}    # id(req) -> [req, step, tokens, first_need_step]
        self.heap: list = []                # (finish step, seq, req)
        self.seq = 0
        self.sum_tokens = 0

    @property
    def size(self) -> int:
        return len(self.state)

    def admit(self, req) -> bool:
        """Track a materialised request; False if its table has more than one spare block."""
        n = len(req.prompt_token_ids) + len(req.output_token_ids)
        s0 = len(req.block_ids) * self.bs - n + 1     # steps until it needs a new block
        if not 0 <= s0 <= self.bs:
            return False
        key = id(req)
        self.state[key] = [req, self.step, n, self.step + s0]
        self.fresh[key] = self.step + s0
        heapq.heappush(self.heap, (self.step + req.sampling.max_tokens - len(req.output_token_ids),
                                   self.seq, req))
        self.seq += 1
        self.sum_tokens += n
        return True

    def admit_all(self, reqs) -> bool:
        """`admit` each of `reqs` in order (False at the first that cannot be tracked); one
        heapify instead of a push per request (the heap pops in the same order: its entries
        are totally ordered by their sequence numbers)."""
        bs, step, seq = self.bs, self.step, self.seq
        state, fresh, heap = self.state, self.fresh, self.heap
        total = 0
        for req in reqs:
            out = len(req.output_token_ids)
            n = len(req.prompt_token_ids) + out
            s0 = len(req.block_ids) * bs - n + 1
            if not 0 <= s0 <= bs:
                return False
            key = id(req)
            state[key] = [req, step, n, step + s0]
            fresh[key] = step + s0
            heap.append((step + req.sampling.max_tokens - out, seq, req))
            seq += 1
            total += n
        heapq.heapify(heap)
        self.seq = seq
        self.sum_tokens += total
        return True

    def need(self, num_steps: int) -> int:
        """KV blocks the next `num_steps` steps take."""
        if num_steps <= 0:
            return 0
        bs, step = self.bs, self.step
        q, r = divmod(num_steps, bs)
        total = q * (len(self.state) - len(self.fresh))
        if r:
            hist, base = self.hist, step % bs
            end = base + r
            total += sum(hist[base:end]) if end <= bs else sum(hist[base:]) + sum(hist[:end - bs])
        for first in self.fresh.values():
            s0 = first - step
            if num_steps > s0:
                total += 1 + (num_steps - 1 - s0) // bs
        return total

    def max_steps(self, free_blocks: int, limit: int) -> int:
        """Most steps (<= limit) whose blocks fit in `free_blocks`."""
        if limit <= 0 or self.need(limit) <= free_blocks:
            return max(0, limit)
        lo, hi = 0, limit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.need(mid) <= free_blocks:
                lo = mid
            else:
                hi = mid
        return lo

    def steps_to_first_finish(self) -> int:
        return self.heap[0][0] - self.step if self.heap else 1 << 30

    def advance(self, num_steps: int) -> list:
        """Account for `num_steps` steps run; returns the requests that reached their length
        (still tracked: `drop` them once materialised)."""
        self.step += num_steps
        self.sum_tokens += len(self.state) * num_steps
        if self.fresh:
            for first in self.fresh.values():
                self.hist[first % self.bs] += 1
            self.fresh.clear()
        done = []
        heap = self.heap
        while heap and heap[0][0] <= self.step:
            done.append(heapq.heappop(heap)[2])
        return done

    def materialize(self, req) -> None:
        """Append the tokens and block-table entries of the steps run since last time (the
        blocks themselves were taken from the block manager in bulk)."""
        st = self.state[id(req)]
        k = self.step - st[1]
        if k:
            tokens = st[2] + k
            req.output_token_ids.extend(repeat(0, k))
            grow = -(-(tokens - 1) // self.bs) - len(req.block_ids)
            if grow > 0:
                req.block_ids.extend(repeat(-1, grow))
            st[1], st[2] = self.step, tokens

    def drop(self, req) -> None:
        """Stop tracking a materialised request (finished)."""
        st = self.state.pop(id(req))
        first = self.fresh.pop(id(req), None)
        if first is None:
            self.hist[st[3] % self.bs] -= 1
        self.sum_tokens -= st[2]

    def materialize_all(self) -> None:
        step, bs = self.step, self.bs
        for st in self.state.values():
            k = step - st[1]
            if k:
                req = st[0]
                tokens = st[2] + k
                req.output_token_ids.extend(repeat(0, k))
                grow = -(-(tokens - 1) // bs) - len(req.block_ids)
                if grow > 0:
                    req.block_ids.extend(repeat(-1, grow))
                st[1], st[2] = step, tokens
