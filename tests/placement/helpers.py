"""Small hand-made deployments whose times are easy to compute by hand."""
import numpy as np

from placement.deployment import Deployment, InstanceGroup
from placement.gpus import get_device
from placement.latency_profile import FORMAT, ProfiledModel
from placement.workload import Workload

KV_BYTES = 1000          # bytes of KV per token
LINK_BW = 1e6            # 1 MB/s: 100 tokens of KV take 0.1 s
LINK_LATENCY_S = 0.01


def profile(prefill=(0.5, 0.005, 0.0), decode=(0.1, 0.0, 0.0)) -> dict:
    return {"format": FORMAT, "device": "H100", "model": "toy",
            "tp": {"1": {"prefill": dict(zip("abc", prefill)), "decode": dict(zip("abc", decode))}},
            "kv_transfer": {"intra_node": {"bandwidth": LINK_BW, "latency_s": LINK_LATENCY_S},
                            "inter_node": {"bandwidth": LINK_BW / 10, "latency_s": LINK_LATENCY_S}}}


def group(num_instances=1, num_blocks=1000, max_batch_tokens=8192, mode="prefill_first", prof=None,
          max_batch_size=256, chunk_tokens=512):
    return InstanceGroup(num_instances, ProfiledModel(prof or profile()), get_device("H100"), num_blocks,
                         max_batch_tokens, max_batch_size, mode=mode, chunk_tokens=chunk_tokens)


def disagg(prefill=None, decode=None, block_size=16) -> Deployment:
    return Deployment(block_size, KV_BYTES, prefill=prefill or group(), decode=decode or group())


def workload(arrivals, prompts, outputs) -> Workload:
    return Workload("hand", np.array(arrivals, dtype=float), np.array(prompts), np.array(outputs))
