"""Greedy decoding: the KV-cache path equals recomputing the whole sequence, and the CLI runs end to end on a
checkpoint written by train.main, agreeing with its llava-hf export and with transformers' own generate()."""

import os

import pytest
import torch
from conftest import draw_shape, flags, tiny_clip_config, tiny_llama_config
from transformers import AutoProcessor, LlavaForConditionalGeneration

import train
from minillava import export, generate
from minillava.constants import IMAGE_TOKEN_INDEX
from minillava.conversation import build_inference_prompt, tokenizer_image_token
from minillava.data import load_tokenizer, open_image, process_image
from minillava.model import LlavaSettings, build_llava_from_config

# The decoding loop uses the LLM's current KV-cache argument: transformers' warning on its old name is an error here.
pytestmark = pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")


@pytest.fixture
def tiny_model(seed):
    model = build_llava_from_config(tiny_llama_config(), tiny_clip_config(), LlavaSettings())
    for p in model.parameters():  # a sharper random model: greedy paths then depend on every position
        p.data.normal_(0, 0.5)
    return model.eval()


def prompt_ids(n_text=12, image_at=3):
    ids = torch.randint(3, 512, (n_text,), generator=torch.Generator().manual_seed(1))
    ids[0], ids[image_at] = 1, IMAGE_TOKEN_INDEX
    return ids


def test_kv_cache_matches_recompute(tiny_model):
    ids, pixels = prompt_ids(), torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=20, eos_token_id=None)
    cached = generate.greedy_generate(tiny_model, ids, pixels, use_cache=True, **kw)
    full = generate.greedy_generate(tiny_model, ids, pixels, use_cache=False, **kw)
    assert cached == full and len(cached) == 20
    assert len(set(cached)) > 3  # not a degenerate constant sequence
    # The image matters: another image changes the continuation.
    other = generate.greedy_generate(tiny_model, ids, torch.zeros_like(pixels), use_cache=True, **kw)
    assert other != cached


def test_stops_at_eos(tiny_model):
    ids, pixels = prompt_ids(), torch.zeros(1, 3, 28, 28)
    first = generate.greedy_generate(tiny_model, ids, pixels, max_new_tokens=5, eos_token_id=None)
    eos = first[1]
    stopped = generate.greedy_generate(tiny_model, ids, pixels, max_new_tokens=5, eos_token_id=eos)
    assert stopped == first[: first.index(eos) + 1]


def test_cli_end_to_end(assets, tmp_path, capsys, monkeypatch):
    """train.main (1 step, given relative folders) -> generate CLI from another directory on the LLaVA folder and on
    its llava-hf export (same answer), and transformers' generate() on the export (chat template + processor) picks
    the same greedy tokens. The outputs record absolute folders: they work from anywhere."""
    import json
    import shutil

    stage2, hf = str(tmp_path / "work" / "stage2"), str(tmp_path / "hf")
    for name in ("llm", "clip"):
        shutil.copytree(assets[name], tmp_path / "work" / name)
    monkeypatch.chdir(tmp_path / "work")
    train.main(flags(assets, "stage2", stage=2, max_steps=1, model_name_or_path="llm", vision_tower="clip"))
    monkeypatch.chdir(tmp_path)
    with open(os.path.join(stage2, "config.json")) as f:
        assert json.load(f)["mm_vision_tower"] == str(tmp_path / "work" / "clip")
    export.main(["--checkpoint", stage2, "--output", hf])
    image = str(tmp_path / "shape.png")
    draw_shape("blue", "triangle", size=(30, 44)).save(image)
    question = "What is the colour of the shape?"
    answers = []
    for folder in (stage2, hf):
        capsys.readouterr()
        generate.main(["--checkpoint", folder, "--image", image, "--prompt", question, "--max_new_tokens", "8"])
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()

    model, settings = generate.load_model(stage2)
    tokenizer = load_tokenizer(stage2, settings.model_max_length)
    processor = generate.load_image_processor_for(stage2, settings, None)
    pixels = process_image(open_image(image), processor, settings.image_aspect_ratio)[None]
    prompt = build_inference_prompt(question, "v1", has_image=True)
    ids = torch.tensor(tokenizer_image_token(prompt, tokenizer))
    ours = generate.greedy_generate(model, ids, pixels, max_new_tokens=8, eos_token_id=tokenizer.eos_token_id)

    hf_model = LlavaForConditionalGeneration.from_pretrained(hf).eval()
    hf_processor = AutoProcessor.from_pretrained(hf, backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = hf_processor(images=open_image(image), text=text, return_tensors="pt")
    out = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out[0, inputs.input_ids.shape[1] :].tolist() == ours
    assert os.path.isfile(os.path.join(hf, "chat_template.jinja"))
