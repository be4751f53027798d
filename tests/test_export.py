"""Export to llava-hf and import back, on checkpoints written by the real trainer (train.main, 1 step, fp32):
transformers' LlavaForConditionalGeneration (chat template -> processor -> model) gives minillava's logits, and
minillava -> export -> import gives back the same state."""

import json
import os
import shutil

import pytest
import torch
from conftest import draw_shape, flags
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

import train
from minillava import export, formats
from minillava.constants import IMAGE_TOKEN_INDEX
from minillava.conversation import KNOWN_VERSIONS, build_inference_prompt, get_template, tokenizer_image_token
from minillava.data import load_image_processor, load_tokenizer, process_image
from minillava.generate import load_model

QUESTION = "What is the colour of the shape?"
VARIANTS = {  # LLaVA-1.5 (patch, layer -2, pad) and the other branches (cls_patch -> "full", last layer, square)
    "v15": {},
    "cls_last_square": dict(
        mm_vision_select_feature="cls_patch", mm_vision_select_layer=-1, image_aspect_ratio="square"
    ),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def ckpt(request, assets, tmp_path_factory):
    """(stage-2 LLaVA-format folder written by train.main, its llava-hf export)."""
    root = tmp_path_factory.mktemp(request.param)
    stage2, hf = str(root / "stage2"), str(root / "hf")
    train.main(flags(assets, stage2, stage=2, max_steps=1, **VARIANTS[request.param]))
    export.main(["--checkpoint", stage2, "--output", hf])
    return stage2, hf


def read_folder(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    return {k: v for name in files for k, v in load_file(os.path.join(path, name)).items()}


def test_logits_match_transformers(ckpt):
    """Same image + question: the HF pipeline's ids are minillava's with <image> expanded to P image tokens, the pixel
    values are bit-identical, and so are the logits on CPU fp32 (measured max |diff| 0.0; asserted <= 1e-5)."""
    stage2, hf = ckpt
    ours, settings = load_model(stage2)
    tokenizer = load_tokenizer(stage2, settings.model_max_length)
    ids = torch.tensor([tokenizer_image_token(build_inference_prompt(QUESTION, "v1", True), tokenizer)])
    img = draw_shape("red", "circle", size=(40, 26))
    pixels = process_image(img, load_image_processor(settings.vision_tower), settings.image_aspect_ratio)[None]
    with torch.no_grad():
        embeds, _, mask, pos = ours.embed_inputs(ids, torch.ones_like(ids, dtype=torch.bool), pixels)
        want = ours.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits  # (1, T2, V)

    model = LlavaForConditionalGeneration.from_pretrained(hf).eval()
    processor = AutoProcessor.from_pretrained(hf, backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=img, text=text, return_tensors="pt")
    image_id, P = model.config.image_token_index, ours.num_image_tokens
    expanded = [t for i in ids[0].tolist() for t in ([image_id] * P if i == IMAGE_TOKEN_INDEX else [i])]
    assert inputs.input_ids[0].tolist() == expanded
    assert torch.equal(inputs.pixel_values, pixels)
    with torch.no_grad():
        got = model(**inputs).logits  # (1, T2, V + 64)
    vocab = want.shape[-1]
    assert got.shape[:2] == want.shape[:2] and got.shape[-1] == vocab + 64
    torch.testing.assert_close(got[..., :vocab], want, rtol=0, atol=1e-5)


def test_config_tokens_and_new_rows(ckpt, tmp_path):
    stage2, hf = ckpt
    settings = formats.read_settings(stage2)
    conf = LlavaForConditionalGeneration.from_pretrained(hf).config
    assert (conf.image_token_index, conf.pad_token_id, conf.text_config.vocab_size) == (512, 513, 576)
    assert conf.vision_feature_layer == settings.mm_vision_select_layer and conf.projector_hidden_act == "gelu"
    full = settings.mm_vision_select_feature == "cls_patch"
    assert conf.vision_feature_select_strategy == ("full" if full else "default")
    assert conf.image_seq_length == 4 + full and not conf.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [512, 513] and tokenizer.pad_token == "<pad>"
    processor = AutoProcessor.from_pretrained(hf, backend="pil")
    assert processor.image_processor.do_pad == (settings.image_aspect_ratio == "pad")
    # Old rows kept exactly; new rows near the old rows' mean (N(mu, 1e-5 Sigma)); reproducible for a seed.
    old, new = read_folder(stage2), load_file(os.path.join(hf, "model.safetensors"))
    for ours, theirs in (("model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
                         ("lm_head.weight", "language_model.lm_head.weight")):  # fmt: skip
        w, rows = new[theirs][:512], new[theirs][512:]
        assert torch.equal(w, old[ours]) and rows.shape == (64, 32)
        assert (rows - w.mean(0)).norm(dim=1).max() < 0.05 * (w - w.mean(0)).norm(dim=1).mean()
        assert len(set(map(tuple, rows.tolist()))) == 64  # distinct samples
    export.export_llava_hf(str(tmp_path / "again"), checkpoint=stage2)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in new.items())


def test_chat_template_renders_v1(ckpt):
    processor = AutoProcessor.from_pretrained(ckpt[1], backend="pil")
    image_q = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    one = processor.apply_chat_template([{"role": "user", "content": image_q}], add_generation_prompt=True)
    assert one.replace("<image> \n", "<image>\n") == build_inference_prompt(QUESTION, "v1", True)
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": image_q},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the shape?"},
    ]
    two = processor.apply_chat_template(turns, add_generation_prompt=True)
    assert two == f"Be brief. USER: <image> \n{QUESTION} ASSISTANT: Red.</s>USER: And the shape? ASSISTANT:"


