"""PrefillWorker without Ray: block accounting around release, cancel and prefix sharing."""
import threading

from engine.events import FirstToken
from engine.sampling_params import SamplingParams
from model.rank_runtime import WorkerConfig
from prefill_worker.worker import PrefillSpec, PrefillWorker


def _worker():
    events = []
    w = PrefillWorker(WorkerConfig(instance_id="p", model="tiny-llama", num_kv_blocks=64, kv_timeout_s=1.0),
                      emit=events.extend)
    return w, events


def _spec(rid, n=40):
    return PrefillSpec(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=4), peer="d",
                       dst_block_ids=list(range(n // 16 + 1)))


def test_release_that_arrives_while_the_prefill_runs_frees_after_the_step():
    w, events = _worker()
    w.add(_spec("a#0"))
    started = threading.Event()
    original = w.rt.runner.execute

    def execute(step, layer_hook=None):
        started.set()
        assert w.release("a#0"), "a release during the prefill is accepted"
        return original(step, layer_hook)
    w.rt.runner.execute = execute
    assert w.step()
    assert started.is_set()
    assert w.bm.num_free_blocks == w.bm.num_blocks and not w.held and not w.requests
    assert not [e for e in events if isinstance(e, FirstToken)], "a released attempt reports no token"


def test_release_of_a_queued_request_drops_it_and_unknown_ids_are_ignored():
    w, _ = _worker()
    w.add(_spec("q#0"))
    assert w.release("q#0")
    assert not w.step() and w.bm.num_free_blocks == w.bm.num_blocks
    assert not w.release("nope#0")


def test_cancelled_before_prefill_leaves_no_prefix_hits():
    w, _ = _worker()
    w.add(_spec("x#0", 48))
    w.policy.schedule(0.0)                 # allocates blocks; the prefill never runs
    req = w.requests["x#0"]
    from engine.request import RequestState
    req.state = RequestState.QUEUED        # as if the budget left it at the head of the queue
    w.policy.waiting.appendleft(req)
    assert w.cancel("x#0")
    w.add(_spec("y#0", 48))
    assert w.step()
    assert w.held["y#0"].num_cached_tokens == 0, "blocks with no KV were offered as a prefix"
