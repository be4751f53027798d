"""Padding-free micro-batches (--padding_free): packing, the varlen attention's CPU fallback, and equivalence with the
padded path (loss_sum, num_tokens, gradients, trainer losses). CPU, fp32; one bf16 kernel test needs CUDA.

Tolerances: the two paths compute the same sums over the same (hidden, label) pairs in the same order; only the
attention matmul shapes differ ((1, N) packed vs (B, T) padded), so results agree to fp32 rounding. We assert
rtol 1e-6 on loss_sum, atol 1e-5 (rtol 1e-5) on every gradient and on the trainer's logged losses; num_tokens is exact.
"""

import pytest
import torch
from conftest import build_llava as build_llava_from_config
from conftest import flags, losses, tiny_clip_config, tiny_llama_config

from minillava import attention
from minillava.attention import VARLEN_ATTENTION, varlen_causal_attention
from minillava.config import parse_args
from minillava.constants import IGNORE_INDEX as IGN
from minillava.constants import IMAGE_TOKEN_INDEX as IMG
from minillava.layout import lay_out
from minillava.model import set_trainable

P = 4  # tiny CLIP: 2x2 patches


def make_model(padding_free: bool, model_max_length: int = 2048, **llama_kw):
    torch.manual_seed(0)
    return build_llava_from_config(
        tiny_llama_config(**llama_kw),
        tiny_clip_config(),
        padding_free=padding_free,
        model_max_length=model_max_length,
    )


