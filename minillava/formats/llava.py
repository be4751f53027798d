"""A LLaVA stage-2 folder, as llava/model/builder.py load_pretrained_model reads it: config.json (the LLM's config
plus LLaVA's mm_* fields; LlavaLlamaForCausalLM, model_type llava_llama, or LLaVA-NeXT's class and type for another
LLM family) and safetensors shards under LLaVA's key names (the module tree of llava/model/llava_arch.py). Written by
outputs.py from llava_config; read here with its tower (read_settings, llava_checkpoint_configs,
load_llava_checkpoint_state), which also read a llava-hf folder (formats/llava_hf.py) given in its place."""

import os

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, LlamaConfig

from minillava.backbones import llm_family
from minillava.formats.folders import (
    NON_PERSISTENT,
    checkpoint_kind,
    clip_vision_state,
    folder_config,
    folder_tower_config,
    llm_config_of,
    read_weights,
    unexpected_key,
    weight_files,
)
from minillava.formats.hub import download, fetch, local_folder
from minillava.formats.llava_hf import hf_configs, hf_settings, hf_state
from minillava.model import LlavaSettings

# Our parameter name prefix -> LLaVA's (LlavaLlamaForCausalLM: model.*, lm_head.*, model.mm_projector.*, and CLIP
# under model.vision_tower.vision_tower.vision_model.*: transformers 5 dropped CLIPVisionModel's `vision_model.`
# level, LLaVA's transformers 4 has it).
_LLAVA = (("llm.model.", "model."), ("llm.lm_head.", "lm_head."), ("mm_projector.", "model.mm_projector."),
          ("vision_tower.", "model.vision_tower.vision_tower.vision_model."))  # fmt: skip


_LLAVA_TOWER = "model.vision_tower.vision_tower."  # then a CLIP state dict (clip_vision_state)


def to_llava_key(name: str) -> str:
    """Our parameter name -> LLaVA checkpoint key."""
    for ours, theirs in _LLAVA:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise ValueError(f"to_llava_key: {name!r} is not a LlavaModel parameter name")


def from_llava_key(key: str, path: str) -> str:
    """A LLaVA checkpoint key outside the CLIP copy -> our name (the longest matching prefix wins)."""
    for ours, theirs in sorted(_LLAVA[:3], key=lambda p: -len(p[1])):
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    raise unexpected_key(path, key)


def recorded_name(name: str) -> str:
    """A model flag as an output records it: a local folder as its absolute path (the output then works from any
    directory), a hub id as given."""
    return os.path.abspath(name) if os.path.exists(name) else name


def run_settings(cfg) -> LlavaSettings:
    """The LlavaSettings of a run's flags (its tower recorded_name'd: what config.json's mm_vision_tower says)."""
    m = cfg.model
    return LlavaSettings(
        mm_projector_type=m.mm_projector_type,
        mm_vision_select_layer=m.mm_vision_select_layer,
        mm_vision_select_feature=m.mm_vision_select_feature,
        image_aspect_ratio=cfg.data.image_aspect_ratio,
        model_max_length=cfg.train.model_max_length,
        vision_tower=recorded_name(m.vision_tower),
    )


def llava_config(model: nn.Module, cfg, dtype: torch.dtype) -> dict:
    """A LLaVA folder's config.json: the LLM's config plus LLaVA's mm_* fields (llava/train/train.py,
    llava/model/llava_arch.py), model_type the family's LLaVA one (llava_llama for LLaVA-1.5; LLaVA-NeXT's
    llava_mistral, llava_qwen). The inverse of read_settings."""
    conf = model.llm.config.to_dict()
    m, t, s = cfg.model, cfg.train, run_settings(cfg)
    dtype_name = str(dtype).removeprefix("torch.")
    family = llm_family(model.llm.config, "the LLM")
    conf.update(
        model_type=family.llava_model_type,
        architectures=[family.llava_class],
        dtype=dtype_name,  # of the saved weights (the in-memory LLM config says float32)
        torch_dtype=dtype_name,  # the key transformers 4.x (LLaVA's loader) reads
        mm_vision_tower=s.vision_tower,
        use_mm_proj=True,
        mm_projector_type=s.mm_projector_type,
        mm_hidden_size=model.vision_tower.config.hidden_size,
        mm_vision_select_layer=s.mm_vision_select_layer,
        mm_vision_select_feature=s.mm_vision_select_feature,
        mm_patch_merge_type=m.mm_patch_merge_type,
        image_aspect_ratio=s.image_aspect_ratio,
        tokenizer_padding_side="right",
        tokenizer_model_max_length=s.model_max_length,
        tune_mm_mlp_adapter=m.tune_mm_mlp_adapter,
        freeze_mm_mlp_adapter=t.freeze_mm_mlp_adapter,
        mm_use_im_start_end=m.mm_use_im_start_end,
        mm_projector_lr=t.mm_projector_lr,
        mm_use_im_patch_token=m.mm_use_im_patch_token,
        use_cache=True,
    )
    conf.pop("_name_or_path", None)
    if "rope_theta" in (conf.get("rope_parameters") or {}):  # transformers 4.x (LLaVA) reads only the flat key
        conf.setdefault("rope_theta", conf["rope_parameters"]["rope_theta"])
    return conf


