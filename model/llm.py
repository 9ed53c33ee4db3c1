"""`LLM`: the in-process engine. One process runs both phases with continuous batching.

It is the colocated role of the one instance runtime (model/instance.py), driven by the
caller's thread instead of a Ray actor: the colocated baseline, and the oracle the served
plans must match. Text (tokenizer, stop strings) is handled here, at the edge.
"""
from __future__ import annotations

import time

from engine.errors import InvalidRequestError
from engine.events import RequestFailed, StepTokens
from engine.request import FinishReason, Request
from engine.sampling_params import SamplingParams
from model.input_processor import InputProcessor
from model.instance import ColocatedWorker
from model.output_processor import Delta, OutputProcessor, RequestOutput
from model.rank_runtime import WorkerConfig


class _EventSink:
    """Where the LLM's worker emits its events."""
    __slots__ = ("events",)

    def __init__(self):
        self.events: list = []

    def __call__(self, events: list) -> None:
        self.events.extend(events)


class LLM:
    """Offline generation: `LLM().generate(["Hello"], SamplingParams(max_tokens=8))`.

    model: a model folder, a preset name (dummy weights) or "embedded" (the default).
    mode: "prefill_first" (a waiting prefill runs before the next decode step) or "chunked".
    async_scheduling: schedule and postprocess a step while the previous one runs on the device
    (model/async_step.py); None: DISAGG_ASYNC_SCHEDULING, else on for CUDA.
    """

    def __init__(self, model: str = "embedded", *, device: str = "cpu", dtype: str = "auto",
                 block_size: int = 16, num_kv_blocks: int = 0, max_batch_tokens: int = 4096,
                 max_batch_size: int = 64, max_model_len: int = 0, enable_prefix_caching: bool = True,
                 mode: str = "prefill_first", chunk_tokens: int = 512, seed: int = 0,
                 gpu_memory_utilization: float = 0.85, async_scheduling: bool | None = None):
        if mode not in ("prefill_first", "chunked"):
            raise ValueError(f"mode must be prefill_first or chunked, got {mode!r}")
        cfg = WorkerConfig(instance_id="llm", model=model, device=device, dtype=dtype, block_size=block_size,
                           num_kv_blocks=num_kv_blocks, gpu_memory_utilization=gpu_memory_utilization,
                           max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                           max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                           schedule=mode, chunk_tokens=chunk_tokens, seed=seed, max_queue=1 << 30,
                           async_scheduling=async_scheduling)
        self._sink = _EventSink()   # not a bound method of self: the worker must not keep the LLM alive
        self.core = ColocatedWorker(cfg, emit=self._sink)
        rt = self.core.rt
        self.model, self.cfg, self.tokenizer, self.runner = rt.model, rt.model_config, rt.tokenizer, rt.runner
        self.block_manager = self.core.bm
        self.max_model_len = rt.max_model_len
        self.inputs = InputProcessor(self.tokenizer, self.cfg.vocab_size, self.max_model_len,
                                     max_kv_tokens=rt.num_blocks * block_size, eos_token_ids=self.cfg.eos_token_ids)
        self.outputs = OutputProcessor(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self._results: dict[str, RequestOutput] = {}

    def close(self) -> None:
        """Free the model and its KV cache now. `del llm` does the same once nothing else holds
        the LLM (no reference cycle keeps them: a second LLM on the same GPU finds the memory
        free). A closed LLM refuses requests."""
        core = self.__dict__.pop("core", None)
        model = self.__dict__.get("model")
        on_gpu = model is not None and any(p.is_cuda for p in model.parameters())
        del model
        for name in ("model", "runner", "block_manager"):
            self.__dict__.pop(name, None)
        if core is not None:
            # The worker's parts refer back to it (its step isolation and async stepper hold its
            # methods): emptied, the cycles hold nothing, and the model and KV cache go now.
            rt = core.__dict__.get("rt")
            core.__dict__.clear()
            if rt is not None:
                rt.__dict__.clear()
        if on_gpu:      # what the runner's own cycles (graphs, tuned kernels) hold, now too
            import gc
            gc.collect()

    def __del__(self):
        try:
            self.close()
        except Exception:   # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Requests ---------------------------------------------------------------------------
    def add_request(self, prompt, sampling: SamplingParams | None = None, request_id: str | None = None) -> str:
        if "core" not in self.__dict__:
            raise RuntimeError("this LLM is closed")
        req = self.inputs.build(prompt, sampling, request_id, arrival_s=time.monotonic())
        if req.request_id in self.requests:
            raise InvalidRequestError("request_id", f"{req.request_id!r} is already running")
        self.core.add_request(req)
        self.requests[req.request_id] = req
        self.outputs.add(req.request_id, req.prompt_token_ids, req.sampling.stop)
        self._results[req.request_id] = RequestOutput(req.request_id, req.prompt_token_ids)
        return req.request_id

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.core.cancel(request_id)
            self.core.apply_cancels()
            self.outputs.discard(request_id)
            self._results[request_id].finish_reason = FinishReason.CANCELLED.value

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # The step ---------------------------------------------------------------------------
    def step(self) -> list[Delta]:
        preempted = self.core.num_preemptions
        if not self.core.step():
            if self.requests and self.core.num_preemptions == preempted:
                raise RuntimeError("scheduler made no progress: a request needs more KV blocks than exist")
            return []
        events, self._sink.events = self._sink.events, []
        deltas = [d for ev in events for d in self._postprocess(ev)]
        self.core.apply_cancels()       # requests a stop string ended leave the batch now
        return deltas

    def _postprocess(self, ev) -> list[Delta]:
        if isinstance(ev, RequestFailed):           # the step failed on this request alone
            rid = ev.request_id
            if self.requests.pop(rid, None) is not None:
                self.outputs.discard(rid)
                res = self._results[rid]
                res.finish_reason, res.error = FinishReason.ERROR.value, ev.message
            return []
        if not isinstance(ev, StepTokens):
            return []
        deltas = []
        for rid, toks in ev.tokens.items():
            req = self.requests.get(rid)
            if req is None:
                continue
            reason = ev.finished.get(rid)
            delta = self.outputs.process(rid, toks, reason)
            res = self._results[rid]
            res.token_ids += toks
            res.logprobs += ev.logprobs.get(rid, [])
            res.text += delta.text
            if delta.finish_reason and not reason:          # a stop string
                req.finish_reason, reason = FinishReason.STOP, FinishReason.STOP.value
                self.core.cancel(rid)
            if reason:
                res.finish_reason, res.num_cached_tokens, res.times = reason, req.num_cached_tokens, dict(req.times)
                del self.requests[rid]
            deltas.append(delta)
        return deltas

    def take_result(self, request_id: str) -> RequestOutput:
        return self._results.pop(request_id)

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run a batch of prompts (text or token-id lists) to completion; outputs in input order."""
        if isinstance(prompts, (str,)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError("sampling", f"{len(params)} parameter sets for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while self.has_unfinished:
            self.step()
        return [self.take_result(i) for i in ids]
