"""Varlen attention for padding-free micro-batches (--padding_free True): one packed sequence per micro-batch,
attention kept inside each sample.

The packed layout itself (positions restarting at 0 per sample, cu_seqlens, shifted labels) is built on the host by
minillava/layout.py. `varlen_attention_forward` is registered with transformers' AttentionInterface under
VARLEN_ATTENTION; LlamaModel.forward(**kwargs) hands it cu_seq_lens_q/k, max_length_q/k and our segment_lengths.
On CUDA in bf16/fp16 it runs flash-attn's flash_attn_varlen_func when installed, else torch's
nn.attention.varlen.varlen_attn; elsewhere (CPU, fp32) causal SDPA on each segment in turn, so the same path runs in
the CPU tests. Shapes: `# (N, H, Dh)` comments.
"""

import contextlib
import functools
import importlib.util
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARLEN_ATTENTION = "minillava_varlen"  # the LLM's config._attn_implementation when --padding_free True
PADDED_SDPA = "minillava_sdpa"  # ... for padded batches with --attn_implementation sdpa (the default)
BACKENDS = ("auto", "flash_attn", "torch", "sdpa")


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


_AS_ON_CUDA = [False]


@contextlib.contextmanager
def as_on_cuda():
    """Choose the backend CUDA tensors would get (minillava.plan traces on fake CPU tensors)."""
    _AS_ON_CUDA[0] = True
    try:
        yield
    finally:
        _AS_ON_CUDA[0] = False


def resolve_backend(q: Tensor, backend: str = "auto") -> str:
    """auto: flash_attn (if installed), else torch's varlen_attn, for CUDA bf16/fp16; sdpa (masked) otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"varlen attention backend {backend!r}: expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not ((q.is_cuda or _AS_ON_CUDA[0]) and q.dtype in (torch.bfloat16, torch.float16)):
        return "sdpa"  # the flash kernels have no fp32 and no CPU version
    if _has_flash_attn() and not _AS_ON_CUDA[0]:  # the planner's fake tensors take torch's kernel
        return "flash_attn"
    return "torch" if _torch_varlen() is not None else "sdpa"


def varlen_causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_len: int,
    scale: float | None,
    backend: str = "auto",
    segment_lengths: tuple[int, ...] | None = None,
) -> Tensor:
    """Causal attention within each [cu_seqlens[i], cu_seqlens[i + 1]) segment. (N, Hq, Dh), (N, Hkv, Dh) x2 ->
    (N, Hq, Dh). GQA (Hq a multiple of Hkv) is handled by every backend. The SDPA fallback needs the segment lengths
    as host ints (segment_lengths; read from cu_seqlens only when not given)."""
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
    if segment_lengths is None:
        segment_lengths = tuple(cu_seqlens.diff().tolist())
    # Each segment on its own: memory and FLOPs of sum(n_i^2), not of one (N, N) block-diagonal mask.
    # (1, H, n, Dh) per segment: 4-D inputs reach SDPA's fused CPU kernel, which keeps no (n, n) scores either.
    outs = [
        F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (qi, ki, vi)), is_causal=True,
                                       scale=scale)[0].transpose(0, 1)
        for qi, ki, vi in zip(*(x.split(segment_lengths) for x in (q, k, v)), strict=True)
    ]  # fmt: skip
    return torch.cat(outs)  # (N, Hq, Dh)


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
    segment_lengths: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention-interface function: (1, H, N, Dh) packed q/k/v -> ((1, N, H, Dh), None).

    Self-attention only, so cu_seq_lens_k / max_length_k (equal to the q ones) arrive in kwargs and are unused."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(
            f"{VARLEN_ATTENTION} attention needs one packed sequence with cu_seq_lens_q/max_length_q and no mask "
            "(a minillava.layout packed Batch carries them); use sdpa for padded batches"
        )
    if dropout:
        raise ValueError(f"{VARLEN_ATTENTION} attention has no dropout (Llama's attention_dropout is 0)")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (N, H, Dh)
    out = varlen_causal_attention(q, k, v, cu_seq_lens_q, max_length_q, scaling, segment_lengths=segment_lengths)
    return out[None], None


def register_varlen_attention() -> str:
    """Register varlen_attention_forward with transformers (idempotent); returns its attn_implementation name.

    The name is deliberately absent from transformers' mask registry, so create_causal_mask returns the mask it
    was given (None): no (N, N) mask is ever built on the packed path."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    return VARLEN_ATTENTION


def padded_sdpa_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention-interface function for padded batches: HF's own SDPA attention, given the model's
    (B, 1, T, T) causal mask, or none (is_causal) when no sample is padded.

    Registered outside transformers' mask registry, so LlamaModel passes the mask through untouched: HF's mask
    builder would read the 2D padding mask and the position ids on the host every forward (masking_utils
    _ignore_causal_mask_sdpa, find_packed_sequence_indices). A 2D mask (generation) becomes the 4D one here."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.ndim == 2:  # (B, kv) padding -> (B, 1, q, kv) causal
        q, kv = query.shape[2], attention_mask.shape[1]
        causal = torch.ones(q, kv, dtype=torch.bool, device=query.device).tril(diagonal=kv - q)
        attention_mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_padded_sdpa() -> str:
    """Register padded_sdpa_forward with transformers (idempotent); returns its attn_implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PADDED_SDPA, padded_sdpa_forward)
    return PADDED_SDPA
