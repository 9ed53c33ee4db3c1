"""The paged KV cache tensor of one rank and how many blocks fit in memory."""
from __future__ import annotations

import torch

from engine.model_config import ModelConfig

CPU_KV_BUDGET_BYTES = 512 * 2**20


def block_bytes(cfg: ModelConfig, block_size: int, num_layers: int, num_kv_heads: int, dtype: torch.dtype) -> int:
    return num_layers * 2 * block_size * num_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


def num_blocks_for_memory(cfg: ModelConfig, block_size: int, num_layers: int, num_kv_heads: int,
                          dtype: torch.dtype, device: str, gpu_memory_utilization: float = 0.85,
                          gpu_share: float = 1.0, max_batch_tokens: int = 4096, tp_size: int = 1) -> int:
    """Blocks that fit: on CUDA, this rank's share of the GPU times the utilisation target, minus
    what the process holds already (weights) and a headroom for activations; on CPU, a fixed
    budget (CPU_KV_BUDGET_BYTES)."""
    per_block = block_bytes(cfg, block_size, num_layers, num_kv_heads, dtype)
    if not str(device).startswith("cuda"):
        return max(16, CPU_KV_BUDGET_BYTES // per_block)
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    used = torch.cuda.memory_allocated(torch.device(device))
    elt = torch.tensor([], dtype=dtype).element_size()
    act = max_batch_tokens * (8 * cfg.hidden_size + 3 * cfg.intermediate_size // tp_size) * elt * 2
    budget = int(total * gpu_memory_utilization * min(1.0, gpu_share)) - used - act - 512 * 2**20
    if budget < per_block * 16:
        raise RuntimeError(f"not enough GPU memory for a KV cache: {budget / 2**30:.2f} GiB left after "
                           f"weights ({used / 2**30:.2f} GiB); lower max_batch_tokens or use more GPUs")
    return budget // per_block


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""
    return torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
