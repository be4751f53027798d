"""A LoRA run's output_dir (llava/train/train.py, end of train()): config.json, peft's adapter_config.json and
adapter_model.safetensors, and non_lora_trainables.bin (the projector), keys under PeftModel's base_model.model.
Written by outputs.py (lora_config, lora_content); read and merged into its base by `export --merge_lora`
(scripts/merge_lora_weights.py)."""

import json
import os
from collections.abc import Iterable

import torch
from safetensors.torch import load_file
from torch import Tensor

from minillava.formats.folders import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    checkpoint_kind,
    folder_config,
    pretrained_state_dict,
    unexpected_key,
)
from minillava.formats.hub import local_folder
from minillava.formats.llava import clip_folder, from_llava_key, recorded_name, to_llava_key
from minillava.lora import merge_lora

NON_LORA = "non_lora_trainables.bin"  # LLaVA's: the projector
_PEFT = "base_model.model."  # PeftModel's prefix before LlavaLlamaForCausalLM's keys, in both files


def to_peft_key(name: str) -> str:
    """Our parameter name -> its key in LLaVA's LoRA files (base_model.model.model.layers.0...lora_A.weight)."""
    return _PEFT + to_llava_key(name)


def from_peft_key(key: str, path: str) -> str:
    """A key of LLaVA's LoRA files -> our name (peft < 0.5 and LLaVA's own keys have no adapter-name level)."""
    if not key.startswith(_PEFT):
        raise unexpected_key(path, key)
    return from_llava_key(key[len(_PEFT) :], path)


def lora_config(cfg, target_modules: list[str]):
    """adapter_config.json as peft's LoraConfig, built as LLaVA's train() builds it (task CAUSAL_LM)."""
    from peft import LoraConfig  # the optional extra minillava[lora]; check_paths asks for it up front

    t = cfg.train
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, target_modules=target_modules, lora_dropout=t.lora_dropout,
                      bias=t.lora_bias, task_type="CAUSAL_LM",
                      base_model_name_or_path=recorded_name(cfg.model.model_name_or_path))  # fmt: skip


def lora_content(named: Iterable[tuple[str, Tensor]], dtype: torch.dtype) -> dict[str, Tensor]:
    """The adapter_model.safetensors / non_lora_trainables.bin dict from (our name, tensor) pairs."""
    return {to_peft_key(n): t.to(dtype).contiguous() for n, t in named}


def read_lora_output(path: str) -> tuple[dict, dict[str, Tensor], dict[str, Tensor]]:
    """(adapter_config, adapter weights, non-LoRA trainables) of a LoRA output_dir, tensors keyed by our names.
    The weights are adapter_model.safetensors, or adapter_model.bin (peft < 0.6, as LLaVA's releases)."""
    if checkpoint_kind(path) != "llava-lora":
        raise ValueError(f"--merge_lora {path}: not a LoRA output_dir ({ADAPTER_CONFIG} + LLaVA config.json)")
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        conf = json.load(f)
    if conf.get("peft_type", "LORA") != "LORA" or conf.get("bias", "none") != "none":
        raise ValueError(f"--merge_lora {path}: only LoRA adapters without bias are supported")
    file = os.path.join(path, ADAPTER_WEIGHTS)
    raw = load_file(file) if os.path.isfile(file) else torch.load(file[: -len(".safetensors")] + ".bin",
                                                                  weights_only=True)  # fmt: skip
    adapters = {from_peft_key(k, path).replace(".default.", "."): v for k, v in raw.items()}
    non_lora = torch.load(os.path.join(path, NON_LORA), weights_only=True)
    return conf, adapters, {from_peft_key(k, path): v for k, v in non_lora.items()}


def merged_lora_state(path: str, base: str | None = None, vision_tower: str | None = None) -> tuple[dict, dict, str]:
    """(config.json, full state keyed by our names, base) of a LoRA output_dir merged into its base: the LLM of `base`
    (default: adapter_config's base_model_name_or_path) with W + B A alpha / r, CLIP from `vision_tower` (default
    the config's mm_vision_tower), the projector from non_lora_trainables.bin (scripts/merge_lora_weights.py)."""
    conf_lora, adapters, non_lora = read_lora_output(path)
    base = base or conf_lora.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"--merge_lora {path}: pass --model_name_or_path, the base LLM the adapters were trained on")
    base = local_folder(base, "--model_name_or_path")
    conf = folder_config(path)
    state = pretrained_state_dict(base, clip_folder(path, vision_tower))
    if missing := sorted(k for k in adapters if k.rsplit(".lora_", 1)[0] + ".weight" not in state):
        raise ValueError(f"--model_name_or_path {base}: no base weight for adapter {missing[0]}")
    return conf, merge_lora(state, adapters, conf_lora["lora_alpha"] / conf_lora["r"]) | non_lora, base
