"""How many decoder layers to checkpoint: an analytic per-rank memory estimate (no torch.distributed).

--gradient_checkpointing auto checkpoints the fewest decoder layers whose estimate fits the device; True keeps
LLaVA's meaning (every layer), False none. The estimate, per rank:
  static: trainable parameters as fp32 masters + fp32 gradients + AdamW's two fp32 moments, frozen ones in their
    stored dtype, all sharded over the FSDP world; plus the gathered compute-dtype weights FSDP2 holds at a time
    (the root's embeddings and lm_head, the tower, two decoder layers: the current one and the prefetched one).
  activations: per token of the longest micro-batch (per_device_train_batch_size x model_max_length), per decoder
    layer, what autograd saves for the backward (saved_per_token), or only the layer's input when checkpointed (the
    first k layers are; the backward recomputes them one at a time once the others are freed); plus a loss chunk.
saved_per_token counts the tensors a LlamaDecoderLayer saves, by storage, as measured with saved-tensor hooks
(tests/test_memory.py, exact on three shapes): a frozen linear saves no activation (its input gradient needs only
the weight), so a frozen layer keeps 4D + 2 D_kv + 3I + small terms per token and a trained one 4D + I more.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn

BUDGET = 0.85  # of the device's memory: headroom for the allocator's fragmentation and the collectives' buffers


def saved_per_token(llm_config, trained: bool) -> int:
    """Elements one decoder layer saves for the backward, per token (activation dtype; fp32 statistics included)."""
    D, inter, H = llm_config.hidden_size, llm_config.intermediate_size, llm_config.num_attention_heads
    kv = getattr(llm_config, "num_key_value_heads", None) or H
    head = getattr(llm_config, "head_dim", None) or D // H
    # frozen: both norms' inputs and q / attention output (4D), k and v, the MLP's gate, up and SiLU(gate) (3I), rotary
    # cos and sin, the log-sum-exp, the norms' rstd
    n = 4 * D + 2 * kv * head + 3 * inter + 2 * head + H + 2
    # trained: the linears' inputs (both normed states, the attention output, the gated product) and the norms'
    # normalised states their weights' gradients need
    return n + (4 * D + inter if trained else 0)


@dataclass(frozen=True)
class CheckpointPlan:
    layers: int  # decoder layers to checkpoint (the first `layers`)
    total_layers: int
    estimate_bytes: int
    budget_bytes: int
    mode: str  # what was asked: True, False or auto

    def describe(self) -> str:
        gb = 1e9
        return (
            f"activation checkpointing ({self.mode}): {self.layers} of {self.total_layers} decoder layers; "
            f"memory estimate {self.estimate_bytes / gb:.1f} GB of a {self.budget_bytes / gb:.1f} GB budget per rank"
        )


def device_memory(device: torch.device) -> int:
    """Bytes of the device: the GPU's total memory, or the host's physical memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def plan_checkpointing(model: nn.Module, train_args, world_size: int, device_bytes: int) -> CheckpointPlan:
    """The plan for `model` (meta-built LlavaModel, trainable set applied) under `train_args`."""
    t, layers = train_args, model.decoder_layers()
    n_layers, act = len(layers), 2 if t.bf16 else 4
    params = list(model.parameters())
    trainable = _numel(p for p in params if p.requires_grad)
    frozen = _numel(p for p in params if not p.requires_grad)
    static = (trainable * 16 + frozen * (2 if t.bf16 else 4)) // world_size
    layer_params = _numel(layers[0].parameters())
    gathered = act * (_numel(params) - n_layers * layer_params + 2 * layer_params)
    tokens = t.per_device_train_batch_size * t.model_max_length
    cfg = model.llm.config
    full = saved_per_token(cfg, any(p.requires_grad for p in layers[0].parameters())) * act
    logits = 2 * 2048 * cfg.vocab_size * 4  # a loss chunk's fp32 logits and softmax
    fixed = static + gathered + logits + tokens * cfg.hidden_size * act * 2  # + embeddings and the final norm

    def estimate(k: int) -> int:
        # The first k layers are checkpointed: the backward frees the last n - k layers' activations before it
        # recomputes any checkpointed one, so the peak holds (n - k) layers' activations, or one recomputed layer.
        return fixed + tokens * (max(n_layers - k, 1 if k else 0) * full + k * cfg.hidden_size * act)

    budget = int(device_bytes * BUDGET)
    mode = t.gradient_checkpointing
    if mode == "auto":
        k = next((k for k in range(n_layers + 1) if estimate(k) <= budget), n_layers)
    else:
        k = n_layers if mode else 0
    return CheckpointPlan(k, n_layers, estimate(k), budget, str(mode))
