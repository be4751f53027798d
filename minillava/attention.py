"""Padding-free micro-batches: pack a spliced, right-padded batch into one sequence, and the varlen attention that
keeps its samples apart (--padding_free True).

`pack_batch` turns (B, T, D) embeddings into (1, N, D), N = real tokens only, with position_ids restarting at 0 per
sample and cu_seqlens. `varlen_attention_forward` is registered with transformers' AttentionInterface under
VARLEN_ATTENTION; LlamaModel.forward(**kwargs) hands it cu_seq_lens_q/k and max_length_q/k. On CUDA in bf16/fp16 it
runs flash-attn's flash_attn_varlen_func when installed, else torch.nn.attention.varlen.varlen_attn; elsewhere (CPU,
fp32) SDPA with a block-diagonal causal mask, so the same path runs in the CPU tests. Shapes: `# (N, H, Dh)` comments.
"""

import functools
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillava.constants import IGNORE_INDEX

VARLEN_ATTENTION = "minillava_varlen"  # the LLM's config._attn_implementation when --padding_free True
BACKENDS = ("auto", "flash_attn", "torch", "sdpa")


@dataclass(frozen=True)
class PackedBatch:
    """One micro-batch as a single sequence of its real tokens (no padding row or column)."""

    embeds: Tensor  # (1, N, D)
    targets: Tensor  # (1, N) next-token label within the same sample; -100 at each sample's last token
    position_ids: Tensor  # (1, N) 0, 1, ... restarting at every sample
    cu_seqlens: Tensor  # (B + 1,) int32 sample boundaries in the packed sequence
    max_len: int  # longest sample

    def attention_kwargs(self) -> dict[str, Any]:
        """The kwargs LlamaModel.forward passes down to every attention call (transformers' FlashAttentionKwargs)."""
        cu = self.cu_seqlens
        return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=self.max_len, max_length_k=self.max_len)


def pack_batch(embeds: Tensor, labels: Tensor, attention_mask: Tensor) -> PackedBatch:
    """Keep the positions where attention_mask is True, sample after sample, as one (1, N) sequence.

    Targets are shifted inside each sample before packing: position t of sample b predicts labels[b, t + 1] only if
    t + 1 is still in sample b, so the last token of sample i never predicts the first token of sample i + 1. These
    are exactly the (hidden, label) pairs of the padded path's hidden[:, :-1] / labels[:, 1:], in the same order.
    """
    B = embeds.shape[0]  # embeds (B, T, D)
    mask = attention_mask.bool()  # (B, T)
    next_real = torch.cat([mask[:, 1:], mask.new_zeros(B, 1)], dim=1)  # (B, T) position t + 1 is in the sample
    shifted = torch.cat([labels[:, 1:], labels.new_full((B, 1), IGNORE_INDEX)], dim=1)  # (B, T)
    targets = torch.where(next_real, shifted, IGNORE_INDEX)
    positions = mask.long().cumsum(1) - 1  # (B, T) index of each real token within its sample
    lengths = mask.sum(1)  # (B,)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (B + 1,)
    return PackedBatch(
        embeds=embeds[mask][None],  # (1, N, D), row-major = sample by sample
        targets=targets[mask][None],
        position_ids=positions[mask][None],
        cu_seqlens=cu_seqlens,
        max_len=int(lengths.max()),
    )


def block_causal_mask(cu_seqlens: Tensor, n: int) -> Tensor:
    """(N, N) bool, True where query i may attend key j: same sample and j <= i (the fallback's SDPA mask)."""
    idx = torch.arange(n, device=cu_seqlens.device)
    sample = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)  # (N,) sample index of each position
    return (sample[:, None] == sample[None, :]) & (idx[None, :] <= idx[:, None])


@functools.cache
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _torch_varlen() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn  # absent from older torch releases
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _torch_varlen_params() -> frozenset[str]:
    return frozenset(inspect.signature(_torch_varlen()).parameters)


def _torch_varlen_causal(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int, scale: float | None
) -> Tensor:
    """torch's varlen_attn across its API versions: early releases take is_causal and no scale / enable_gqa; later
    ones take scale and window_size, (-1, 0) being causal (varlen_attn compares against that exact tuple)."""
    params = _torch_varlen_params()
    kw: dict[str, Any] = {}
    if "window_size" in params:
        kw.update(window_size=(-1, 0), scale=scale)
    else:
        kw["is_causal"] = True
        if scale is not None:  # no scale argument: fold it into q (the kernel applies 1/sqrt(Dh))
            q = q * (scale * q.shape[-1] ** 0.5)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = _repeat_kv(q, k, v)
    return _torch_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kw)


def _repeat_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """GQA by repetition, in transformers' repeat_kv head order: (N, Hkv, Dh) -> (N, Hq, Dh)."""
    return tuple(x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))


def resolve_backend(q: Tensor, backend: str = "auto") -> str:
    """auto: flash_attn (if installed), else torch's varlen_attn, for CUDA bf16/fp16; sdpa (masked) otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"varlen attention backend {backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return "sdpa"  # the flash kernels have no fp32 and no CPU version
    if _has_flash_attn():
        return "flash_attn"
    return "torch" if _torch_varlen() is not None else "sdpa"


def varlen_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int, scale: float | None, backend: str = "auto"
) -> Tensor:
    """Causal attention within each [cu_seqlens[i], cu_seqlens[i + 1]) segment. (N, Hq, Dh), (N, Hkv, Dh) x2 ->
    (N, Hq, Dh). GQA (Hq a multiple of Hkv) is handled by every backend."""
    backend = resolve_backend(q, backend)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=scale, causal=True
        )
    if backend == "torch":
        return _torch_varlen_causal(q, k, v, cu_seqlens, max_len, scale)
    if q.shape[1] != k.shape[1]:  # repeat rather than SDPA's enable_gqa: a SymBool argument breaks torch.compile
        k, v = _repeat_kv(q, k, v)
    mask = block_causal_mask(cu_seqlens, q.shape[0])  # (N, N): O(N^2) memory, a CPU / fp32 correctness path
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )  # (Hq, N, Dh)
    return out.transpose(0, 1)


def varlen_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention-interface function: (1, H, N, Dh) packed q/k/v -> ((1, N, H, Dh), None).

    Self-attention only, so cu_seq_lens_k / max_length_k (equal to the q ones) arrive in kwargs and are unused."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(
            f"{VARLEN_ATTENTION} attention needs one packed sequence with cu_seq_lens_q/max_length_q and no mask "
            "(LlavaModel.forward with --padding_free True builds them); use sdpa for padded batches"
        )
    if dropout:
        raise ValueError(f"{VARLEN_ATTENTION} attention has no dropout (Llama's attention_dropout is 0)")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (N, H, Dh)
    out = varlen_causal_attention(q, k, v, cu_seq_lens_q, max_length_q, scaling)
    return out[None], None


def register_varlen_attention() -> str:
    """Register varlen_attention_forward with transformers (idempotent); returns its attn_implementation name.

    The name is deliberately absent from transformers' mask registry, so create_causal_mask returns the mask it
    was given (None): no (N, N) mask is ever built on the packed path."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION
