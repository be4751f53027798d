"""Find every record of a LLaVA-format dataset that would crash or silently spoil training, before the run starts:

    python -m minillava.check_data --data_path llava_v1_5_mix665k.json --image_folder ./playground/data \\
        [--version v1] [--model_name_or_path VICUNA_DIR] [--vision_tower CLIP_DIR --image_aspect_ratio pad]

Always checked: record structure, turns (for --version), word counts, and every image decoded as training decodes it
(minillava.data.open_image: readable, a supported PIL mode, within the size bounds for --image_aspect_ratio). With a
tokenizer: tokenization, label placement, samples left with no supervised token after truncation. With
--vision_tower: the CLIP processor as well. Both may be hub ids, as for training (read from the hub cache, downloaded
into it unless HF_HUB_OFFLINE=1). Prints every bad record (index, id, reason); exits 1 if any."""

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from tqdm import tqdm

from minillava.cli import run_tool
from minillava.constants import IGNORE_INDEX
from minillava.conversation import KNOWN_VERSIONS, check_conversations, get_template, preprocess
from minillava.data import (
    ASPECT_RATIOS,
    load_image_processor,
    load_records,
    load_tokenizer,
    open_image,
    process_image,
    word_count,
)
from minillava.formats.folders import folder_tower_config
from minillava.formats.hub import fetch
from minillava.layout import supervised_tokens
from minillava.model import image_tokens

BLOCK = 2048  # records handed to the thread pool at a time (bounded memory, a live progress bar)


def check_record(record: Any, args: argparse.Namespace, tokenizer: Any, processor: Any) -> str | None:
    """Why this record is bad, or None if it is fine."""
    try:
        if word_count(record) == 0:
            return "the sample has zero words"
        has_image = "image" in record
        if tokenizer is None:
            check_conversations(record["conversations"], args.version, has_image)
        else:
            ids, labels = preprocess(record["conversations"], tokenizer, args.version, has_image)
            ids, labels = torch.tensor(ids[: args.model_max_length]), torch.tensor(labels[: args.model_max_length])
            if supervised_tokens(ids, labels, args.image_tokens, args.model_max_length) == 0:
                if (labels[1:] != IGNORE_INDEX).any():
                    return (f"no supervised tokens within --model_max_length {args.model_max_length}: its "
                            f"{args.image_tokens} image tokens push all its answers past it")  # fmt: skip
                return f"no supervised tokens within --model_max_length {args.model_max_length}"
        if has_image:
            if not isinstance(record["image"], str) or args.image_folder is None:
                return f"'image' must be a path relative to --image_folder, got {record['image']!r}"
            img = open_image(os.path.join(args.image_folder, record["image"]), args.image_aspect_ratio)
            if processor is not None:
                process_image(img, processor, args.image_aspect_ratio)
    except ValueError as e:  # includes TokenizationMismatch
        return str(e)
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags use LLaVA's names so a training command's values can be pasted."""
    p = argparse.ArgumentParser(prog="python -m minillava.check_data", description=__doc__.splitlines()[0])
    p.add_argument("--data_path", required=True)
    p.add_argument("--image_folder", default=None)
    p.add_argument("--version", default="v1", help=f"template whose rules apply: {', '.join(KNOWN_VERSIONS)}")
    p.add_argument("--model_name_or_path", "--tokenizer", dest="model_name_or_path", default=None)
    p.add_argument("--model_max_length", type=int, default=2048)
    p.add_argument("--vision_tower", default=None, help="run the CLIP processor on every image (slower)")
    p.add_argument("--image_aspect_ratio", default="pad", choices=ASPECT_RATIOS,
                   help="as for training: sets the image size bound (pad: the square canvas) and the preprocessing")
    p.add_argument("--image_tokens", type=int, default=None,
                   help="LLM positions one <image> takes (default: from --vision_tower's config, else 576, CLIP-L/336)")
    p.add_argument("--num_workers", type=int, default=8, help="threads (image decoding dominates)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check the dataset; return the exit status (0 clean, 1 bad records, 2 unusable input)."""
    args = parse_args(argv)
    try:
        get_template(args.version)
        records = load_records(args.data_path)
        llm = fetch(args.model_name_or_path, "--model_name_or_path") if args.model_name_or_path else None
        clip = fetch(args.vision_tower, "--vision_tower") if args.vision_tower else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(llm, args.model_max_length) if llm else None
    processor = load_image_processor(clip) if clip else None
    if args.image_tokens is None:
        args.image_tokens = 576
        if clip and os.path.isfile(os.path.join(clip, "config.json")):  # else a processor-only folder: the default
            args.image_tokens = image_tokens(folder_tower_config(clip, "--vision_tower"))
    reasons: list[str | None] = []
    with ThreadPoolExecutor(max(1, args.num_workers)) as pool, tqdm(total=len(records), unit="sample") as bar:
        for start in range(0, len(records), BLOCK):
            block = records[start : start + BLOCK]
            reasons += pool.map(lambda r: check_record(r, args, tokenizer, processor), block)
            bar.update(len(block))
    bad = [(i, reason) for i, reason in enumerate(reasons) if reason]
    for i, reason in bad:
        rid = records[i].get("id", "?") if isinstance(records[i], dict) else "?"
        print(f"BAD sample {i} id={rid!r}: {reason}")
    checks = ["structure", "decoded images"] + ["tokenization"] * bool(tokenizer) + ["pixels"] * bool(processor)
    checks_str = ", ".join(checks)
    print(f"{args.data_path}: {len(bad)} bad of {len(records)} samples (checked {checks_str}; version {args.version})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