def mixed_batch(lengths: list[int], image: list[int | None], seed: int = 0):
    """Right-padded batch; sample i has lengths[i] text tokens and its <image> at position image[i] (None: text-only
    sample, which still owns one zero image, as LLaVA's collator gives it). The first 2 tokens are prompt (-100)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    attn = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, (n, at) in enumerate(zip(lengths, image, strict=True)):
        ids[i, :n] = torch.randint(3, 500, (n,), generator=g)
        ids[i, 0] = 1
        if at is not None:
            ids[i, at] = IMG
        attn[i, :n] = True
    labels = torch.where(attn & (ids > 0), ids, IGN)
    labels[:, :2] = IGN
    pixel_values = torch.randn(len(lengths), 3, 28, 28, generator=g)
    pixel_values[[i for i, at in enumerate(image) if at is None]] = 0
    return dict(input_ids=ids, labels=labels, attention_mask=attn, pixel_values=pixel_values)


BATCHES = {
    "one_image_sample": ([9], [1], 2048),
    "one_text_only_sample": ([7], [None], 2048),
    "mixed_lengths": ([9, 5, 12, 3], [1, None, 4, 1], 2048),
    "truncated": ([9, 5, 12, 3], [1, None, 4, 1], 10),  # model_max_length cuts samples 0 and 2 after the splice
}


# ---------------------------------------------------------------- packing and mask


def test_packed_layout_shifts_labels_inside_each_sample():
    raw = dict(
        input_ids=torch.tensor([[1, 11, 12, 0], [1, 21, 22, 23]]),
        labels=torch.tensor([[IGN, 11, 12, IGN], [IGN, 21, 22, 23]]),
        attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool(),
        pixel_values=torch.zeros(2, 3, 28, 28),  # text-only samples: one zero image each
    )
    p = lay_out(raw, image_tokens=P, max_len=2048, padding_free=True)
    assert p.input_ids.tolist() == [[1, 11, 12, 1, 21, 22, 23]]  # padding position 3 is gone
    # position t predicts label t + 1 of the same sample; sample 0's last token must not predict sample 1's first
    targets = torch.full((7,), IGN)
    targets[p.label_pos] = p.label_ids
    assert targets.tolist() == [11, 12, IGN, 21, 22, 23, IGN] and p.num_label_tokens == 5
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert p.cu_seqlens.tolist() == [0, 3, 7] and p.cu_seqlens.dtype == torch.int32 and p.max_len == 4
    assert p.seq_lens == (3, 4) and p.attention_mask is None
    assert {"cu_seqlens", "max_len", "seq_lens"} <= set(p) and "attention_mask" not in p  # model(**p) kwargs


def test_fallback_attention_attends_per_segment_not_through_one_dense_mask():
    """Bytes saved for backward by the CPU fallback over 4 segments of 61-107 tokens: per segment they grow with
    sum(n_i^2); one (N, N) block-diagonal mask over the packed sequence would save several times more."""
    lengths = [61, 107, 80, 95]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n = sum(lengths)
    q, k, v = (torch.randn(n, 4, 8, requires_grad=True) for _ in range(3))

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(total)

    def dense():  # the former fallback: one block-diagonal causal mask over all N positions
        idx = torch.arange(n)
        seg = torch.searchsorted(cu[1:].long(), idx, right=True)
        mask = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
        return torch.nn.functional.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask)

    ours = saved_bytes(lambda: varlen_causal_attention(q, k, v, cu, max(lengths), None, "sdpa", tuple(lengths)))
    dense_bytes = saved_bytes(dense)
    assert 0 < ours < dense_bytes / 2, (ours, dense_bytes)


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA and GQA
def test_fallback_attention_equals_per_sample_causal_sdpa(kv_heads):
    torch.manual_seed(0)
    lengths = [3, 6, 1, 4]
    cu = torch.tensor([0, 3, 9, 10, 14], dtype=torch.int32)
    q, k, v = torch.randn(14, 4, 8), torch.randn(14, kv_heads, 8), torch.randn(14, kv_heads, 8)
    out = varlen_causal_attention(q, k, v, cu, max(lengths), scale=0.3, backend="sdpa")
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(x[s:e].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=0.3, enable_gqa=kv_heads != 4
        ).transpose(0, 1)
        torch.testing.assert_close(out[s:e], ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("api", ["window_size", "is_causal"])
def test_torch_varlen_call_adapts_to_its_api_version(api, monkeypatch):
    """torch's varlen_attn took is_causal (no scale, no GQA) in its first releases and scale/window_size/enable_gqa
    later. A CPU stand-in with each signature (computing with the fallback) must reproduce the fallback's output."""

    def new_api(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), **kw):
        assert window_size == (-1, 0) and cu_q is cu_k and max_q == max_k
        return varlen_causal_attention(q, k, v, cu_q, max_q, scale, backend="sdpa")

    def old_api(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and q.shape[1] == k.shape[1]  # no GQA support: k/v must arrive repeated
        return varlen_causal_attention(q, k, v, cu_q, max_q, None, backend="sdpa")

    monkeypatch.setattr(attention, "_torch_varlen", lambda: new_api if api == "window_size" else old_api)
    attention._torch_varlen_params.cache_clear()
    try:
        torch.manual_seed(0)
        cu = torch.tensor([0, 3, 9, 10], dtype=torch.int32)
        q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
        out = varlen_causal_attention(q, k, v, cu, 6, scale=0.3, backend="torch")
        ref = varlen_causal_attention(q, k, v, cu, 6, scale=0.3, backend="sdpa")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    finally:
        attention._torch_varlen_params.cache_clear()


def test_packed_model_never_attends_across_samples():
    """Perturb sample 2's tokens and image: sample 1's hidden states (hence logits) stay bit-identical."""
    model = make_model(True).eval()
    batch = mixed_batch([9, 6], [1, 2])
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][1, 3:6] = torch.tensor([7, 8, 9])
    other["pixel_values"][1] += 1.0

    def packed_hidden(raw):
        p = model.layout(raw)
        embeds = model.embed(p.input_ids, p.pixel_values, p.image_pos, p.image_rows)
        cu, n = p.cu_seqlens, p.max_len
        kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)
        out = model.llm.model(inputs_embeds=embeds, position_ids=p.position_ids, segment_lengths=p.seq_lens, **kw)
        return out.last_hidden_state[0], p.seq_lens[0]

    with torch.no_grad():
        (h1, n1), (h2, _) = packed_hidden(batch), packed_hidden(other)
    assert torch.equal(h1[:n1], h2[:n1])
    assert not torch.allclose(h1[n1:], h2[n1:])


def test_varlen_attention_refuses_padded_calls():
    model = make_model(True)
    assert model.padding_free and model.llm.config._attn_implementation == VARLEN_ATTENTION
    assert model.vision_tower.config._attn_implementation == "sdpa"
    assert not make_model(False).padding_free
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model.llm.model(inputs_embeds=torch.randn(2, 5, 32))


def test_padding_free_flag():
    req = [
        "--stage",
        "1",
        "--model_name_or_path",
        "m",
        "--vision_tower",
        "v",
        "--data_path",
        "d",
        "--image_folder",
        "i",
    ]
    req += ["--output_dir", "o"]
    assert parse_args(req).train.padding_free is True  # the --stage presets pack
    assert parse_args([*req, "--padding_free", "False"]).train.padding_free is False
    assert parse_args([*req, "--padding_free", "True"]).train.padding_free is True
    assert parse_args([*req, "--padding-free"]).train.padding_free is True
    with pytest.raises(ValueError, match="padding_free"):
        parse_args([*req, "--padding_free", "maybe"])


# ---------------------------------------------------------------- packed == padded


