"""The demo: a tiny Vicuna-like tokenizer, random Llama/CLIP folders and a synthetic coloured-shapes dataset, made
offline in seconds, plus a held-out colour-accuracy check that shows a trained model reads the image.

    python -m minillava.demo --out demo_out        # writes the assets, prints the stage-1 / stage-2 commands
    bash configs/demo.sh                            # assets, stage 1, stage 2 (torchrun, 2 CPU ranks), evaluation
"""

import argparse
import io
import json
import os
import random
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw

from minillava.cli import run_tool
from minillava.conversation import get_template, preprocess
from minillava.data import DataCollator, describe, load_records, open_image, process_image

if TYPE_CHECKING:
    from minillava.model import LlavaModel

# The tokenizer corpus holds v1 prompts so the BPE merges cover the system prompt, as Vicuna's do.
SYSTEM = get_template("v1").system
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["square", "circle", "triangle"]
_FILLER = (  # words for the tokenizer corpus
    "the a an image picture photo shows describe what is colour color of this shape there on background "
    "please answer question short long small large one two three yes no it in with and"
)
WORDS = _FILLER.split()

# The demo draws chromatic shapes on a white or black background, so "the colour of the shape" is never ambiguous.
SHAPE_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
BACKGROUNDS = ["white", "black"]
EVAL_QUESTION = "What is the colour of the shape?"
ANSWER = "The shape is {colour}."  # the finetune answer to every colour question; the evaluator scores it per colour
CAPTION = "A {colour} {shape} on a {background} background."  # the pretrain caption
_COLOUR_QUESTIONS = [EVAL_QUESTION, "What colour is the shape?", "Which colour does the shape have?"]
_SHAPE_QUESTIONS = ["What shape is it?", "What is the shape in the image?"]
_SHAPE_ANSWER = "It is a {shape}."
_CAPTION_PROMPTS = ["Describe the image briefly.", "What is in the picture?", "Give a short description of this image."]

# Tiny model sizes: big enough to learn the task in minutes on 2 CPU cores, small enough that a step is milliseconds.
IMAGE_SIZE = 56  # 56 / 14 = 4x4 = 16 image tokens per sample
LLM_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,  # as Vicuna: a separate lm_head
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CLIP_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=14,
    projection_dim=32,
)


# The demo's train.py flags, {out} = the assets folder. On top of the --stage presets (LLaVA's v1.5 scripts) they
# fit a 2-core CPU: fp32, no checkpointing, batch 8 per rank (global 16), and a far higher stage-2 learning rate
# and more epochs than LLaVA's 2e-5 x 1, because the LLM starts from random weights, not from Vicuna.
_COMMON_FLAGS = {
    "model_name_or_path": "{out}/llm",
    "vision_tower": "{out}/clip",
    "image_folder": "{out}/data",
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": "-2",
    "mm_use_im_start_end": "False",
    "mm_use_im_patch_token": "False",
    "bf16": "False",
    "gradient_checkpointing": "False",
    "per_device_train_batch_size": "8",
    "gradient_accumulation_steps": "1",
    "model_max_length": "512",
    "weight_decay": "0.",
    "warmup_ratio": "0.03",
    "lr_scheduler_type": "cosine",
    "save_steps": "0",
    "logging_steps": "10",
    "dataloader_num_workers": "0",
    "report_to": "none",
}
STAGE1_FLAGS = {
    "stage": "1",
    "version": "plain",
    "data_path": "{out}/data/pretrain.json",
    "tune_mm_mlp_adapter": "True",
    **_COMMON_FLAGS,
    "output_dir": "{out}/stage1",
    "num_train_epochs": "1",
    "learning_rate": "1e-3",
}
STAGE2_FLAGS = {
    "stage": "2",
    "version": "v1",
    "data_path": "{out}/data/finetune.json",
    "pretrain_mm_mlp_adapter": "{out}/stage1/mm_projector.bin",
    **_COMMON_FLAGS,
    "image_aspect_ratio": "pad",
    "group_by_modality_length": "True",
    "output_dir": "{out}/stage2",
    "num_train_epochs": "3",
    "learning_rate": "1e-3",
}