def test_import_llava_folder_is_the_trainers_files(ckpt, assets):
    """Independent of the export: our names mapped back with the trainer's own to_llava_key give the saved files."""
    llm_config, vision_config, state = formats.load_llava_checkpoint_state(ckpt[0])
    files = read_folder(ckpt[0])
    assert sorted(map(formats.to_llava_key, state)) == sorted(files)
    assert all(torch.equal(files[formats.to_llava_key(k)], v) for k, v in state.items())
    base = LlamaConfig.from_pretrained(assets["llm"])
    ignore = {"dtype": None, "architectures": None}  # LLaVA's config says LlavaLlamaForCausalLM
    assert llm_config.to_dict() | ignore == base.to_dict() | ignore
    assert vision_config.to_dict() == CLIPVisionConfig.from_pretrained(assets["clip"]).to_dict()


HUB_LAYOUTS = {  # key renames from what transformers 5 save_pretrained writes (the <= 4.51 layout)
    "saved": [],
    "hub_clip": [("vision_tower.", "vision_tower.vision_model.")],  # llava-hf/llava-1.5-7b-hf
    "in_memory": [
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ],
}


@pytest.mark.parametrize("layout", list(HUB_LAYOUTS))
def test_round_trip_minillava_export_import(ckpt, tmp_path, layout):
    stage2, hf = ckpt
    want_llm, want_vision, want = formats.load_llava_checkpoint_state(stage2)
    if HUB_LAYOUTS[layout]:
        hf_copy = str(tmp_path / "hf")
        shutil.copytree(hf, hf_copy)
        state = load_file(os.path.join(hf, "model.safetensors"))
        for old, new in HUB_LAYOUTS[layout]:
            state = {new + k[len(old) :] if k.startswith(old) else k: v for k, v in state.items()}
        save_file(state, os.path.join(hf_copy, "model.safetensors"))
        hf = hf_copy
    llm_config, vision_config, got = formats.load_llava_checkpoint_state(hf)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert llm_config.vocab_size == 512 and llm_config.pad_token_id == want_llm.pad_token_id == 0
    assert vision_config.to_dict() == want_vision.to_dict()
    s, t = formats.read_settings(hf), formats.read_settings(stage2)
    fields = ("mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature", "image_aspect_ratio")
    assert [getattr(s, f) for f in fields] == [getattr(t, f) for f in fields]


def test_export_from_base_llm_and_stage1_adapter(assets, tmp_path):
    s1, hf = str(tmp_path / "s1"), str(tmp_path / "hf")
    train.main(flags(assets, s1, stage=1, max_steps=1))
    adapter = os.path.join(s1, "mm_projector.bin")
    argv = ["--model_name_or_path", assets["llm"], "--pretrain_mm_mlp_adapter", adapter, "--output", hf]
    export.main([*argv, "--vision_tower", assets["clip"]])
    _, _, state = formats.load_llava_checkpoint_state(hf)
    base = formats.pretrained_state_dict(assets["llm"], assets["clip"])
    projector = torch.load(adapter, weights_only=True)
    assert state.keys() == base.keys() | {k.removeprefix("model.") for k in projector}
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert all(torch.equal(state[k.removeprefix("model.")], v) for k, v in projector.items())
    assert not AutoProcessor.from_pretrained(hf, backend="pil").image_processor.do_pad  # stage 1 trains "square"