def _check_kind(path: str) -> str:
    if (kind := checkpoint_kind(path)) is None:
        raise ValueError(f"{path!r}: not a llava-hf or LLaVA-format stage-2 folder (config.json model_type)")
    if kind == "llava-lora":
        raise ValueError(f"{path!r}: LoRA adapters, not a model: python -m minillava.export --merge_lora {path} "
                         "--output DIR writes the stage-2 folder")  # fmt: skip
    return kind


def read_settings(path: str) -> LlavaSettings:
    """A stage-2 folder's LlavaSettings: LLaVA's mm_* fields, or a llava-hf config plus its processor's do_pad."""
    conf = folder_config(path)
    if _check_kind(path) == "llava-hf":
        return hf_settings(path, conf)
    get = conf.get
    return LlavaSettings(
        mm_projector_type=get("mm_projector_type", "linear"),  # LLaVA's getattr default (builder.py)
        mm_vision_select_layer=get("mm_vision_select_layer", -2),
        mm_vision_select_feature=get("mm_vision_select_feature", "patch"),
        image_aspect_ratio=get("image_aspect_ratio", "square"),
        model_max_length=get("tokenizer_model_max_length", 2048),
        vision_tower=get("mm_vision_tower"),
    )


def clip_folder(path: str, vision_tower: str | None) -> str:
    """The local CLIP folder of a LLaVA folder: --vision_tower, else its config.json mm_vision_tower (a folder or a
    hub id, as LLaVA records openai/clip-vit-large-patch14-336), through local_folder."""
    if vision_tower:
        return local_folder(vision_tower, "--vision_tower")
    if not (clip := folder_config(path).get("mm_vision_tower")):
        raise ValueError(f"{path!r}: its config.json has no mm_vision_tower; pass --vision_tower CLIP_DIR")
    try:
        return local_folder(clip, f"{path!r}: its vision tower (config.json mm_vision_tower)")
    except ValueError as e:
        raise ValueError(f"{e}; pass --vision_tower CLIP_DIR") from None


def fetch_checkpoint(path: str, vision_tower: str | None, flag: str = "--checkpoint") -> tuple[str, str | None]:
    """fetch for a one-process tool's LLaVA / llava-hf checkpoint and the CLIP it reads: (its local folder, the
    local CLIP folder: --vision_tower, else a LLaVA folder's mm_vision_tower, else None)."""
    folder = fetch(path, flag)
    if vision_tower:
        return folder, fetch(vision_tower, "--vision_tower")
    if checkpoint_kind(folder) != "llava":
        return folder, None
    if clip := folder_config(folder).get("mm_vision_tower"):
        download(clip, f"{path!r}: its vision tower (config.json mm_vision_tower)")
    return folder, clip_folder(folder, None)


def llava_checkpoint_configs(path: str, vision_tower: str | None = None) -> tuple[LlamaConfig, CLIPVisionConfig]:
    """(llm_config, vision_config) of a llava-hf or LLaVA folder without reading weights (every rank builds the meta
    model from these). LLaVA format: CLIP's config from `vision_tower`, else the config's mm_vision_tower folder.
    llava-hf: formats/llava_hf.py hf_configs."""
    kind, conf = _check_kind(path), folder_config(path)
    if not weight_files(path) and os.path.isfile(projector := os.path.join(path, "mm_projector.bin")):
        raise ValueError(f"{path!r}: a stage-1 output, which holds only the projector ({projector}): train stage 2 "
                         f"from it (--pretrain_mm_mlp_adapter {projector}), or export it with its LLM and tower: "
                         f"python -m minillava.export --model_name_or_path LLM --pretrain_mm_mlp_adapter {projector} "
                         "--vision_tower TOWER --output DIR")  # fmt: skip
    if kind == "llava-hf":
        return hf_configs(path, conf)
    tower = clip_folder(path, vision_tower)
    return llm_config_of(conf), folder_tower_config(tower, f"{path!r}: its vision tower")


def llava_state(path: str, vision_tower: str | None, vision_config) -> dict[str, Tensor]:
    """A LLaVA folder's tensors keyed by our names; the tower from the checkpoint's copy, else from its folder (less
    what vision_config has no place for: SigLIP's dropped layer and head)."""
    state = read_weights(path, "checkpoint")
    clip = {k.removeprefix(_LLAVA_TOWER): v for k, v in state.items() if k.startswith(_LLAVA_TOWER)}
    out = {from_llava_key(k, path): v for k, v in state.items() if not k.startswith(_LLAVA_TOWER)}
    out = {k: v for k, v in out.items() if not k.endswith(NON_PERSISTENT)}
    if not clip:  # LLaVA's FSDP path (and some released checkpoints) save no CLIP copy
        clip = read_weights(clip_folder(path, vision_tower), "--vision_tower")
    return out | clip_vision_state(clip, vision_config)


def load_llava_checkpoint_state(
    path: str, vision_tower: str | None = None
) -> tuple[LlamaConfig, CLIPVisionConfig, dict[str, Tensor]]:
    """(llm_config, vision_config, state keyed llm.* / vision_tower.* / mm_projector.*) of a llava-hf or LLaVA folder.
    LLaVA format: CLIP's weights are the checkpoint's copy (model.vision_tower.*), else those of the CLIP folder;
    llava-hf: formats/llava_hf.py hf_state (the rows the converter appended dropped)."""
    llm_config, vision_config = llava_checkpoint_configs(path, vision_tower)
    if checkpoint_kind(path) == "llava-hf":
        return llm_config, vision_config, hf_state(path, llm_config.vocab_size)
    return llm_config, vision_config, llava_state(path, vision_tower, vision_config)
