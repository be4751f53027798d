"""A run's start, from its flags: the checks that read the disk before anything is loaded (check_paths,
check_model_files), hub ids downloaded once per node (fetch_models), the model configs (run_configs; prepare_models
does all of these in order) and rank 0's full initial weights (initial_state), from pretrained LLM and tower
folders, or from a stage-2 folder given as --model_name_or_path."""

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from huggingface_hub import constants
from torch import Tensor
from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig

from minillava.backbones import llm_family, tower_family
from minillava.formats.folders import checkpoint_kind, folder_config, folder_tower_config, pretrained_state_dict
from minillava.formats.hub import download, is_repo_id, local_folder
from minillava.formats.llava import llava_checkpoint_configs, load_llava_checkpoint_state, read_settings, run_settings
from minillava.formats.projector import projector_holder, projector_state, read_mm_projector
from minillava.lora import initial_lora_state
from minillava.model import LlavaSettings, image_tokens


def model_names(cfg) -> dict[str, str]:
    """{flag: name} of the model flags whose value is not a local folder (a hub id to read from the cache)."""
    names = {"--model_name_or_path": cfg.model.model_name_or_path, "--vision_tower": cfg.model.vision_tower}
    return {flag: name for flag, name in names.items() if name is not None and not os.path.isdir(name)}


def check_paths(cfg) -> None:
    """Start-up checks that read the disk (config.py validates without it), before any model is loaded and before
    --output_dir is created: the package --report_to needs is installed, every path exists (a model flag: a local
    folder, a hub id in the hub cache, or one to download when downloads are on), then, when both model flags are
    local folders, check_model_files (otherwise fetch_models runs it once the hub ids are in the cache);
    ValueError naming the flag."""
    d, t = cfg.data, cfg.train
    if t.report_to == "wandb" and importlib.util.find_spec("wandb") is None:  # imported later, by metrics.py
        raise ValueError("--report_to wandb: wandb is not installed: pip install wandb (or pip install "
                         "'minillava[wandb]'), or pass --report_to none")  # fmt: skip
    for flag, name in model_names(cfg).items():
        if not is_repo_id(name) or constants.HF_HUB_OFFLINE:  # else not cached yet is fine: it is downloaded
            local_folder(name, flag)
    resume = t.resume_from_checkpoint if t.resume_from_checkpoint != "auto" else None
    paths = {"--data_path": (d.data_path, "file"), "--image_folder": (d.image_folder, "folder"),
             "--eval_data_path": (d.eval_data_path, "file"),
             "--resume_from_checkpoint": (resume, "folder")}  # fmt: skip
    for flag, (path, kind) in paths.items():
        if path is not None and not (os.path.isdir if kind == "folder" else os.path.isfile)(path):
            why = "does not exist" if not os.path.exists(path) else f"is not a {kind}"
            raise ValueError(f"{flag} {path}: {why} (a local {kind} is expected)")
    if os.path.isfile(cfg.train.output_dir):
        raise ValueError(f"--output_dir {cfg.train.output_dir}: is a file, not a folder")
    if cfg.train.lora_enable and importlib.util.find_spec("peft") is None:
        raise ValueError("--lora_enable True writes peft's adapter format: pip install 'minillava[lora]' (peft)")
    if not model_names(cfg):
        check_model_files(cfg)


def fetch_models(cfg, local_rank: int, barrier: Callable[[], None] = lambda: None) -> None:
    """Model flags given as hub ids (lmsys/vicuna-7b-v1.5, as LLaVA's scripts pass them): each node's first rank
    (local_rank 0) downloads what the node's hub cache lacks (formats/hub.py; nothing when HF_HUB_OFFLINE=1) while
    the other ranks wait (barrier: the process group's), then every rank finds them there and runs the start-up checks
    that read them (check_model_files). Local folders need none of this (check_paths checked them)."""
    names = model_names(cfg)
    if not names:
        return
    failed = None
    if local_rank == 0:
        try:
            for flag, name in names.items():
                download(name, flag)
        except Exception as e:  # raised after the barrier: the waiting ranks must not hang
            failed = e
    barrier()
    if failed is not None:
        raise failed
    for flag, name in names.items():
        local_folder(name, flag)
    check_model_files(cfg)


@dataclass(frozen=True)
class RunModels:
    """What a run reads its models from: the local folders of its model flags and their configs."""

    llm: str  # --model_name_or_path's local folder (a hub id's snapshot in the hub cache)
    tower: str  # --vision_tower's
    configs: tuple  # (llm_config, vision_config): run_configs
    image_tokens: int  # the LLM positions one image takes (model.image_tokens)


