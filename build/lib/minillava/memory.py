"""How many decoder layers to checkpoint: an analytic per-rank memory estimate (no torch.distributed).

--gradient_checkpointing auto checkpoints the fewest decoder layers whose estimate fits the device's BUDGET; True
keeps LLaVA's meaning (every layer), False none. The estimate follows what a rank holds at its peak, laid out as
distributed.apply_fsdp lays it out (checked against traces of the real step: `python -m minillava.plan`, and
tests/test_memory.py on a grid of configs):
  static: trainable parameters as fp32 masters + fp32 gradients + AdamW's two fp32 moments, sharded over the shard
    group (every rank, or with --hsdp the ranks of a node); frozen weights in their stored dtype, sharded when they
    sit in an FSDP unit (LoRA's base weights) and whole when they do not (the tower; stage 1's whole LLM).
  gathered: the compute-dtype copies FSDP2 all-gathers: the root unit (embeddings, norm, lm_head, projector) for the
    whole step, and two decoder layers at a time (the current and the prefetched one), or, with
    --reshard_after_forward False, every layer from its forward to its backward.
  activations: per token of the largest micro-batch, per decoder layer, what autograd saves for the backward
    (saved_bytes_per_token, measured with saved-tensor hooks in tests/test_memory.py), or only the layer's input for
    a checkpointed one (the first k layers are; the backward recomputes one at a time once the others are freed).
  working set: the larger of the loss's (a (C, V) logits chunk in fp32 and in the compute dtype, lm_head's fp32
    gradient) and one layer's backward (its weight gradients unsharded, their fp32 copy for the reduce-scatter,
    and the gradients of its largest intermediates).
"""

import os
from dataclasses import dataclass

import torch
from torch import nn

from minillava.backbones import LLM_FAMILIES
from minillava.lora import LoRALinear, is_lora_param

BUDGET = 0.85  # of the device's memory: headroom for the allocator's fragmentation and the collectives' buffers


def saved_bytes_per_token(llm_config, trained: bool, bf16: bool, lora_r: int = 0, lora_dropout: float = 0.0) -> int:
    """Bytes one decoder layer saves for the backward, per token (D hidden, Q = heads x head_dim, K = kv heads x
    head_dim, I intermediate).

    fp32: both norms' inputs (2D), q and the attention output (2Q), k and v (2K), the MLP's gate, up and SiLU(gate)
    (3I), rotary cos and sin, the log-sum-exp, the norms' rstd; a trained layer also keeps its linears' inputs and the
    norms' normalised states (4D + I). bf16: the same in 2 bytes, except that each RMSNorm keeps an fp32 copy of its
    input (the norm upcasts) and the attention output is saved twice (the kernel's, and o_proj's contiguous input).
    q/k norms (Qwen3): an fp32 copy of q and k and a per-head rstd, and when trained their normalised states.
    LoRA (lora_r > 0, frozen base): each adapter keeps its input for lora_A's gradient and lora_A's r outputs. Without
    dropout the 7 linears read 2D + I distinct inputs (the two normed states, the MLP product); with it, each keeps
    its own dropped copy and the dropout mask of its 5D + Q + I inputs, the mask in the activation dtype as torch's
    unfused dropout saves it (the CPU path the planner traces; CUDA's fused kernel keeps a 1-byte mask)."""
    D, inter, H = llm_config.hidden_size, llm_config.intermediate_size, llm_config.num_attention_heads
    kv = getattr(llm_config, "num_key_value_heads", None) or H
    head = getattr(llm_config, "head_dim", None) or D // H
    Q, K, act = H * head, kv * head, 2 if bf16 else 4
    extra = 0
    if LLM_FAMILIES.get(getattr(llm_config, "model_type", None), LLM_FAMILIES["llama"]).qk_norm:
        extra += 4 * (Q + K) + 4 * (H + kv) + (act * (Q + K) if trained else 0)
    if lora_r:
        extra += ((5 * D + Q + inter) * 2 if lora_dropout > 0 else 2 * D + inter) * act + 7 * lora_r * act
    if not bf16:
        return 4 * (2 * D + 2 * Q + 2 * K + 3 * inter + 2 * head + H + 2 + (4 * D + inter if trained else 0)) + extra
    frozen = 8 * D + 4 * Q + 4 * K + 6 * inter + 4 * H + 4 * head + 8
    return frozen + (8 * D + 2 * inter if trained else 0) + extra


@dataclass(frozen=True)
class CheckpointPlan:
    layers: int  # decoder layers to checkpoint (the first `layers`)
    total_layers: int
    estimate_bytes: int
    budget_bytes: int
    mode: str  # what was asked: True, False or auto
    shard_group: int = 1  # ranks each sharded parameter is split over (the estimate's)

    def describe(self) -> str:
        gib = 2**30
        return (
            f"memory plan: peak {self.estimate_bytes / gib:.1f} GiB per rank on a "
            f"{self.budget_bytes / BUDGET / gib:.1f} GiB device ({BUDGET:.0%} of it usable); activation "
            f"checkpointing ({self.mode}): {self.layers} of {self.total_layers} decoder layers"
        )


