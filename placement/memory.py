"""How much KV cache an instance holds once its weights are loaded."""
from __future__ import annotations

from engine.model_config import ModelConfig
from placement.gpus import DeviceSpec


def activation_bytes(model: ModelConfig, max_batch_tokens: int, tp: int) -> float:
    """Peak activation memory per rank for a pass of `max_batch_tokens` tokens: the residual
    stream, q/k/v and the MLP's gate and up projections of one layer at a time."""
    h, i = model.hidden_size, model.intermediate_size
    per_token = 2 * h + (model.q_size + 2 * model.kv_size) / tp + 2 * i / tp
    return max_batch_tokens * per_token * model.dtype_bytes()


def kv_capacity_tokens(model: ModelConfig, device: DeviceSpec, tp: int, pp: int,
                       gpu_memory_utilization: float = 0.9, max_batch_tokens: int = 8192) -> int:
    """Tokens of KV an instance of tp x pp devices holds; 0 when the weights do not fit.
    Layers are split evenly over stages, so the instance's memory can be pooled."""
    ranks = tp * pp
    usable = ranks * device.memory_bytes * gpu_memory_utilization
    free = usable - model.weight_bytes() - ranks * activation_bytes(model, max_batch_tokens, tp)
    if free <= 0:
        return 0
    return int(free // model.kv_bytes_per_token())


def num_kv_blocks(model: ModelConfig, device: DeviceSpec, tp: int, pp: int, block_size: int,
                  gpu_memory_utilization: float = 0.9, max_batch_tokens: int = 8192) -> int:
    """KV blocks of `block_size` tokens an instance holds (0 when the weights do not fit)."""
    return kv_capacity_tokens(model, device, tp, pp, gpu_memory_utilization,
                              max_batch_tokens) // block_size