def _loss_and_grads(model, batch):
    loss_sum, n_tok = model(**model.layout(batch))
    loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss_sum.detach(), n_tok, grads


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("stage", [1, 2])
def test_packed_matches_padded(name, stage):
    lengths, image, max_len = BATCHES[name]
    batch = mixed_batch(lengths, image)
    results = []
    for padding_free in (False, True):
        model = make_model(padding_free, model_max_length=max_len)
        set_trainable(model, tune_mm_mlp_adapter=stage == 1)
        results.append(_loss_and_grads(model, batch))
    (l0, n0, g0), (l1, n1, g1) = results
    assert int(n0) == int(n1) > 0
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-5, msg=k)


def test_packed_matches_padded_with_gqa_and_activation_checkpointing():
    """The cu_seqlens kwargs also reach attention through the non-reentrant checkpoint wrapper train.py applies."""
    from minillava.distributed import apply_activation_checkpointing

    batch = mixed_batch([9, 5, 12, 3], [1, None, 4, 1], seed=3)
    results = []
    for padding_free in (False, True):
        model = make_model(padding_free, num_key_value_heads=2)
        apply_activation_checkpointing(model.decoder_layers())
        results.append(_loss_and_grads(model, batch))
    (l0, n0, g0), (l1, n1, g1) = results
    assert int(n0) == int(n1)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-5, msg=k)


# ---------------------------------------------------------------- trainer


def test_train_main_padding_free_gives_the_same_losses(assets, tmp_path, monkeypatch):
    """1-rank FSDP2 train.main, stage 2 (image + text-only samples, AC on): --padding_free True logs the losses of the
    padded run (3 steps, rtol/atol 1e-5), and the flag really reaches the model (the varlen attention runs)."""
    import train

    calls = []
    real_attention = attention.varlen_causal_attention

    def counting(*a, **kw):
        calls.append(1)
        return real_attention(*a, **kw)

    monkeypatch.setattr(attention, "varlen_causal_attention", counting)
    out = {}
    for padding_free in (False, True):
        out[padding_free] = str(tmp_path / f"padding_free_{padding_free}")
        train.main(flags(assets, out[padding_free], padding_free=padding_free))
        assert bool(calls) == padding_free
    torch.testing.assert_close(losses(out[True]), losses(out[False]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GPU kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash varlen kernels are CUDA bf16/fp16 only)")
@pytest.mark.parametrize("backend", ["torch", "flash_attn"])
def test_cuda_varlen_kernel_matches_masked_sdpa_bf16(backend):
    if backend == "flash_attn" and not attention._has_flash_attn():
        pytest.skip("flash-attn is not installed")
    if backend == "torch" and attention._torch_varlen() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    lengths = [577, 1, 130, 1024, 640]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    n = sum(lengths)
    # (H, N, Dh) leaves viewed as (N, H, Dh): the strides varlen_attention_forward passes on from LlamaAttention
    leaves = [torch.randn(32, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    q, k, v = (x.transpose(0, 1) for x in leaves)
    outs, grads = [], []
    for b in (backend, "sdpa"):
        out = varlen_causal_attention(q, k, v, cu, max(lengths), scale=128**-0.5, backend=b)
        (g,) = torch.autograd.grad(out.float().square().sum(), [leaves[0]])
        outs.append(out.float())
        grads.append(g.float())
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[0], grads[1], rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_matches_padded_bf16():
    batch = {k: v.cuda() for k, v in mixed_batch([90, 50, 120, 30], [1, None, 40, 1]).items()}
    losses = []
    for padding_free in (False, True):
        model = make_model(padding_free).to(device="cuda", dtype=torch.bfloat16)
        loss_sum, n_tok = model(**model.layout(batch).to("cuda"))
        loss_sum.backward()  # through the varlen kernel's backward
        assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
        losses.append(float(loss_sum) / int(n_tok))
    assert abs(losses[0] - losses[1]) < 1e-2 * abs(losses[0])


def test_torch_compile_flag_same_losses_and_no_graph_break(assets, tmp_path):
    """--torch_compile (each decoder layer, dynamic shapes) on the packed path: the eager run's losses, one graph per
    layer across steps of different lengths, no graph break. aot_eager traces exactly what inductor would compile,
    without the CPU code generation."""
    import torch._dynamo

    import train

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    train.main(flags(assets, eager, padding_free=True))
    train.main(flags(assets, compiled, padding_free=True, torch_compile=True, torch_compile_backend="aot_eager"))
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2  # 2 layers, 3 steps
    torch.testing.assert_close(losses(compiled), losses(eager), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