def _corpus(n: int = 4000) -> list[str]:
    """Text shaped like LLaVA data (v1 prompts, captions, questions) so the BPE merges resemble Vicuna's. No newlines
    and no <image>: as in Vicuna, "\n" and "<" then reach the model through byte fallback."""
    r = random.Random(0)
    out = []
    for _ in range(n):
        q = " ".join(r.choice(WORDS + COLOURS + SHAPES) for _ in range(r.randint(3, 12))) + r.choice("?.!")
        a = " ".join(r.choice(WORDS + COLOURS + SHAPES) for _ in range(r.randint(1, 10))) + "."
        kind = r.random()
        if kind < 0.15:
            out.append(f"{SYSTEM} USER: {q} ASSISTANT: {a}</s>USER: {q} ASSISTANT: {a}</s>")
        elif kind < 0.7:
            out.append(f"A {r.choice(COLOURS)} {r.choice(SHAPES)} on a {r.choice(COLOURS)} background.")
        else:
            out.append(q + " " + a)
    return out


def build_tokenizer_dir(path: str, vocab_size: int = 512) -> str:
    """Write a Vicuna-v1.5-like tokenizer folder: tokenizer.model only (no tokenizer.json), legacy=false,
    <unk>=0, <s>=1, </s>=2, byte fallback, LLaMA's identity normalisation with the dummy '▁' prefix."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,  # one thread keeps the trained model byte-identical run to run
        minloglevel=2,
    )
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "model_max_length": 2048,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


def draw_shape(
    colour: str,
    shape: str,
    size: tuple[int, int] = (40, 30),
    bg: str = "white",
    box: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """A coloured shape inside `box` (default: the centred half-size box) on a plain background."""
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    w, h = size
    x0, y0, x1, y1 = box if box is not None else (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        d.polygon([((x0 + x1 + 1) // 2, y0), (x0, y1), (x1, y1)], fill=colour)  # apex w // 2 for the default box
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return img


def _random_image(r: random.Random, colour: str, shape: str, background: str) -> Image.Image:
    """A non-square canvas (so --image_aspect_ratio pad has work to do) with the shape at a random place and size."""
    w, h = r.randint(40, 96), r.randint(40, 96)
    side = r.randint(int(0.4 * min(w, h)), int(0.8 * min(w, h)))
    x0, y0 = r.randint(0, w - side), r.randint(0, h - side)
    return draw_shape(colour, shape, (w, h), background, (x0, y0, x0 + side - 1, y0 + side - 1))


def _turn(human: str, gpt: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def _finetune_conversation(r: random.Random, colour: str, shape: str) -> list[dict[str, str]]:
    """A v1 conversation about one image: a colour question, a shape question, or both in either order."""
    colour_turn = (r.choice(_COLOUR_QUESTIONS), ANSWER.format(colour=colour))
    shape_turn = (r.choice(_SHAPE_QUESTIONS), _SHAPE_ANSWER.format(shape=shape))
    kind = r.random()
    turns = [colour_turn] if kind < 0.5 else [shape_turn] if kind < 0.65 else r.sample([colour_turn, shape_turn], 2)
    convs = []
    for i, (q, a) in enumerate(turns):
        convs += _turn("<image>\n" + q if i == 0 else q, a)
    return convs


def _text_only_record(r: random.Random, i: int) -> dict[str, Any]:
    """A text-only v1 sample (LLaVA's 665K mix has ShareGPT ones): a question whose answer needs no image."""
    shape = r.choice(SHAPES)
    corners = {"square": "four", "triangle": "three", "circle": "no"}[shape]
    return {
        "id": f"text-{i:05d}",
        "conversations": _turn(f"How many corners does a {shape} have?", f"A {shape} has {corners} corners."),
    }


def make_demo_assets(out_dir: str, *, n_train: int = 2000, n_eval: int = 60, seed: int = 0) -> dict[str, str]:
    """Write the tokenizer, random LLM and CLIP folders and the coloured-shapes dataset; returns their paths."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from transformers.models.clip import CLIPImageProcessorPil

    paths = {
        "llm": os.path.join(out_dir, "llm"),
        "clip": os.path.join(out_dir, "clip"),
        "image_folder": os.path.join(out_dir, "data"),
        "pretrain": os.path.join(out_dir, "data", "pretrain.json"),
        "finetune": os.path.join(out_dir, "data", "finetune.json"),
        "eval": os.path.join(out_dir, "data", "eval.json"),
    }
    # (a) A Vicuna-like folder: tokenizer files next to a randomly initialised LlamaForCausalLM.
    build_tokenizer_dir(paths["llm"])
    with torch.random.fork_rng():  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=512, **LLM_CONFIG))
        llm.save_pretrained(paths["llm"])
        # (b) A CLIP-like folder: random vision tower plus the processor config at the tiny resolution.
        CLIPVisionModel(CLIPVisionConfig(**CLIP_CONFIG)).save_pretrained(paths["clip"])
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop).save_pretrained(paths["clip"])

    # (c) The dataset: train images serve both stages (LLaVA uses different sets; here the task is the point).
    os.makedirs(os.path.join(paths["image_folder"], "images"), exist_ok=True)
    r = random.Random(seed)
    pretrain, finetune, evaluation = [], [], []
    for i in range(n_train + n_eval):
        held_out = i >= n_train
        # Held-out colours cycle through the palette so accuracy is not skewed by an unlucky draw.
        colour = SHAPE_COLOURS[i % len(SHAPE_COLOURS)] if held_out else r.choice(SHAPE_COLOURS)
        shape, background = r.choice(SHAPES), r.choice(BACKGROUNDS)
        name = f"images/{'eval' if held_out else 'train'}_{i:05d}.png"
        _random_image(r, colour, shape, background).save(os.path.join(paths["image_folder"], name))
        meta = {"colour": colour, "shape": shape, "background": background}
        if held_out:
            convs = _turn("<image>\n" + EVAL_QUESTION, ANSWER.format(colour=colour))
            evaluation.append({"id": f"eval-{i:05d}", "image": name, "conversations": convs, **meta})
            continue
        # LLaVA's pretrain instructions put <image> before or after the text; the plain template drops them anyway.
        prompt = r.choice(_CAPTION_PROMPTS)
        prompt = "<image>\n" + prompt if r.random() < 0.5 else prompt + "\n<image>"
        pretrain.append({"id": f"cap-{i:05d}", "image": name, "conversations": _turn(prompt, CAPTION.format(**meta))})
        finetune.append(
            {"id": f"vqa-{i:05d}", "image": name, "conversations": _finetune_conversation(r, colour, shape)}
        )
    finetune += [_text_only_record(r, i) for i in range(max(1, n_train // 20))]
    r.shuffle(finetune)
    for key, records in (("pretrain", pretrain), ("finetune", finetune), ("eval", evaluation)):
        with open(paths[key], "w") as f:
            json.dump(records, f, indent=1)
    return paths


def _candidate_answer(record: dict[str, Any], colour: str, version: str) -> str:
    """The assistant text a model trained on this data would give if the shape had `colour`."""
    if get_template(version).style == "plain":  # stage 1 learns captions only (the instruction is dropped)
        return CAPTION.format(colour=colour, shape=record["shape"], background=record["background"])
    return ANSWER.format(colour=colour)


def evaluate_colour_accuracy(
    model: "LlavaModel",
    tokenizer: Any,
    image_processor: Any,
    eval_json: str,
    image_folder: str,
    *,
    version: str = "v1",
    image_aspect_ratio: str = "pad",
    colours: Sequence[str] = SHAPE_COLOURS,
) -> float:
    """Share of held-out images whose true colour gets the lowest summed answer loss among `colours` (chance:
    1 / len(colours)). Each candidate is tokenized exactly as in training (conversation.preprocess), so only the
    answer tokens are scored, given the inference prompt (v1: system + USER: <image>\\nQ ASSISTANT:)."""
    records = load_records(eval_json)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    collate = DataCollator(pad_token_id=pad_id, model_max_length=model.model_max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i, record in enumerate(records):
            if not isinstance(record, dict) or not record.get("conversations") or "image" not in record:
                raise ValueError(f"{describe(i, record, eval_json)}: needs 'image' and 'conversations'")
            if record.get("colour") not in colours:
                raise ValueError(f"{describe(i, record, eval_json)}: 'colour' must be one of {list(colours)}")
            image = open_image(os.path.join(image_folder, record["image"]), image_aspect_ratio)
            pixel_values = process_image(image, image_processor, image_aspect_ratio)
            question = record["conversations"][0]["value"]  # "<image>\n" + EVAL_QUESTION
            losses = []
            for colour in colours:
                convs = _turn(question, _candidate_answer(record, colour, version))
                input_ids, labels = preprocess(convs, tokenizer, version, has_image=True)
                sample = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
                batch = collate([{**sample, "pixel_values": pixel_values}])
                # One sample per forward: forward returns the loss summed over the batch.
                loss_sum, _ = model(**model.layout(batch).to(device))
                losses.append(loss_sum.item())
            correct += colours[min(range(len(colours)), key=losses.__getitem__)] == record["colour"]
    model.train(was_training)
    return correct / len(records)


def load_stage2(checkpoint: str) -> tuple["LlavaModel", Any, Any, str]:
    """(model, tokenizer, image_processor, image_aspect_ratio) of a stage-2 output folder, through the same loader
    as `python -m minillava.generate` (LLaVA format as train.py writes it, or a llava-hf export)."""
    from minillava.data import load_tokenizer
    from minillava.generate import load_image_processor_for, load_model

    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise ValueError(f"--checkpoint {checkpoint}: no config.json (expected a stage-2 output_dir)")
    model, settings = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint, settings.model_max_length)
    return model, tokenizer, load_image_processor_for(checkpoint, settings, None), settings.image_aspect_ratio


def training_commands(out_dir: str, nproc_per_node: int = 2) -> list[str]:
    """The stage-1 and stage-2 launch lines for assets in `out_dir` (configs/demo.sh runs the same ones)."""
    launch = f"torchrun --nproc_per_node {nproc_per_node} train.py"
    return [
        " ".join([launch, *(f"--{k} {v.format(out=out_dir)}" for k, v in flags.items())])
        for flags in (STAGE1_FLAGS, STAGE2_FLAGS)
    ]


def main(argv: list[str] | None = None) -> None:
    """Make the demo assets and print the training commands, or (--evaluate) score a stage-2 checkpoint."""
    p = argparse.ArgumentParser(prog="python -m minillava.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="assets folder (llm/, clip/, data/)")
    p.add_argument("--n_train", type=int, default=2000, help="training images (both stages use them)")
    p.add_argument("--n_eval", type=int, default=60, help="held-out evaluation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate", action="store_true", help="score --checkpoint on <out>/data/eval.json")
    p.add_argument("--checkpoint", help="stage-2 output_dir to evaluate")
    p.add_argument("--min_accuracy", type=float, default=0.0, help="exit with status 1 below this accuracy")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file save/load bars of a 2 MB model are noise here
    if not args.evaluate:
        paths = make_demo_assets(args.out, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
        print(f"demo assets in {args.out}: " + ", ".join(f"{k}={v}" for k, v in paths.items()))
        print("train (stage 1, then stage 2), or run everything with: bash configs/demo.sh")
        for command in training_commands(args.out):
            print(command)
        print(f"python -m minillava.demo --evaluate --checkpoint {args.out}/stage2 --out {args.out}")
        return
    if args.checkpoint is None:
        raise ValueError("--evaluate needs --checkpoint (a stage-2 output_dir)")
    model, tokenizer, image_processor, aspect = load_stage2(args.checkpoint)
    data = os.path.join(args.out, "data")
    accuracy = evaluate_colour_accuracy(
        model, tokenizer, image_processor, os.path.join(data, "eval.json"), data, image_aspect_ratio=aspect
    )
    chance = 1 / len(SHAPE_COLOURS)
    print(f"held-out colour accuracy of {args.checkpoint}: {accuracy:.3f} (chance {chance:.3f})")
    if accuracy < args.min_accuracy:
        raise SystemExit(f"accuracy {accuracy:.3f} is below --min_accuracy {args.min_accuracy}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
