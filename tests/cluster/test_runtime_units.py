"""The pieces of the instance runtime without Ray: routing between pools, the transport
registry, and the colocated role's events (tokens and load, never polled)."""
import pytest

from engine.errors import ConfigError, OverloadedError
from engine.events import LoadChanged, StepTokens
from engine.routing import PD_ROUTE, pick_route
from engine.sampling_params import SamplingParams
from kv_transfer import transports
from model.instance import ColocatedWorker, RequestSpec
from model.llm import LLM
from model.rank_runtime import WorkerConfig


def test_route_goes_to_the_least_loaded_pool_ties_to_colocated():
    assert pick_route([0.0], 0.0) == 0                      # tie: no KV hand-over
    assert pick_route([1.0], 0.5) == PD_ROUTE
    assert pick_route([2.0, 1.0], 1.0) == 1                 # least loaded colocated instance
    assert pick_route([], 3.0) == PD_ROUTE
    assert pick_route([5.0], None) == 0                     # no live pool
    with pytest.raises(ValueError):
        pick_route([], None)


def test_transports_are_chosen_by_what_they_can_do():
    assert transports.choose("auto", "cpu", False, True).name == "gloo"
    assert transports.choose("auto", "cuda", False, False).name == "nccl"
    ipc = transports.choose("auto", "cuda", True, True)
    assert ipc.name == "cuda_ipc" and ipc.moves_block_ids and not ipc.layerwise
    with pytest.raises(ConfigError, match="nccl: it cannot connect two ranks on one GPU.*use cuda_ipc"):
        transports.choose("nccl", "cuda", True, True)
    with pytest.raises(ConfigError, match="cuda_ipc: it needs prefill and decode on one node; use nccl"):
        transports.choose("cuda_ipc", "cuda", False, False)
    with pytest.raises(ConfigError, match="nccl: it moves CUDA tensors; these instances run on CPU; use gloo"):
        transports.choose("nccl", "cpu", False, True)
    with pytest.raises(ValueError, match="unknown KV transport 'rdma'"):
        transports.get("rdma")


def test_colocated_worker_emits_tokens_and_load_and_matches_llm():
    events = []
    # The sync loop (async scheduling finishes a step during the next call: test_async_scheduling).
    cfg = WorkerConfig(instance_id="c", model="tiny-llama", num_kv_blocks=32, max_queue=2,
                       schedule="chunked", chunk_tokens=16, async_scheduling=False)
    w = ColocatedWorker(cfg, emit=events.extend)
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    prompts = [list(range(3, 40)), list(range(50, 60))]
    for i, p in enumerate(prompts):
        w.add(RequestSpec(f"r{i}#0", p, sp))
    with pytest.raises(OverloadedError):
        w.add(RequestSpec("r9#0", [5, 6], sp))             # max_queue=2 waiting already
    got = {f"r{i}#0": [] for i in range(2)}
    while w.requests:
        assert w.step()
    for ev in events:
        assert isinstance(ev, StepTokens) and ev.load is not None
        for rid, toks in ev.tokens.items():
            got[rid] += toks
    assert events[-1].load.free_blocks == 32 and events[-1].load.num_running == 0
    want = [o.token_ids for o in LLM("tiny-llama").generate(prompts, sp)]
    assert [got["r0#0"], got["r1#0"]] == want

    events.clear()
    w.add(RequestSpec("x#0", list(range(3, 40)), SamplingParams(max_tokens=50, ignore_eos=True)))
    assert w.step() and w.bm.num_free_blocks < 32
    assert w.cancel("x#0")
    assert not w.step(), "nothing left to run"
    assert isinstance(events[-1], LoadChanged) and events[-1].load.free_blocks == 32, \
        "blocks freed outside a step are reported without being asked"


def test_one_builder_and_one_step_loop_serve_every_role():
    """No second copy of the runtime: the model, KV cache, runner and sampler are built in
    RankRuntime only, and every role, the in-process LLM and the profiler step through StepLoop."""
    import pathlib
    import re

    from cluster.profile import StepTimer
    from decode_worker.worker import DecodeWorker
    from model.instance import StepLoop
    from prefill_worker.worker import PrefillWorker
    root = pathlib.Path(__file__).resolve().parents[2]
    builds = re.compile(r"\b(build_model|allocate_kv_cache|ModelRunner|Sampler)\(")
    where = sorted({str(p.relative_to(root)) for pkg in ("model", "cluster", "prefill_worker", "decode_worker")
                    for p in (root / pkg).rglob("*.py")
                    if any(builds.search(line) and not line.lstrip().startswith(("def ", "class ", "#"))
                           for line in p.read_text().splitlines())})
    assert where == ["model/rank_runtime.py"], where
    assert all(issubclass(c, StepLoop) for c in (ColocatedWorker, PrefillWorker, DecodeWorker))
    for cls in (ColocatedWorker, PrefillWorker, DecodeWorker):
        assert cls.step is StepLoop.step, f"{cls.__name__} has its own step"
    assert ColocatedWorker.run is StepLoop.run and DecodeWorker.run is StepLoop.run
    assert isinstance(LLM("tiny-llama", num_kv_blocks=16).core, ColocatedWorker)
    timer = StepTimer("tiny-llama", "cpu", "auto", 16, 64)
    assert type(timer.loop) is StepLoop and timer.time(timer.decode_step(2, 32), 0, 1) > 0