def test_import_fills_a_missing_tower_copy_from_the_clip_folder(ckpt, tmp_path):
    """LLaVA's FSDP path (and some released checkpoints) save no CLIP copy: it comes from mm_vision_tower."""
    stage2 = str(tmp_path / "stage2")
    shutil.copytree(ckpt[0], stage2)
    name = next(f for f in os.listdir(stage2) if f.endswith(".safetensors"))
    state = {k: v for k, v in load_file(os.path.join(stage2, name)).items() if "vision_tower" not in k}
    save_file(state, os.path.join(stage2, name))
    _, _, got = formats.load_llava_checkpoint_state(stage2)
    _, _, want = formats.load_llava_checkpoint_state(ckpt[0])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_errors(ckpt, assets, tmp_path):
    with pytest.raises(ValueError, match="not a llava-hf or LLaVA-format"):
        formats.load_llava_checkpoint_state(assets["llm"])
    with pytest.raises(ValueError, match="LLaVA-format stage-2 folder"):
        export.export_llava_hf(str(tmp_path / "x"), checkpoint=ckpt[1])
    with pytest.raises(ValueError, match="--checkpoint, or all of"):
        export.export_llava_hf(str(tmp_path / "x"), model_name_or_path=assets["llm"])
    bad = str(tmp_path / "bad")
    shutil.copytree(ckpt[0], bad)
    with open(os.path.join(bad, "config.json")) as f:
        conf = json.load(f)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**conf, "mm_vision_tower": str(tmp_path / "missing"), "mm_projector_type": "linear"}, f)
    with pytest.raises(ValueError, match="pass --vision_tower"):
        formats.load_llava_checkpoint_state(bad)
    with pytest.raises(ValueError, match="has mlp2x_gelu"):
        export.export_llava_hf(str(tmp_path / "x"), checkpoint=bad, vision_tower=assets["clip"])


def test_sample_new_rows_distribution():
    """N(mu, 1e-5 Sigma) of the rows, Sigma the population covariance; also for a singular Sigma (rows < dims)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3.0
    rows = export.sample_new_rows(w, 40000, torch.Generator().manual_seed(1))
    mu, cov = w.double().mean(0), torch.cov(w.double().T, correction=0)
    assert rows.dtype == torch.float64 and rows.shape == (40000, 8)
    torch.testing.assert_close(rows.mean(0), mu, rtol=0, atol=3e-4)
    torch.testing.assert_close(torch.cov(rows.T), 1e-5 * cov, rtol=0.05, atol=0.05 * 1e-5 * cov.abs().max().item())
    few = export.sample_new_rows(w[:3], 5, torch.Generator().manual_seed(1))  # rank-2 covariance: eigh branch
    assert few.isfinite().all() and torch.allclose(few.mean(0), w[:3].double().mean(0), atol=0.05)


def test_finetune_from_llava_and_llava_hf_folders(ckpt, assets, tmp_path):
    """Stage 2 started from the LLaVA folder and from its llava-hf export: same weights, so the same losses."""
    s, runs = formats.read_settings(ckpt[0]), []
    model_flags = dict(
        mm_vision_select_layer=s.mm_vision_select_layer, mm_vision_select_feature=s.mm_vision_select_feature
    )
    for name, start in (("from_llava", ckpt[0]), ("from_hf", ckpt[1])):
        out = str(tmp_path / name)
        argv = flags(assets, out, stage=2, max_steps=3, model_name_or_path=start, **model_flags)
        train.main([a for a in argv if a not in ("--init_projector", "random")])  # the projector comes with it
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs.append([json.loads(line)["loss"] for line in f])
    assert runs[0] == runs[1] and len(runs[0]) == 3
    with pytest.raises(ValueError, match="was trained with"):
        argv = flags(assets, str(tmp_path / "bad"), stage=2, model_name_or_path=ckpt[0], mm_vision_select_layer=-3)
        train.main([a for a in argv if a not in ("--init_projector", "random")])


@pytest.mark.parametrize("version", [v for v in KNOWN_VERSIONS if get_template(v).style != "plain"])
def test_chat_template_is_the_inference_prompt_of_every_version(version):
    """The processor's chat template renders what generate and LLaVA's eval prompt with, for every template (an
    image first, then the question, an open assistant turn), and a conversation with a system message."""
    from family_tokenizers import llama3_tokenizer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template(export.chat_template(version))
    image_q = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    want = build_inference_prompt(QUESTION, version, True, llama3_tokenizer())
    assert template.render(messages=image_q, add_generation_prompt=True) == want
    turns = [{"role": "system", "content": "S."}, {"role": "user", "content": "Q1?"},
             {"role": "assistant", "content": "A1."}, {"role": "user", "content": "Q2?"}]  # fmt: skip
    text = template.render(messages=turns, add_generation_prompt=True)
    assert "S." in text and text.index("Q1?") < text.index("A1.") < text.index("Q2?")
    assert text.endswith(build_inference_prompt("Q2?", version, False, llama3_tokenizer()).rpartition("Q2?")[2])
