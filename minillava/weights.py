"""Weights in and out: pretrained HF folders -> our parameter names, our names -> LLaVA keys, mm_projector.bin.

Split from model.py (line budget); no torch.distributed. Tensors come back as stored; the caller casts/shards.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

if TYPE_CHECKING:
    from minillava.model import LlavaModel


def to_llava_key(name: str) -> str:
    """Our parameter name -> LLaVA checkpoint key (ref 8.1-8.2)."""
    for ours, theirs in (
        ("llm.model.", "model."),
        ("llm.lm_head.", "lm_head."),
        ("mm_projector.", "model.mm_projector."),
        ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ):
        if name.startswith(ours):  # transformers 5 dropped CLIPVisionModel's `vision_model.` level; LLaVA has it
            return theirs + name[len(ours) :]
    raise ValueError(f"to_llava_key: {name!r} is not a LlavaModel parameter name")


def mm_projector_state_dict(model: LlavaModel) -> dict[str, Tensor]:
    """mm_projector.bin content keyed model.mm_projector.* (ref 8.1); DTensors under FSDP2 (the caller gathers)."""
    return {to_llava_key(f"mm_projector.{k}"): v.detach() for k, v in model.mm_projector.state_dict().items()}


def read_mm_projector(model: nn.Module, path: str) -> dict[str, Tensor]:
    """LLaVA's mm_projector.bin as {mm_projector.*: tensor in the param dtype}, checked against model.mm_projector."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"--pretrain_mm_mlp_adapter {path}: file not found") from None
    weights = {k.split("mm_projector.")[-1]: v for k, v in weights.items() if "mm_projector." in k}  # ref 5.4 step 5
    expected = model.mm_projector.state_dict()
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"--pretrain_mm_mlp_adapter {path}: missing keys {missing}, unexpected keys {unexpected} "
            "(is --mm_projector_type the one the adapter was trained with?)"
        )
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"--pretrain_mm_mlp_adapter {path}: mm_projector.{k} has shape {tuple(v.shape)}, "
                f"the model expects {tuple(expected[k].shape)}"
            )
    return {f"mm_projector.{k}": v.to(expected[k].dtype) for k, v in weights.items()}


def load_mm_projector(model: nn.Module, path: str) -> None:
    """Load --pretrain_mm_mlp_adapter into an unsharded model, strict (ref 5.4 step 5); ValueError naming the file."""
    weights = read_mm_projector(model, path)
    model.mm_projector.load_state_dict({k.removeprefix("mm_projector."): v for k, v in weights.items()}, strict=True)


def read_weights(folder: str, flag: str) -> dict[str, Tensor]:
    """All tensors of an HF folder: model.safetensors, a sharded index, or pytorch_model*.bin (weights_only)."""
    for name in (
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
        "model.safetensors",
        "pytorch_model.bin",
    ):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            break
    else:
        raise ValueError(f"{flag} {folder!r}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")
    files = [path]
    if name.endswith(".index.json"):
        with open(path) as f:
            files = [os.path.join(folder, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    out: dict[str, Tensor] = {}
    for file in files:
        out.update(load_file(file) if file.endswith(".safetensors") else torch.load(file, "cpu", weights_only=True))
    return out


def pretrained_state_dict(model_name_or_path: str, vision_tower: str) -> dict[str, Tensor]:
    """Pretrained LLM + CLIP tensors keyed by our names (llm.*, vision_tower.*), as stored; no projector."""
    # Old checkpoints carry buffers that are non-persistent today (Vicuna's rotary inv_freq, CLIP's position_ids).
    drop = (".inv_freq", ".position_ids")
    llm = read_weights(model_name_or_path, "--model_name_or_path")
    out = {f"llm.{k}": v for k, v in llm.items() if not k.endswith(drop)}
    clip = read_weights(vision_tower, "--vision_tower")
    # openai/clip-* folders are full CLIPModels (vision_model.*, text_model.*): keep the vision half. A transformers 5
    # CLIPVisionModel.save_pretrained folder has no prefix.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in clip) else ""
    out.update(
        {
            f"vision_tower.{k.removeprefix(prefix)}": v
            for k, v in clip.items()
            if k.startswith(prefix) and not k.endswith(drop)
        }
    )
    return out