def device_memory(device: torch.device) -> int:
    """Bytes of the device: the GPU's total memory, or the host's physical memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def micro_batch_tokens(lengths: list[int], padding_free: bool) -> int:
    """LLM positions a micro-batch of samples with these lengths takes: their sum packed, batch x longest padded."""
    return sum(lengths) if padding_free else len(lengths) * max(lengths, default=0)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def estimate(model: nn.Module, train_args, shard_group: int, lengths: list[int], checkpointed: int) -> int:
    """Peak bytes per rank of `model` (meta-built LlavaModel, trainable set applied, frozen weights in their stored
    dtype) with `checkpointed` layers checkpointed, for a micro-batch of samples with these LLM lengths."""
    t, layers, cfg = train_args, model.decoder_layers(), model.llm.config
    tokens = micro_batch_tokens(lengths, t.padding_free)
    img = model.num_image_tokens  # a sample longer than an image holds one; the rest of it may all be labels
    labels = sum(n - img if n > img else n for n in lengths)
    n_layers, act = len(layers), 2 if t.bf16 else 4
    params = list(model.parameters())
    llm_trains = any(p.requires_grad for p in model.llm.parameters())
    # distributed.apply_fsdp: with the LLM trained everything but the tower is sharded; else only the projector
    tower = {id(p) for p in model.vision_tower.parameters()}
    in_units = [p for p in params if id(p) not in tower] if llm_trains else list(model.mm_projector.parameters())
    unit_ids = {id(p) for p in in_units}
    trainable = _numel(p for p in params if p.requires_grad)
    sharded_frozen = sum(p.numel() * p.element_size() for p in in_units if not p.requires_grad)
    whole = sum(p.numel() * p.element_size() for p in params if id(p) not in unit_ids)
    masters = (12 * trainable + sharded_frozen) // shard_group + whole  # weights and AdamW's moments
    grads = 4 * trainable // shard_group
    layer = _numel(layers[0].parameters()) if llm_trains else 0
    root = act * (_numel(in_units) - n_layers * layer)  # the root unit gathered (stage 1: the projector)
    gathered = act * layer * (n_layers if not t.reshard_after_forward else min(2, n_layers))
    adapters = [m for m in layers[0].modules() if isinstance(m, LoRALinear)]
    lora_r = adapters[0].lora_A.out_features if adapters else 0
    trained_layer = any(p.requires_grad for n, p in layers[0].named_parameters() if not is_lora_param("." + n))
    layer_trainable = _numel(p for p in layers[0].parameters() if p.requires_grad) if llm_trains else 0
    full = saved_bytes_per_token(cfg, trained_layer, t.bf16, lora_r, t.lora_dropout if adapters else 0.0)
    D, V, inter = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    # outside the layers: the embeddings, the final norm's saved input and output, the labelled rows' hidden states
    outside = tokens * D * (act * 3 + 4 * (act == 2))
    loss = min(labels, model.loss_chunk_size) * V * (4 + (act == 2) * 2)  # fp32 logits + the compute-dtype ones
    head_grad = V * D * (4 + act) if model.llm.lm_head.weight.requires_grad else 0
    # its gradients unsharded in the compute dtype, and their fp32 copy for the reduce-scatter
    layer_backward = tokens * (2 * inter + 2 * D) * act + layer_trainable * (act + 4)
    k = checkpointed
    saved = tokens * ((n_layers - k) * full + k * D * act)
    base = masters + root + outside
    phases = {
        "forward end (the loss)": base + gathered + saved + loss + head_grad,
        "backward, last layer": base + gathered + saved + head_grad + layer_backward,
        # the backward reaches the checkpointed layers: n - k layers' gradients made, their activations freed
        "backward, first recompute": base + grads * (n_layers - k) // max(n_layers, 1) + tokens * k * D * act
        + tokens * full * (k > 0) + layer_backward + 2 * act * layer,
        "optimizer step": base + grads,
    }
    return max(phases.values())


def plan_checkpointing(
    model: nn.Module, train_args, shard_group: int, device_bytes: int, lengths: list[int] | None = None
) -> CheckpointPlan:
    """The plan for `model` (meta-built LlavaModel, trainable set applied) under `train_args`. shard_group: ranks
    each sharded parameter is split over; lengths: the LLM lengths of the largest micro-batch's samples (default
    per_device_train_batch_size samples of model_max_length)."""
    t, n_layers = train_args, len(model.decoder_layers())
    lengths = lengths or [t.model_max_length] * t.per_device_train_batch_size
    budget = int(device_bytes * BUDGET)
    mode = t.gradient_checkpointing
    if mode == "auto":
        fits = (k for k in range(n_layers + 1) if estimate(model, t, shard_group, lengths, k) <= budget)
        k = next(fits, n_layers)
    else:
        k = n_layers if mode else 0
    return CheckpointPlan(k, n_layers, estimate(model, t, shard_group, lengths, k), budget, str(mode), shard_group)