def prepare_models(cfg, local_rank: int, barrier: Callable[[], None] = lambda: None) -> RunModels:
    """Every rank, at start-up: the disk checks (check_paths), hub ids into the hub cache once per node
    (fetch_models), then the local folders and configs the run reads its models from. ValueError naming the flag."""
    check_paths(cfg)
    fetch_models(cfg, local_rank, barrier)
    m = cfg.model
    configs = run_configs(cfg)
    return RunModels(llm=local_folder(m.model_name_or_path, "--model_name_or_path"),
                     tower=local_folder(m.vision_tower, "--vision_tower"), configs=configs,
                     image_tokens=image_tokens(configs[1], m.mm_vision_select_feature))  # fmt: skip


def check_model_files(cfg) -> None:
    """The start-up checks that read the model folders: stage 2's adapter rule, and --pretrain_mm_mlp_adapter a
    readable, finite projector of the run's shapes (read here by every rank, so a bad file stops them all at once)."""
    m = cfg.model
    # LLaVA silently starts stage 2 from a random projector when the adapter path is forgotten (its default
    # is None), which wastes a whole finetune. We refuse unless the user opts in with --init_projector random;
    # a llava-hf / LLaVA stage-2 folder as --model_name_or_path brings its projector.
    needs_adapter = not m.tune_mm_mlp_adapter and m.pretrain_mm_mlp_adapter is None and m.init_projector == "auto"
    if needs_adapter and checkpoint_kind(local_folder(m.model_name_or_path, "--model_name_or_path")) is None:
        raise ValueError(
            "--pretrain_mm_mlp_adapter is required when the projector is not trained from scratch "
            "(--tune_mm_mlp_adapter False, i.e. stage 2): pass the stage-1 output_dir/mm_projector.bin, "
            "or --init_projector random to start from a random projector on purpose (what LLaVA does silently)"
        )
    if m.pretrain_mm_mlp_adapter is not None:
        llm_config, vision_config = run_configs(cfg)
        with torch.device("meta"):
            holder = projector_holder(m.mm_projector_type, vision_config, llm_config)
        read_mm_projector(holder, m.pretrain_mm_mlp_adapter)


def run_configs(cfg) -> tuple[LlamaConfig, CLIPVisionConfig]:
    """(llm_config, vision_config) from the LLM + CLIP folders, or from a llava-hf / LLaVA-format stage-2 folder
    given as --model_name_or_path (then its mm_* settings must match the flags). No weights are read."""
    m = cfg.model
    llm = local_folder(m.model_name_or_path, "--model_name_or_path")
    if checkpoint_kind(llm) is None:
        clip = local_folder(m.vision_tower, "--vision_tower")
        tower_family(folder_config(clip).get("model_type"), f"--vision_tower {m.vision_tower}")
        llm_config = AutoConfig.from_pretrained(llm)
        llm_family(llm_config, f"--model_name_or_path {m.model_name_or_path}")
        return llm_config, folder_tower_config(clip, "--vision_tower")
    trained, flags = read_settings(llm), run_settings(cfg)
    for f in (f.name for f in fields(LlavaSettings) if f.name.startswith("mm_")):  # the model must be the one trained
        ours, theirs = getattr(flags, f), getattr(trained, f)
        if ours != theirs:
            raise ValueError(f"--{f} {ours!r}: {m.model_name_or_path} was trained with {theirs!r}")
    return llava_checkpoint_configs(llm, m.vision_tower)


def initial_state(cfg, llm_config, vision_config, model=None) -> dict[str, Tensor]:
    """Rank 0 only: the full starting weights (LLM + tower from their folders, or a whole LLaVA checkpoint) plus
    the projector: the checkpoint's, seeded-random, or from --pretrain_mm_mlp_adapter; with --lora_enable, fresh
    adapters for `model`'s (B = 0: the run starts at the base model)."""
    state = _base_state(cfg, llm_config, vision_config)
    if cfg.train.lora_enable and model is not None:
        state |= initial_lora_state(model, cfg.train.seed)
    return state


def _base_state(cfg, llm_config, vision_config) -> dict[str, Tensor]:
    m = cfg.model
    llm = local_folder(m.model_name_or_path, "--model_name_or_path")
    from_llava = checkpoint_kind(llm) is not None
    if from_llava:  # LLM, tower and projector from the checkpoint
        state = load_llava_checkpoint_state(llm, m.vision_tower)[2]
    else:
        state = pretrained_state_dict(llm, local_folder(m.vision_tower, "--vision_tower"))
    if from_llava and not m.pretrain_mm_mlp_adapter and m.init_projector != "random":
        return state  # keep the checkpoint's projector
    torch.manual_seed(cfg.train.seed)
    return state | projector_state(m.mm_projector_type, vision_config, llm_config, m.pretrain_mm_mlp_adapter)
