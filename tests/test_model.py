"""minillava.model (+ loss, weights): projector, CLIP feature selection, splice, chunked loss, trainable sets, weight
I/O. Tiny random Llama/CLIP from tests/conftest.py; CPU only."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_llava as build_llava_from_config
from conftest import build_llava_from_pretrained, mm_projector_state_dict, tiny_clip_config, tiny_llama_config
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from minillava.attention import PADDED_SDPA
from minillava.constants import IGNORE_INDEX as IGN
from minillava.constants import IMAGE_TOKEN_INDEX as IMG
from minillava.formats import load_mm_projector, pretrained_state_dict, read_mm_projector, to_llava_key
from minillava.layout import lay_out
from minillava.model import LlavaModel, build_projector, parameter_report, set_trainable, splice

P = 4  # tiny CLIP: 28px / patch 14 -> 2x2 patches (+ CLS)
LLAVA_PROJECTOR_KEYS = [f"model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]


def make_model(**kw) -> LlavaModel:
    torch.manual_seed(0)
    return build_llava_from_config(tiny_llama_config(), tiny_clip_config(), **kw)


def make_batch(n_images: int | None = None):
    """Right-padded batch: image at the start, image in the middle, text-only sample; one image per sample."""
    ids = torch.tensor([[1, IMG, 5, 6, 7, 8, 0], [1, 9, 10, IMG, 11, 12, 13], [1, 14, 15, 16, 0, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]]).bool()
    labels = torch.where(attn & (ids > 0), ids, IGN)
    labels[:, :2] = IGN  # a "prompt" part
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(n_images or 3, 3, 28, 28, generator=g)
    return dict(input_ids=ids, labels=labels, attention_mask=attn, pixel_values=pixel_values)


# ---------------------------------------------------------------- projector and key names (ref 5.3, 8.1)


def test_projector_keys_shapes_and_exact_gelu_match_llava():
    with torch.device("meta"):
        proj7, proj13 = build_projector("mlp2x_gelu", 1024, 4096), build_projector("mlp2x_gelu", 1024, 5120)
    assert {k: tuple(v.shape) for k, v in proj7.state_dict().items()} == {
        "0.weight": (4096, 1024),
        "0.bias": (4096,),
        "2.weight": (4096, 4096),
        "2.bias": (4096,),
    }
    assert sum(p.numel() for p in proj7.parameters()) == 20_979_712  # ref 7.2: 20.98M for 7B
    assert sum(p.numel() for p in proj13.parameters()) == 31_467_520  # 31.47M for 13B
    assert isinstance(proj7[1], torch.nn.GELU) and proj7[1].approximate == "none"
    assert list(build_projector("mlp3x_gelu", 8, 16).state_dict()) == [
        f"{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")
    ]
    assert list(build_projector("linear", 8, 16).state_dict()) == ["weight", "bias"]  # LLaVA's bare nn.Linear
    x = torch.randn(2, 16)
    assert torch.equal(build_projector("identity", 16, 16)(x), x)


def test_projector_errors():
    with pytest.raises(ValueError, match="--mm_projector_type 'mlp2x_relu'"):
        build_projector("mlp2x_relu", 8, 16)
    with pytest.raises(ValueError, match="identity needs mm_hidden_size == hidden_size, got 8 vs 16"):
        build_projector("identity", 8, 16)


def test_mm_projector_state_dict_keys_are_llavas():
    sd = mm_projector_state_dict(make_model())
    assert list(sd) == LLAVA_PROJECTOR_KEYS
    assert not any(v.requires_grad for v in sd.values())


def test_to_llava_key_golden():
    assert to_llava_key("llm.model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert to_llava_key("llm.model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert to_llava_key("llm.lm_head.weight") == "lm_head.weight"
    assert to_llava_key("mm_projector.2.bias") == "model.mm_projector.2.bias"
    # ref 8.2: LLaVA's frozen CLIP copy; transformers 5 has no `vision_model.` level in CLIPVisionModel itself
    assert (
        to_llava_key("vision_tower.encoder.layers.3.mlp.fc1.weight")
        == "model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"
    )
    with pytest.raises(ValueError, match=r"'foo\.weight'"):
        to_llava_key("foo.weight")
    model = make_model()
    assert len({to_llava_key(n) for n, _ in model.named_parameters()}) == len(list(model.parameters()))


# ---------------------------------------------------------------- splice (ref 5.5)


def splice_golden(ids, attn, labels, n_images, model_max_length=100):
    """Splice with readable values: token t embeds as (t, 0), image n patch p as (1000 + 10 n + p, 1). The layout is
    made on the host (lay_out), the device part only gathers (splice)."""
    ids, attn, labels = torch.tensor(ids), torch.tensor(attn).bool(), torch.tensor(labels)
    img = torch.stack(
        [1000 + 10 * torch.arange(n_images)[:, None] + torch.arange(P) + 0.0, torch.ones(n_images, P)], -1
    )  # (N, P, 2)
    raw = dict(input_ids=ids, labels=labels, attention_mask=attn, pixel_values=torch.zeros(n_images, 3, 28, 28))
    b = lay_out(raw, image_tokens=P, max_len=model_max_length, padding_free=False)
    text = torch.stack([b.input_ids.float(), torch.zeros_like(b.input_ids, dtype=torch.float)], -1)  # (B, T2, 2)
    emb, lab, pos = splice(text, img, b.image_pos, b.image_rows), b.labels, b.position_ids
    mask = torch.arange(b.max_len)[None, :] < torch.tensor(b.seq_lens)[:, None]
    assert emb.shape[:2] == lab.shape == mask.shape == pos.shape
    assert torch.equal(emb[~mask], torch.zeros_like(emb[~mask]))  # zero-embedding padding
    return emb[..., 0].long().tolist(), lab.tolist(), mask.sum(1).tolist(), pos.tolist()


def test_splice_image_at_start_middle_and_text_only_sample():
    ids = [[1, IMG, 5, 6, 0], [1, 7, IMG, 8, 9], [1, 3, 4, 0, 0]]
    attn = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    labels = [[IGN, IGN, 5, 6, IGN], [IGN, 7, IGN, 8, 9], [IGN, 3, 4, IGN, IGN]]
    emb, lab, lengths, pos = splice_golden(ids, attn, labels, n_images=3)  # sample 2 owns (and skips) image 2
    assert emb == [
        [1, 1000, 1001, 1002, 1003, 5, 6, 0],
        [1, 7, 1010, 1011, 1012, 1013, 8, 9],
        [1, 3, 4, 0, 0, 0, 0, 0],
    ]
    assert lab == [
        [IGN, IGN, IGN, IGN, IGN, 5, 6, IGN],
        [IGN, 7, IGN, IGN, IGN, IGN, 8, 9],
        [IGN, 3, 4, IGN, IGN, IGN, IGN, IGN],
    ]
    assert lengths == [7, 8, 3]
    assert pos == [[0, 1, 2, 3, 4, 5, 6, 0], list(range(8)), [0, 1, 2, 0, 0, 0, 0, 0]]


def test_splice_two_images_in_one_sample_consume_features_in_batch_order():
    ids = [[IMG, 5, IMG, 6], [1, IMG, 7, 0]]
    attn = [[1, 1, 1, 1], [1, 1, 1, 0]]
    labels = [[IGN, 5, IGN, 6], [IGN, IGN, 7, IGN]]
    emb, lab, lengths, _ = splice_golden(ids, attn, labels, n_images=3)
    assert emb[0] == [1000, 1001, 1002, 1003, 5, 1010, 1011, 1012, 1013, 6]
    assert emb[1] == [1, 1020, 1021, 1022, 1023, 7, 0, 0, 0, 0]
    assert lab[0] == [IGN] * 4 + [5] + [IGN] * 4 + [6]
    assert lengths == [10, 6]


def test_splice_truncates_after_expansion():
    ids, attn = [[1, IMG, 5, 6, 7], [1, 2, 3, 0, 0]], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    labels = [[IGN, IGN, 5, 6, 7], [IGN, 2, 3, IGN, IGN]]
    emb, lab, lengths, _ = splice_golden(ids, attn, labels, n_images=2, model_max_length=6)
    assert emb == [[1, 1000, 1001, 1002, 1003, 5], [1, 2, 3, 0, 0, 0]]  # 6 and 7 cut, not 575 image rows
    assert lab == [[IGN] * 5 + [5], [IGN, 2, 3, IGN, IGN, IGN]] and lengths == [6, 3]
    emb, _, lengths, _ = splice_golden(ids, attn, labels, n_images=2, model_max_length=3)  # cut inside the image
    assert emb == [[1, 1000, 1001], [1, 2, 3]] and lengths == [3, 3]
    emb, _, lengths, _ = splice_golden(ids, attn, labels, n_images=2, model_max_length=8)  # exactly fits
    assert emb[0] == [1, 1000, 1001, 1002, 1003, 5, 6, 7] and lengths == [8, 3]


def test_splice_placeholder_image_count_mismatch_is_an_error():
    ids, attn, labels = [[1, IMG, 5], [1, 2, 3]], [[1, 1, 1], [1, 1, 1]], [[IGN, IGN, 5], [IGN, 2, 3]]
    msg = r"1 <image> placeholders plus 1 text-only samples \(one zero image each\) need 2 images, got 3"
    with pytest.raises(ValueError, match=msg):
        splice_golden(ids, attn, labels, n_images=3)
    with pytest.raises(ValueError, match="need 3 images, got 2"):
        splice_golden([[IMG, 1, IMG], [1, 2, 3]], attn, labels, n_images=2)


def test_splice_keeps_every_image_feature_in_the_graph():
    """Text-only batch: the (zero) image features still get a (zero) gradient, like LLaVA's [0:0] slice."""
    ids, attn = torch.tensor([[1, 2, 3], [1, 4, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    raw = dict(input_ids=ids, labels=ids.clone(), attention_mask=attn, pixel_values=torch.zeros(2, 3, 28, 28))
    b = lay_out(raw, image_tokens=P, max_len=100, padding_free=False)
    text = torch.randn(2, 3, 8, requires_grad=True)
    img = torch.randn(2, P, 8, requires_grad=True)
    emb = splice(text, img, b.image_pos, b.image_rows)
    emb.sum().backward()
    assert img.grad is not None and torch.equal(img.grad, torch.zeros_like(img))


# ---------------------------------------------------------------- vision features (ref 5.2)


@pytest.mark.parametrize(
    "select_layer, feature",
    [(-2, "patch"), (-2, "cls_patch"), (-1, "patch"), (1, "patch"), (0, "cls_patch"), (-4, "patch")],
)
def test_vision_features_and_projector_equal_transformers(select_layer, feature):
    model = make_model(mm_vision_select_layer=select_layer, mm_vision_select_feature=feature)
    ref = CLIPVisionModel(tiny_clip_config())
    ref.load_state_dict(model.vision_tower.state_dict())
    px = make_batch()["pixel_values"]
    hidden = ref(px, output_hidden_states=True).hidden_states[select_layer]  # (N, 1+P, C), before post_layernorm
    expected = hidden[:, 1:] if feature == "patch" else hidden
    with torch.no_grad():
        ours = model.vision_tower(px)
        assert torch.equal(ours[:, 1:] if feature == "patch" else ours, expected)
        assert torch.equal(model.encode_images(px, torch.float32), model.mm_projector(expected))


def test_vision_tower_skips_later_layers_and_runs_through_its_own_call():
    """Only layers up to the selected one run, and they run inside vision_tower.__call__ (where FSDP2 hooks live)."""
    model = make_model()
    calls = []
    model.vision_tower.register_forward_pre_hook(lambda m, a: calls.append("tower"))
    model.vision_tower.encoder.layers[-1].register_forward_hook(lambda m, a, o: calls.append("last layer"))
    model.vision_tower.encoder.layers[-2].register_forward_hook(lambda m, a, o: calls.append("layer -2"))
    model(**model.layout(make_batch()))
    assert calls == ["tower", "layer -2"]


def test_select_layer_and_feature_validation():
    with pytest.raises(ValueError, match="--mm_vision_select_layer -5: the tower has 3 layers"):
        make_model(mm_vision_select_layer=-5)
    with pytest.raises(ValueError, match="--mm_vision_select_feature 'cls'"):
        make_model(mm_vision_select_feature="cls")


# ---------------------------------------------------------------- forward and loss (ref 4.6)


def reference_loss(model, batch):
    """Straightforward HF path: full logits, F.cross_entropy(sum) over shifted labels."""
    emb, labels, mask, pos = model.embed_inputs(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]
    )
    logits = model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits.float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    return loss, (labels[:, 1:] != IGN).sum()


def test_forward_shapes_and_dtypes():
    model, batch = make_model(), make_batch()
    loss, n = model(**model.layout(batch))
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert isinstance(n, int)  # a host int: the layout's label count, no device read
    emb, labels, mask, _ = model.embed_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert emb.shape == (3, 7 - 1 + P, 32) and (labels == IGN).all() and mask.sum(1).tolist() == [9, 10, 4]
    assert len(model.decoder_layers()) == 2 and all(isinstance(m, LlamaDecoderLayer) for m in model.decoder_layers())
    assert model.num_image_tokens == P and make_model(mm_vision_select_feature="cls_patch").num_image_tokens == P + 1


@pytest.mark.parametrize("chunk", [1, 3, 2048])
def test_chunked_loss_and_grads_equal_full_logits_reference(chunk):
    model, batch = make_model(loss_chunk_size=chunk), make_batch()
    set_trainable(model, tune_mm_mlp_adapter=False)  # stage 2: LLM + projector
    loss, n = model(**model.layout(batch))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref, ref_n = reference_loss(model, batch)
    ref.backward()
    # supervised tokens: 4 in rows 0 and 1 (image and prompt positions are -100), 2 in row 2
    assert n == ref_n == 10
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_loss_ignores_masked_labels():
    model, batch = make_model(), make_batch()
    loss_all, n_all = model(**model.layout(batch))
    batch["labels"][0, 3:] = IGN  # drop three of the four supervised tokens of sample 0
    loss, n = model(**model.layout(batch))
    ref, _ = reference_loss(model, batch)
    assert n == n_all - 3
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert loss.item() < loss_all.item()


def test_zero_label_batch_gives_zero_loss_and_zero_grads():
    model, batch = make_model(), make_batch()
    set_trainable(model, tune_mm_mlp_adapter=True)
    batch["labels"][:] = IGN
    loss, n = model(**model.layout(batch))
    assert loss.item() == 0.0 and n == 0  # HF's mean would be NaN here (ref 4.6)
    loss.backward()
    for p in model.mm_projector.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


# ---------------------------------------------------------------- trainable sets (ref 7.2)


def trainable(model):
    return {
        n.split(".")[0] if not n.startswith("llm.") else ".".join(n.split(".")[:3])
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def test_stage1_only_projector_trains_and_tower_and_llm_get_no_grad():
    model = make_model()
    set_trainable(model, tune_mm_mlp_adapter=True)
    assert trainable(model) == {"mm_projector"}
    loss, _ = model(**model.layout(make_batch()))
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("mm_projector."), name
    assert all(p.grad.abs().sum() > 0 for p in model.mm_projector.parameters())
    report = parameter_report(model)
    assert "mm_projector                 2,112               0" in report
    assert report.splitlines()[-1].split() == ["total", "2,112", f"{98_176:,}"]


def test_text_only_batch_still_gives_the_projector_a_gradient():
    model = make_model()
    set_trainable(model, tune_mm_mlp_adapter=True)
    batch = make_batch()
    batch["input_ids"][batch["input_ids"] == IMG] = 3
    loss, _ = model(**model.layout(batch))
    loss.backward()  # would raise "does not require grad" if the projector had left the graph
    assert all(p.grad is not None and not p.grad.any() for p in model.mm_projector.parameters())


def test_stage2_and_freeze_flags():
    model = make_model()
    llm_all = {"llm.model.embed_tokens", "llm.model.layers", "llm.model.norm", "llm.lm_head.weight"}
    set_trainable(model, tune_mm_mlp_adapter=False)
    assert trainable(model) == llm_all | {"mm_projector"}
    set_trainable(model, tune_mm_mlp_adapter=False, freeze_backbone=True)  # LLaVA freezes model.model only
    assert trainable(model) == {"llm.lm_head.weight", "mm_projector"}
    set_trainable(model, tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=True)
    assert trainable(model) == llm_all
    with pytest.raises(ValueError, match="--tune_mm_mlp_adapter with --freeze_mm_mlp_adapter"):
        set_trainable(model, tune_mm_mlp_adapter=True, freeze_mm_mlp_adapter=True)
    report = parameter_report(model)
    assert [line.split()[0] for line in report.splitlines()] == [
        "component",
        "vision_tower",
        "mm_projector",
        "llm.embed_tokens",
        "llm.layers",
        "llm.norm",
        "llm.lm_head",
        "total",
    ]


# ---------------------------------------------------------------- mm_projector.bin (ref 5.4 step 5, 8.1)


def test_adapter_round_trip_casts_dtype(tmp_path):
    src = make_model(dtype=torch.bfloat16)
    torch.nn.init.normal_(src.mm_projector[0].weight)
    path = str(tmp_path / "mm_projector.bin")
    torch.save(mm_projector_state_dict(src), path)  # LLaVA's file: bf16, keys model.mm_projector.*
    dst = make_model()
    load_mm_projector(dst, path)
    for (k, a), b in zip(src.mm_projector.state_dict().items(), dst.mm_projector.state_dict().values(), strict=True):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b), k
    holder = torch.nn.Module()  # any module with an .mm_projector will do (train.py loads into a stand-alone one)
    holder.mm_projector = build_projector("mlp2x_gelu", 32, 32)
    load_mm_projector(holder, path)
    assert torch.equal(holder.mm_projector[0].weight, dst.mm_projector[0].weight)
    with torch.device("meta"):  # read_mm_projector checks shapes without touching data (FSDP flow)
        meta = build_llava_from_config(tiny_llama_config(), tiny_clip_config())
    assert list(read_mm_projector(meta, path)) == [f"mm_projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]


def test_adapter_errors_name_the_file(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match=r"--pretrain_mm_mlp_adapter .*nope\.bin: does not exist"):
        load_mm_projector(model, str(tmp_path / "nope.bin"))
    good = mm_projector_state_dict(model)
    bad_keys = str(tmp_path / "bad_keys.bin")
    keys = {"model.mm_projector.0.weight": good["model.mm_projector.0.weight"], "x.mm_projector.4.bias": torch.zeros(1)}
    torch.save(keys, bad_keys)
    msg = r"bad_keys.bin: missing keys \['0.bias', '2.bias', '2.weight'\], unexpected keys \['4.bias'\]"
    with pytest.raises(ValueError, match=msg):
        load_mm_projector(model, bad_keys)
    bad_shape = str(tmp_path / "bad_shape.bin")
    torch.save({**good, "model.mm_projector.2.weight": torch.zeros(16, 32)}, bad_shape)
    with pytest.raises(ValueError, match=r"bad_shape.bin: mm_projector.2.weight has shape \(16, 32\), .*\(32, 32\)"):
        load_mm_projector(model, bad_shape)


# ---------------------------------------------------------------- building and pretrained weights


def write_pretrained(root, legacy: bool):
    """Tiny LLM + CLIP folders. legacy: pytorch_model.bin with old buffers; else sharded safetensors + full CLIP."""
    torch.manual_seed(3)
    llm = LlamaForCausalLM(tiny_llama_config())
    llm_dir, clip_dir = root / "llm", root / "clip"
    if legacy:
        llm.config.save_pretrained(llm_dir)
        sd = {**llm.state_dict(), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}  # 4.31-era file
        torch.save(sd, llm_dir / "pytorch_model.bin")
        tower = CLIPVisionModel(tiny_clip_config())
        tower.save_pretrained(clip_dir)  # transformers 5 layout: no vision_model. prefix
    else:
        llm.save_pretrained(llm_dir, max_shard_size="40KB")
        text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
        full = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=tiny_clip_config().to_dict()))
        full.save_pretrained(clip_dir)  # openai/clip-* layout: vision_model.* + text_model.* + projections
    return str(llm_dir), str(clip_dir)


@pytest.mark.parametrize("legacy", [False, True])
def test_meta_build_then_pretrained_state_dict_equals_from_pretrained(tmp_path, legacy):
    llm_dir, clip_dir = write_pretrained(tmp_path, legacy)
    if not legacy:
        assert (tmp_path / "llm" / "model.safetensors.index.json").exists()
    ref = build_llava_from_pretrained(llm_dir, clip_dir)
    with torch.device("meta"):
        model = build_llava_from_config(
            LlamaConfig.from_pretrained(llm_dir), CLIPVisionConfig.from_pretrained(clip_dir)
        )
    model.to_empty(device="cpu")
    model.init_non_pretrained()
    sd = pretrained_state_dict(llm_dir, clip_dir)
    assert set(sd) == {k for k in model.state_dict() if not k.startswith("mm_projector.")}
    projector = {f"mm_projector.{k}": v for k, v in ref.mm_projector.state_dict().items()}
    model.load_state_dict(sd | projector, strict=True)
    batch = make_batch()
    assert torch.equal(model(**model.layout(batch))[0], ref(**ref.layout(batch))[0])


def test_init_non_pretrained_gives_default_projector_init():
    with torch.device("meta"):
        model = build_llava_from_config(tiny_llama_config(), tiny_clip_config())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_non_pretrained()
    fresh = make_model()
    torch.manual_seed(0)
    fresh.mm_projector.apply(lambda m: m.reset_parameters() if isinstance(m, torch.nn.Linear) else None)
    for a, b in zip(model.mm_projector.parameters(), fresh.mm_projector.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model.llm.model.rotary_emb.inv_freq, fresh.llm.model.rotary_emb.inv_freq)
    assert torch.equal(model.vision_tower.embeddings.position_ids, fresh.vision_tower.embeddings.position_ids)


def test_builder_errors(tmp_path):
    with pytest.raises(ValueError, match="--model_name_or_path '/nonexistent/vicuna': not a local folder"):
        build_llava_from_pretrained("/nonexistent/vicuna", str(tmp_path))
    with pytest.raises(ValueError, match=r"--vision_tower .*: no model.safetensors"):
        pretrained_state_dict(write_pretrained(tmp_path, legacy=False)[0], str(tmp_path))
    with pytest.raises(ValueError, match="--attn_implementation 'flex'"):
        make_model(attn_implementation="flex")
    assert make_model(attn_implementation="eager").llm.config._attn_implementation == "eager"
    # sdpa runs through minillava's registration of HF's SDPA (no host reads in HF's mask builder, attention.py)
    assert make_model().llm.config._attn_implementation == PADDED_SDPA
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="flash_attention_2 needs the flash-attn package"):
            make_model(attn_implementation="flash_attention_2")


# ---------------------------------------------------------------- bf16


def test_bf16_tower_with_fp32_llm_and_full_bf16_model():
    model = make_model()
    model.vision_tower.to(torch.bfloat16)  # ref 5.2: the tower runs in bf16 when training in bf16
    seen = []
    model.mm_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    model.vision_tower.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    loss, _ = model(**model.layout(make_batch()))
    loss.backward()
    assert seen == [torch.bfloat16, torch.float32] and torch.isfinite(loss)
    model = make_model(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    loss, _ = model(**model.layout(make_batch()))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.mm_projector[0].weight.grad.dtype == torch.bfloat16
