"""Each LLaVA-family backbone end to end, as a user runs it: an LLM folder of the family (its config quirks, its
tokenizer's special tokens and chat template) with a CLIP or SigLIP tower; stage 1 on one rank, stage 2 from its
mm_projector.bin on two (gloo) with the family's LLaVA-NeXT template; the stage-2 folder typed for LLaVA-NeXT's
builder; generate; and the llava-hf export, which transformers' LlavaForConditionalGeneration loads and whose
chat template + processor + model give minillava's own ids, pixels and logits."""

import json
import os
import shutil

import family_tokenizers
import pytest
import torch
from conftest import draw_shape, flags, siglip_folder, tiny_family_config
from dist import run_distributed
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

import train
from minillava import export, formats, generate
from minillava.constants import IMAGE_TOKEN_INDEX
from minillava.conversation import build_inference_prompt, tokenizer_image_token
from minillava.data import load_image_processor, load_tokenizer, process_image
from minillava.generate import load_model

QUESTION = "What is the colour of the shape?"
CASES = {  # LLM family, tokenizer (None: the fixture's SentencePiece one), tower, --version, LLaVA-NeXT type
    "llama3_clip": ("llama", "llama3_tokenizer", "clip", "llava_llama_3", ("llava_llama", "LlavaLlamaForCausalLM")),
    "mistral_clip": ("mistral", None, "clip", "mistral_instruct", ("llava_mistral", "LlavaMistralForCausalLM")),
    "qwen2_siglip": ("qwen2", "qwen2_tokenizer", "siglip", "qwen_2", ("llava_qwen", "LlavaQwenForCausalLM")),
    "qwen3_siglip": ("qwen3", "qwen2_tokenizer", "siglip", "chatml_direct", ("llava_qwen3", "LlavaQwen3ForCausalLM")),
}


def _llm_folder(assets, root: str, family: str, make: str | None) -> str:
    """The family's LLM folder: random weights (tied families: no lm_head.weight on disk) and a tokenizer; a Qwen2
    embedding has more rows than its tokenizer has tokens (Qwen2-7B: 152064 rows, 151646 tokens)."""
    folder = os.path.join(root, family)
    if make:
        tokenizer = getattr(family_tokenizers, make)()
        tokenizer.save_pretrained(folder)
        vocab = len(tokenizer) + (8 if family == "qwen2" else 0)
    else:
        os.makedirs(folder)
        for name in os.listdir(assets["llm"]):
            if "token" in name or name.endswith(".model"):
                shutil.copy(os.path.join(assets["llm"], name), folder)
        vocab = 512
    torch.manual_seed(0)
    config = tiny_family_config(family, vocab)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in set(f.keys())) != config.tie_word_embeddings
    return folder


def _dist_main(rank, world, argv):
    train.main(argv)


def _minillava_logits(stage2: str, version: str, img):
    ours, settings = load_model(stage2)
    tokenizer = load_tokenizer(stage2, settings.model_max_length)
    ids = torch.tensor([tokenizer_image_token(build_inference_prompt(QUESTION, version, True, tokenizer), tokenizer)])
    pixels = process_image(img, load_image_processor(settings.vision_tower), settings.image_aspect_ratio)[None]
    with torch.no_grad():
        embeds, _, mask, pos = ours.embed_inputs(ids, torch.ones_like(ids, dtype=torch.bool), pixels)
        logits = ours.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits  # (1, T2, V)
    return ids, pixels, logits, ours.num_image_tokens


@pytest.mark.dist
@pytest.mark.parametrize("case", list(CASES))
def test_family_end_to_end(assets, tmp_path, capsys, case):
    family, make, tower, version, llava_type = CASES[case]
    llm = _llm_folder(assets, str(tmp_path), family, make)
    vision = assets["clip"] if tower == "clip" else siglip_folder(str(tmp_path))
    one, two, hf = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "hf")
    train.main(flags(assets, one, stage=1, model_name_or_path=llm, vision_tower=vision, max_steps="2"))
    argv = flags(assets, two, model_name_or_path=llm, vision_tower=vision, version=version, max_steps="2",
                 logging_steps="1", pretrain_mm_mlp_adapter=os.path.join(one, "mm_projector.bin"),
                 init_projector="auto", model_max_length="192")  # fmt: skip
    run_distributed(_dist_main, tmp_path, argv)
    with open(os.path.join(two, "metrics.jsonl")) as f:
        rows = [row for row in map(json.loads, f) if "loss" in row]
    assert len(rows) == 2 and all(0 < r["loss"] < 10 and r["label_tokens"] > 0 for r in rows)
    with open(os.path.join(two, "config.json")) as f:
        conf = json.load(f)
    assert (conf["model_type"], conf["architectures"][0]) == llava_type  # LLaVA-NeXT's builder dispatches on these

    image = str(tmp_path / "shape.png")
    draw_shape("blue", "triangle", size=(30, 44)).save(image)
    capsys.readouterr()
    generate.main(["--checkpoint", two, "--image", image, "--prompt", "What is it?", "--version", version,
                   "--max_new_tokens", "3"])  # fmt: skip
    assert capsys.readouterr().out.endswith("\n")  # an answer (a random tiny model may stop at once)

    export.main(["--checkpoint", two, "--output", hf, "--version", version])
    img = draw_shape("red", "circle", size=(40, 26))
    ids, pixels, want, n_image = _minillava_logits(two, version, img)
    model = LlavaForConditionalGeneration.from_pretrained(hf).eval()
    assert model.config.text_config.model_type == family
    assert model.config.vision_config.model_type == f"{tower}_vision_model"
    processor = AutoProcessor.from_pretrained(hf, backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor(images=img, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")  # fmt: skip
    image_id = model.config.image_token_index
    expanded = [t for i in ids[0].tolist() for t in ([image_id] * n_image if i == IMAGE_TOKEN_INDEX else [i])]
    assert inputs.input_ids[0].tolist() == expanded
    assert torch.equal(inputs.pixel_values, pixels)
    with torch.no_grad():
        got = model(**inputs).logits
    vocab = want.shape[-1]
    torch.testing.assert_close(got[..., :vocab], want, rtol=0, atol=1e-5)
    if family != "llama":  # importing a llava-hf folder back (to finetune it) is LLaVA-1.5's layout only
        with pytest.raises(ValueError, match=rf"only Llama \+ CLIP .*\(this one: {family} \+ {tower}_vision_model\)"):
            formats.read_settings(hf)
