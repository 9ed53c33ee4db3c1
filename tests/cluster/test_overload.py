"""Above capacity the endpoint answers RESOURCE_EXHAUSTED quickly, memory stays flat, and every
block is free once the load stops."""
import threading
import time

import grpc
import pytest

from cluster.grpc_client import make_request
from engine.sampling_params import SamplingParams
from protos import inference_pb2_grpc as pb_grpc
from tests.cluster.servers import Server, record
from tests.cluster.test_runtime import _all_free  # noqa: F401 - same check as the runtime tests

MODEL = "tiny-llama"
LOAD_S = 8.0
CLIENTS = 48


def _rss_total(srv):
    import os
    st = srv.stats()
    actors = sum(w.get("rss_bytes", 0) for w in st["workers"].values())
    with open(f"/proc/{os.getpid()}/status") as f:
        own = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return actors + own


@pytest.mark.timeout(300)
def test_overload_is_refused_quickly_memory_flat_and_drained(ray_session):
    srv = Server({"model": MODEL, "prefill": {"max_queue": 4}, "decode": {"num_kv_blocks": 48}}, max_pending=4)
    try:
        counts: dict[str, int] = {}
        reject_latency: list[float] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + LOAD_S
        sp = SamplingParams(max_tokens=24, ignore_eos=True)

        def client(k):
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = pb_grpc.InferenceStub(ch)
                i = 0
                while time.monotonic() < stop_at:
                    t0 = time.monotonic()
                    try:
                        out = list(stub.Generate(make_request([(k * 7 + i) % 250 + 3] * 40, sp), timeout=60))
                        # Every accepted request streams exactly the asked length.
                        code = "OK" if sum(len(r.token_ids) for r in out) == sp.max_tokens else "WRONG_LENGTH"
                    except grpc.RpcError as e:
                        code = e.code().name
                        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            with lock:
                                reject_latency.append(time.monotonic() - t0)
                            time.sleep(0.02)
                    with lock:
                        counts[code] = counts.get(code, 0) + 1
                    i += 1

        srv.stats()
        rss = []
        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append(_rss_total(srv))
            time.sleep(0.5)
        for t in threads:
            t.join()
        assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, counts
        assert counts.get("RESOURCE_EXHAUSTED", 0) > 0 and counts.get("OK", 0) > 0, counts
        reject_latency.sort()
        p99 = reject_latency[int(0.99 * (len(reject_latency) - 1))]
        assert p99 < 1.0, f"refusals must be quick, p99 {p99:.3f} s"
        half = len(rss) // 2
        growth = max(rss[half:]) - max(rss[:half])
        assert growth < 0.15 * max(rss[:half]), f"memory grew {growth / 2**20:.0f} MiB under steady overload"
        st = srv.wait_all_free(30)
        assert st["num_pending"] == 0
        record("overload", {"clients": CLIENTS, "seconds": LOAD_S, "ok": counts.get("OK", 0),
                            "resource_exhausted": counts.get("RESOURCE_EXHAUSTED", 0),
                            "reject_p50_ms": 1e3 * reject_latency[len(reject_latency) // 2], "reject_p99_ms": 1e3 * p99,
                            "rss_first_half_mib": max(rss[:half]) / 2**20, "rss_second_half_mib": max(rss[half:]) / 2**20,
                            "blocks_free_after": True})
    finally:
        srv.close()
