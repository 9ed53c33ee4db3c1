"""`LLM`: the in-process engine. One process runs both phases with continuous batching.

It is the colocated baseline and the oracle the disaggregated runtime must match. The step is
schedule -> run -> postprocess, driven by the wall clock.
"""
from __future__ import annotations

import time
from pathlib import Path

from engine.batching import ColocatedPolicy, finish
from engine.block_manager import BlockManager
from engine.request import FinishReason, Request
from engine.sampling_params import SamplingParams
from model.input_processor import InputProcessor
from model.kv_cache import allocate_kv_cache, num_blocks_for_memory
from model.loader import build_model, model_context_len
from model.output_processor import Delta, OutputProcessor, RequestOutput
from model.runner import ModelRunner, StepInput
from model.sampler import Sampler
from model.step_isolation import StepIsolation
from model.tokenizer import load_tokenizer


class LLM:
    """Offline generation: `LLM().generate(["Hello"], SamplingParams(max_tokens=8))`.

    model: a model folder, a preset name (dummy weights) or "embedded" (the default).
    mode: "prefill_first" (a waiting prefill runs before the next decode step) or "chunked".
    """

    def __init__(self, model: str = "embedded", *, device: str = "cpu", dtype: str = "auto",
                 block_size: int = 16, num_kv_blocks: int = 0, max_batch_tokens: int = 4096,
                 max_batch_size: int = 64, max_model_len: int = 0, enable_prefix_caching: bool = True,
                 mode: str = "prefill_first", chunk_tokens: int = 512, seed: int = 0,
                 gpu_memory_utilization: float = 0.85):
        from model.embedded import resolve_model_source
        source = resolve_model_source(model)
        self.model = build_model(source, device=device, dtype=dtype,
                                 max_positions=max_model_len or 0)
        self.cfg = self.model.cfg
        self.max_model_len = model_context_len(self.cfg, max_model_len)
        folder = Path(source) if Path(source).is_dir() else None
        self.tokenizer = load_tokenizer(folder, self.cfg.bos_token_id, self.cfg.eos_token_id)
        dt = next(self.model.parameters()).dtype
        if not num_kv_blocks:
            num_kv_blocks = num_blocks_for_memory(self.cfg, block_size, self.cfg.num_layers, self.cfg.num_kv_heads,
                                                  dt, device, gpu_memory_utilization, 1.0, max_batch_tokens)
        kv = allocate_kv_cache(self.cfg.num_layers, num_kv_blocks, block_size, self.cfg.num_kv_heads,
                               self.cfg.head_dim, dt, device)
        self.max_model_len = min(self.max_model_len, num_kv_blocks * block_size)
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.policy = ColocatedPolicy(self.block_manager, max_batch_tokens, max_batch_size, mode, chunk_tokens)
        self.runner = ModelRunner(self.model, kv, block_size)
        self.sampler = Sampler(device, seed)
        execute = lambda batch: self.runner.execute(StepInput.from_batch(batch))  # noqa: E731
        self.isolation = StepIsolation(execute, self._sample, execute)
        self.inputs = InputProcessor(self.tokenizer, self.cfg.vocab_size, self.max_model_len,
                                     max_kv_tokens=num_kv_blocks * block_size, eos_token_ids=self.cfg.eos_token_ids)
        self.outputs = OutputProcessor(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self._results: dict[str, RequestOutput] = {}

    # Requests ---------------------------------------------------------------------------
    def add_request(self, prompt, sampling: SamplingParams | None = None, request_id: str | None = None) -> str:
        now = time.monotonic()
        req = self.inputs.build(prompt, sampling, request_id, arrival_s=now)
        if req.request_id in self.requests:
            from engine.errors import InvalidRequestError
            raise InvalidRequestError("request_id", f"{req.request_id!r} is already running")
        self.requests[req.request_id] = req
        self.outputs.add(req.request_id, req.prompt_token_ids, req.sampling.stop)
        self._results[req.request_id] = RequestOutput(req.request_id, req.prompt_token_ids)
        self.policy.add(req, now)
        return req.request_id

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.policy.release(req)
            finish(req, FinishReason.CANCELLED, time.monotonic())
            self.outputs.discard(request_id)
            self._results[request_id].finish_reason = FinishReason.CANCELLED.value

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # The step ---------------------------------------------------------------------------
    def step(self) -> list[Delta]:
        now = time.monotonic()
        batch = self.policy.schedule(now)
        if batch.empty:
            if self.requests and not batch.preempted:
                raise RuntimeError("scheduler made no progress: a request needs more KV blocks than exist")
            return []
        out = self.isolation.run(batch)       # a request that makes the step fail fails alone
        for req, why in out.failed:
            self._fail(req, why)
        return self._postprocess(out.batch, out.batch.sampled, out.tokens, out.logprobs)

    def _sample(self, logits, reqs):
        return self.sampler.sample_requests(logits, reqs)

    def _fail(self, req: Request, why: str) -> None:
        self.requests.pop(req.request_id, None)
        self.policy.release(req)
        finish(req, FinishReason.ERROR, time.monotonic())
        self.outputs.discard(req.request_id)
        res = self._results[req.request_id]
        res.finish_reason, res.error = FinishReason.ERROR.value, why

    def _postprocess(self, batch, sampled, tokens, logprobs) -> list[Delta]:
        now = time.monotonic()
        finished, deltas = [], []
        for req, tok, lp in zip(sampled, tokens, logprobs):
            done = req.append_token(tok, self.cfg.eos_token_id, self.max_model_len)
            req.mark("first_token", now)
            delta = self.outputs.process(req.request_id, [tok], req.finish_reason.value if done else None)
            if delta.finish_reason and not done:        # a stop string
                req.finish_reason, done = FinishReason.STOP, True
            res = self._results[req.request_id]
            res.token_ids.append(tok)
            if lp is not None:
                res.logprobs.append(lp)
            res.text += delta.text
            if done:
                finished.append(req)
            deltas.append(delta)
        self.policy.complete(batch, finished, now)
        for req in finished:
            finish(req, req.finish_reason, now)
            res = self._results[req.request_id]
            res.finish_reason, res.num_cached_tokens, res.times = req.finish_reason.value, req.num_cached_tokens, dict(req.times)
            del self.requests[req.request_id]
        return deltas

    def take_result(self, request_id: str) -> RequestOutput:
        return self._results.pop(request_id)

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run a batch of prompts (text or token-id lists) to completion; outputs in input order."""
        if isinstance(prompts, (str,)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            from engine.errors import InvalidRequestError
            raise InvalidRequestError("sampling", f"{len(params)} parameter sets for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while self.has_unfinished:
            self.step()
        return [self.take_result(i) for i in ids]
