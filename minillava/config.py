"""Run configuration: LLaVA's ModelArguments / DataArguments / TrainingArguments as dataclasses with LLaVA's names,
plus a few minillava knobs, and a small stdlib argparse bridge (LLaVA: llava/train/train.py L53-112).

parse_args resolves dataclass defaults < `--stage {1,2}` preset < explicit flags, so LLaVA's scripts/v1_5 flag lists
parse unchanged. Unsupported features are ValueErrors; flags accepted but not acted on warn once (ConfigWarning).
`train.py --help` is built from the same tables: each field's help text (_flag), its default, STAGE_PRESETS,
_CHOICES, IGNORED_FLAGS and MAPPED_FLAGS.
"""

import argparse
import inspect
import json
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, NamedTuple, NoReturn

CONFIG_NAME = "minillava_config.json"


class ConfigWarning(UserWarning):
    """A flag that is accepted but not acted on (or mapped); filter this category on ranks other than 0."""


def one_line_config_warnings() -> None:
    """Show ConfigWarnings as `warning: --flag ...` (not `file:line: ConfigWarning: ...`); other warnings as before."""
    if getattr(warnings.formatwarning, "minillava", False):
        return
    original = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, ConfigWarning):
            return f"warning: {message}\n"
        return original(message, category, filename, lineno, line)

    formatwarning.minillava = True
    warnings.formatwarning = formatwarning


def _flag(default: Any = MISSING, help: str = "") -> Any:
    """A dataclass field with its --help text: the one place a flag is explained ("minillava:" = not LLaVA's)."""
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class ModelArgs:
    """LLaVA's ModelArguments (llava/train/train.py L53-66), plus minillava's own model flags."""

    model_name_or_path: str = _flag(help="the LLM: a local folder or hub id (lmsys/vicuna-7b-v1.5; Llama-3, Mistral, "
                                    "Qwen2/3), or a LLaVA / llava-hf stage-2 folder to finetune further (LLaVA's "
                                    "default facebook/opt-125m is not kept)")
    version: str = _flag("v0", "conversation template: plain (stage 1), v1 (stage 2), LLaVA-NeXT's for other LLMs; "
                         "LLaVA's default v0 is not supported: set by --stage")
    freeze_backbone: bool = _flag(False, "freeze the LLM body with its embeddings; lm_head and projector still train")
    tune_mm_mlp_adapter: bool = _flag(False, "stage 1: train only the projector; the output is mm_projector.bin")
    vision_tower: str = _flag(help="the CLIP or SigLIP tower: a local folder or hub id (v1.5: "
                              "openai/clip-vit-large-patch14-336); LLaVA's default None (a text-only run) is not "
                              "supported")
    mm_vision_select_layer: int = _flag(-1, "CLIP hidden_states index that is projected; v1.5 uses -2")
    pretrain_mm_mlp_adapter: str | None = _flag(None, "stage-1 mm_projector.bin loaded into the projector (stage 2)")
    mm_projector_type: str = _flag("linear", "projector: linear, identity or mlp<N>x_gelu (v1.5: mlp2x_gelu)")
    mm_use_im_start_end: bool = _flag(False, "wrap <image> in <im_start>/<im_end> tokens; not supported (v1.5: off)")
    mm_use_im_patch_token: bool = _flag(False, "add an <im_patch> token; not supported (LLaVA's default is True, "
                                        "every v1.5 script passes False)")
    mm_patch_merge_type: str = _flag("flat", "how image features are merged; spatial / unpad are LLaVA-1.6's")
    mm_vision_select_feature: str = _flag("patch", "patch drops CLIP's CLS token, cls_patch keeps it")
    init_projector: str = _flag("auto", "minillava: auto = --pretrain_mm_mlp_adapter's or a stage-2 checkpoint's, "
                                "fresh in stage 1 (stage 2 refuses to start without one); random = fresh on purpose")


@dataclass(kw_only=True)
class DataArgs:
    """LLaVA's DataArguments (llava/train/train.py L69-76); lazy_preprocess and is_multimodal are always True."""

    data_path: str = _flag(help="LLaVA-format JSON list of samples (v1.5 stage 2: llava_v1_5_mix665k.json), or "
                           "JSON Lines (.jsonl)")
    image_folder: str = _flag(help="folder the samples' image paths are relative to")
    eval_data_path: str | None = _flag(None, "held-out samples (as --data_path, images in --image_folder) for the "
                                       "validation loss (HF's eval_dataset; LLaVA has none)")
    image_aspect_ratio: str = _flag("square", "square = CLIP resize + center crop, pad = expand2square with the "
                                    "mean colour first (v1.5 finetune); anyres is LLaVA-1.6's")


@dataclass(kw_only=True)
class TrainArgs:
    """The TrainingArguments LLaVA uses (llava/train/train.py L79-112 and the transformers TrainingArguments fields
    its scripts pass), plus minillava's own flags."""

    output_dir: str = _flag(help="checkpoints, the final model, metrics.jsonl and minillava_config.json")
    stage: int | None = _flag(None, "minillava: start from LLaVA's v1.5 recipe (1 = scripts/v1_5/pretrain.sh, "
                              "2 = finetune.sh); explicit flags win")
    freeze_mm_mlp_adapter: bool = _flag(False, "freeze the projector")
    model_max_length: int = _flag(512, "tokenizer max length; sequences are cut to it after the image is spliced in")
    mm_projector_lr: float | None = _flag(None, "learning rate of the projector (unset: --learning_rate)")
    group_by_modality_length: bool = _flag(False, "LLaVA's sampler: image-only and text-only megabatches, each "
                                           "grouped by length (v1.5 finetune)")
    longest_first: bool = _flag(False, "minillava: put the longest megabatch first (an out-of-memory shows at once)")
    bf16: bool = _flag(False, "bf16 compute, fp32 master weights and gradient reduction; False = fp32 (no fp16)")
    num_train_epochs: float = _flag(3.0, "epochs over --data_path (fractions allowed); unused if --max_steps > 0")
    max_steps: int = _flag(-1, "optimizer steps; > 0 overrides --num_train_epochs")
    per_device_train_batch_size: int = _flag(8, "micro-batch per rank; global batch = this x ranks x accumulation")
    gradient_accumulation_steps: int = _flag(1, "micro-batches per optimizer step")
    learning_rate: float = _flag(5e-5, "peak learning rate (AdamW, cosine schedule)")
    weight_decay: float = _flag(0.0, "AdamW weight decay, on everything but norms and biases")
    warmup_ratio: float = _flag(0.0, "linear warmup over this fraction of the steps")
    lr_scheduler_type: str = _flag("cosine", "learning-rate schedule: cosine only (every v1.5 script's; HF's "
                                   "default linear is not implemented)")
    max_grad_norm: float = _flag(0.0, "gradient clipping norm, 0 = off: HF's default 1.0 never applied in LLaVA "
                                 "(scripts/zero2.json, zero3.json set no gradient_clipping)")
    loss_reduction: str = _flag("llava", "minillava: llava = token mean per micro-batch, averaged (LLaVA's HF "
                                "Trainer); global_token = mean over all label tokens of the step")
    gradient_checkpointing: bool | str = _flag(False, "activation checkpointing: True = every LLM layer (LLaVA's); "
                                               "auto = only as many layers as memory needs (minillava, memory.py)")
    attn_implementation: str = _flag("sdpa", "minillava: LLM attention (LLaVA's train_mem.py: flash_attention_2)")
    padding_free: bool = _flag(False, "minillava: pack each micro-batch's real tokens into one varlen-attention "
                               "sequence: the same loss, no compute on padding")
    reshard_after_forward: bool = _flag(True, "minillava: FSDP2 frees gathered weights after forward (ZeRO-3-like); "
                                        "False keeps them (ZeRO-2-like); --deepspeed sets it")
    hsdp: bool = _flag(False, "minillava: shard within a node (torchrun's LOCAL_WORLD_SIZE), replicate across nodes")
    torch_compile: bool = _flag(False, "torch.compile each LLM decoder layer (dynamic shapes); off until measured")
    torch_compile_backend: str = _flag("inductor", "--torch_compile backend; aot_eager generates no code (CPU tests)")
    seed: int = _flag(42, "seed of the projector init, the sampler order and the DataLoader workers")
    evaluation_strategy: str = _flag("no", "when to compute the validation loss on --eval_data_path: no, steps "
                                     "(every --eval_steps) or epoch (every epoch's end and the run's); "
                                     "--eval_strategy is the same flag (HF's newer name)")
    eval_steps: int | None = _flag(None, "validation loss every N steps (--evaluation_strategy steps); unset: "
                                   "--logging_steps, as HF")
    per_device_eval_batch_size: int = _flag(8, "samples per rank in one validation forward (LLaVA's scripts: 4)")
    logging_steps: int = _flag(1, "log every N steps (metrics.jsonl, progress bar, wandb); HF's default is 500. The "
                                "metrics are read from the device only then, so a SIGTERM is honoured within N steps")
    save_steps: int = _flag(500, "resumable checkpoint every N steps; 0 = only the final save")
    save_total_limit: int | None = _flag(None, "keep the newest N step checkpoints (unset: all)")
    async_save: bool = _flag(True, "minillava: write checkpoints in the background; training waits only for the "
                             "copy of the state to host memory, which keeps one copy of it. False: wait for the write")
    resume_from_checkpoint: str | None = _flag(None, "auto = the newest complete checkpoint in --output_dir (a fresh "
                                               "start if none), or a checkpoint-N folder")
    overwrite_output_dir: bool = _flag(False, "start over in an --output_dir holding an earlier run (its model, "
                                       "checkpoints and metrics.jsonl are removed once the start-up passes)")
    report_to: str = _flag("none", "metrics beyond output_dir/metrics.jsonl: none, or wandb (pip install wandb)")
    dataloader_num_workers: int = _flag(0, "DataLoader worker processes per rank")
    lora_enable: bool = _flag(False, "LoRA adapters on every Linear of the LLM body (finetune_lora.sh: True): the "
                              "base weights stay frozen in bf16, adapters and projector train")
    lora_r: int = _flag(64, "adapter rank (finetune_lora.sh: 128)")
    lora_alpha: int = _flag(16, "adapter scale alpha / r (finetune_lora.sh: 256)")
    lora_dropout: float = _flag(0.05, "dropout on the adapters' input")
    lora_bias: str = _flag("none", "adapter biases: none only (every v1.5 LoRA script)")


# scripts/v1_5/pretrain.sh and finetune.sh (LLaVA c121f04), transcribed flag by flag, minus paths (model, data,
# images, vision tower, adapter, output), flags minillava ignores, and report_to wandb (a logging choice, not recipe).
# Two speed settings differ, neither changes the loss: gradient_checkpointing "auto" (the scripts' True checkpoints
# every layer; auto only as many as memory needs, memory.py) and padding_free (packed micro-batches). Passing the
# scripts' own --gradient_checkpointing True / --padding_free False restores theirs.
# fmt: off
STAGE_PRESETS: dict[int, dict[str, Any]] = {
    1: dict(  # pretrain.sh: projector-only alignment, global batch 32 x 8 GPUs = 256
        reshard_after_forward=False,  # --deepspeed ./scripts/zero2.json
        version="plain", mm_projector_type="mlp2x_gelu", tune_mm_mlp_adapter=True, mm_vision_select_layer=-2,
        mm_use_im_start_end=False, mm_use_im_patch_token=False, bf16=True, num_train_epochs=1.0,
        per_device_train_batch_size=32, gradient_accumulation_steps=1, save_steps=24000, save_total_limit=1,
        learning_rate=1e-3, weight_decay=0.0, warmup_ratio=0.03, lr_scheduler_type="cosine", logging_steps=1,
        model_max_length=2048, gradient_checkpointing="auto", dataloader_num_workers=4, padding_free=True,
        per_device_eval_batch_size=4,
    ),
    2: dict(  # finetune.sh: LLM + projector, global batch 16 x 8 GPUs = 128
        reshard_after_forward=True,  # --deepspeed ./scripts/zero3.json
        version="v1", mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_aspect_ratio="pad", group_by_modality_length=True, bf16=True,
        num_train_epochs=1.0, per_device_train_batch_size=16, gradient_accumulation_steps=1, save_steps=50000,
        save_total_limit=1, learning_rate=2e-5, weight_decay=0.0, warmup_ratio=0.03, lr_scheduler_type="cosine",
        logging_steps=1, model_max_length=2048, gradient_checkpointing="auto", dataloader_num_workers=4,
        padding_free=True, per_device_eval_batch_size=4,
    ),
}
# fmt: on

class Ignored(NamedTuple):
    """A LLaVA/HF flag without a field, accepted and not acted on."""

    accepted: tuple[Any, ...] | None  # the values taken (None: any); any other value is a ValueError
    why: str  # its --help text, and its warning (one per run) unless warns is False
    warns: bool = True  # False: the accepted value is what minillava does anyway


_QLORA = "QLoRA is not supported (only used with --bits 4|8)"
IGNORED_FLAGS: dict[str, Ignored] = {
    "lazy_preprocess": Ignored(None, "the dataset is always lazy"),
    "tf32": Ignored(None, "TF32 matmuls are always enabled on GPU"),
    "save_strategy": Ignored(
        ("steps", "no"), "checkpoints are written every --save_steps (0 = final only; 'no' sets 0)"
    ),
    "remove_unused_columns": Ignored(None, "there is no HF Trainer column pruning"),
    "mpt_attn_impl": Ignored(None, "MPT is not supported"),
    "cache_dir": Ignored(None, "weights load through the default HF cache"),
    "optim": Ignored(("adamw_torch",), "the optimizer is torch AdamW (HF's adamw_torch)", warns=False),
    "bits": Ignored((16,), "QLoRA (4/8-bit base weights) is not supported; LoRA (--lora_enable True) trains on bf16 "
                    "weights", warns=False),
    "fp16": Ignored((False,), "fp16 is not supported: --bf16 True, or fp32", warns=False),
    "lora_weight_path": Ignored(None, "LLaVA never reads it"),
    **{k: Ignored(None, _QLORA) for k in ("double_quant", "quant_type")},
}
# LLaVA flags that set a minillava field: flag -> what it does (its --help text).
MAPPED_FLAGS: dict[str, str] = {
    "deepspeed": "zero2*.json sets --reshard_after_forward False, zero3*.json True: FSDP2 replaces DeepSpeed (the "
    "file is not read; CPU offload is not supported)"
}


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def str2bool(value: str | bool) -> bool:
    """Strict bool parsing: true/false/1/0/yes/no, case-insensitive; anything else is a ValueError."""
    if not isinstance(value, bool) and value.lower() not in _BOOLS:
        raise ValueError(f"expected a bool (true/false/1/0/yes/no), got {value!r}")
    return value if isinstance(value, bool) else _BOOLS[value.lower()]


# Supported values of choice fields; anything else is a ValueError naming the flag.
_CHOICES: dict[str, tuple[Any, ...]] = {
    "stage": (None, 1, 2),
    "mm_vision_select_feature": ("patch", "cls_patch"),
    "mm_patch_merge_type": ("flat",),  # spatial/unpad are LLaVA-1.6 (anyres)
    "mm_use_im_start_end": (False,),  # v1.5 trains without im_start/im_end tokens
    "mm_use_im_patch_token": (False,),  # LLaVA's default True adds a token; every v1.5 script passes False
    "attn_implementation": ("sdpa", "flash_attention_2", "eager"),
    "init_projector": ("auto", "random"),
    "image_aspect_ratio": ("square", "pad"),  # anyres is LLaVA-1.6
    "lr_scheduler_type": ("cosine",),  # the only schedule any v1.5 script uses
    "loss_reduction": ("llava", "global_token"),
    "gradient_checkpointing": (True, False, "auto"),
    "report_to": ("none", "wandb"),
    "evaluation_strategy": ("no", "steps", "epoch"),
    "lora_bias": ("none",),  # LLaVA's all / lora_only also train biases; no v1.5 script uses them
}


def _choices() -> dict[str, tuple[Any, ...]]:
    """_CHOICES plus --version's choices."""
    from minillava.conversation import KNOWN_VERSIONS  # lazy: the template module owns the list of versions

    return {"version": tuple(sorted(KNOWN_VERSIONS)), **_CHOICES}


_POSITIVE = ("per_device_train_batch_size", "gradient_accumulation_steps", "model_max_length", "logging_steps",
             "save_total_limit", "lora_r", "lora_alpha", "eval_steps", "per_device_eval_batch_size")  # fmt: skip
_NON_NEGATIVE = ("learning_rate", "mm_projector_lr", "weight_decay", "max_grad_norm", "save_steps",
                 "dataloader_num_workers")  # fmt: skip


def _check(ok: bool, flag: str, value: Any, want: str) -> None:
    if not ok:
        raise ValueError(f"--{flag} {value!r}: {want}")


@dataclass
class Config:
    """The resolved run configuration: Config(model, data, train); validated on construction."""

    model: ModelArgs
    data: DataArgs
    train: TrainArgs

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (JSON-serialisable)."""
        return {"model": asdict(self.model), "data": asdict(self.data), "train": asdict(self.train)}

    def validate(self) -> None:
        """Raise ValueError naming the flag for any unsupported or inconsistent value; pure (no file is read)."""
        v = {**asdict(self.model), **asdict(self.data), **asdict(self.train)}
        if v["version"] == "v0":  # LLaVA's default (conv_vicuna_v0): no v1.5 script trains with it
            raise ValueError("--version 'v0' (LLaVA's default) is not supported: give --stage 1 or 2 (LLaVA's "
                             "pretrain.sh / finetune.sh: plain / v1), or --version v1, plain, qwen_2, llava_llama_3, "
                             "...")  # fmt: skip
        for name, allowed in _choices().items():
            _check(v[name] in allowed, name, v[name], f"supported: {', '.join(map(str, allowed))}")
        proj_ok = re.fullmatch(r"linear|identity|mlp\d+x_gelu", v["mm_projector_type"]) is not None
        _check(proj_ok, "mm_projector_type", v["mm_projector_type"], "expected linear, identity or mlp<N>x_gelu")
        for name in _POSITIVE:
            _check(v[name] is None or v[name] > 0, name, v[name], "must be > 0")
        for name in _NON_NEGATIVE:
            _check(v[name] is None or v[name] >= 0, name, v[name], "must be >= 0")
        _check(0.0 <= v["warmup_ratio"] <= 1.0, "warmup_ratio", v["warmup_ratio"], "must be in [0, 1]")
        _check(v["max_steps"] > 0 or v["num_train_epochs"] > 0, "num_train_epochs", v["num_train_epochs"],
               "must be > 0 unless --max_steps > 0")  # fmt: skip
        _check(0.0 <= v["lora_dropout"] < 1.0, "lora_dropout", v["lora_dropout"], "must be in [0, 1)")
        if (v["evaluation_strategy"] == "no") != (v["eval_data_path"] is None):
            raise ValueError("--eval_data_path and --evaluation_strategy go together: a validation set needs "
                             "--evaluation_strategy steps or epoch, and those need --eval_data_path")  # fmt: skip
        if v["lora_enable"] and v["tune_mm_mlp_adapter"]:
            raise ValueError("--lora_enable True adapts the LLM (stage 2): drop --tune_mm_mlp_adapter")
        # The stage-2 "adapter or --init_projector random" rule reads --model_name_or_path: formats/run.py
        # check_model_files.
        adapter, init = v["pretrain_mm_mlp_adapter"], v["init_projector"]
        if init == "random" and adapter is not None:
            raise ValueError("--init_projector random contradicts --pretrain_mm_mlp_adapter; give one of them")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # ValueError (naming the flag) instead of SystemExit(2)
        raise ValueError(message)


def checkpoint_mode(value: str | bool) -> bool | str:
    """--gradient_checkpointing: a bool (LLaVA's) or auto."""
    return "auto" if isinstance(value, str) and value.lower() == "auto" else str2bool(value)


def _caster(tp: Any) -> Callable[[str], Any]:
    args = typing.get_args(tp)
    if bool in args and str in args:  # bool | str: a bool or the word auto
        return checkpoint_mode
    base = next(a for a in (args or (tp,)) if a is not type(None))  # X | None -> X
    return str2bool if base is bool else base


_ARG_CLASSES = (ModelArgs, DataArgs, TrainArgs)
_FIELDS = [f for cls in _ARG_CLASSES for f in fields(cls)]
_METAVARS = {str2bool: "BOOL", checkpoint_mode: "BOOL|auto", int: "INT", float: "FLOAT", str: "STR"}

_DESCRIPTION = """\
Train LLaVA-1.5 with FSDP2 in LLaVA's two stages (scripts/v1_5):
  --stage 1  pretrain the projector on image-caption pairs (pretrain.sh); writes output_dir/mm_projector.bin
  --stage 2  finetune the LLM and the projector on conversations (finetune.sh); writes a LLaVA-format model folder

example (8 GPUs; `python train.py ...` runs one process):
  torchrun --nproc_per_node 8 train.py --stage 1 --model_name_or_path ./checkpoints/vicuna-7b-v1.5 \\
      --vision_tower ./checkpoints/clip-vit-large-patch14-336 --output_dir ./checkpoints/llava-v1.5-7b-pretrain \\
      --data_path ./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \\
      --image_folder ./playground/data/LLaVA-Pretrain/images

Precedence: defaults < --stage preset < explicit flags, so LLaVA's own flag lists run unchanged
(configs/llava_v15_7b_stage1.sh, configs/llava_v15_7b_stage2.sh). Every flag also takes hyphens
(--per-device-train-batch-size); "minillava:" marks the flags LLaVA does not have."""


_IGNORED_NOTE = """\
Taken so that LLaVA's scripts run, and not acted on: each warns once (not when given the value minillava
uses anyway); a value not listed is an error."""


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value)


def _preset_changes(stage: int) -> dict[str, Any]:
    """What --stage `stage` changes: its preset minus the values that are the defaults anyway."""
    defaults = {f.name: f.default for f in _FIELDS}
    return {k: v for k, v in STAGE_PRESETS[stage].items() if v != defaults[k]}


def _help(f: Any) -> str:
    """A field's --help line: its text, then its default, the --stage presets' values and the choices. Rendered
    here because the parser's defaults are SUPPRESS (argparse's %(default)s would show that)."""
    text, notes = f.metadata["help"], ["required" if f.default is MISSING else f"default: {_shown(f.default)}"]
    by_stage = {s: _preset_changes(s)[f.name] for s in STAGE_PRESETS if f.name in _preset_changes(s)}
    if len(set(map(repr, by_stage.values()))) == 1 and len(by_stage) > 1:  # the same in every preset
        by_stage = {", ".join(map(str, by_stage)): next(iter(by_stage.values()))}
    notes += [f"--stage {s}: {_shown(v)}" for s, v in by_stage.items()]
    if f.name == "stage":  # what each preset sets, from STAGE_PRESETS itself
        for s in STAGE_PRESETS:
            text += f"; {s} sets " + " ".join(f"--{k} {v}" for k, v in _preset_changes(s).items())
    if f.name in _choices():
        notes.append("choices: " + ", ".join(str(c) for c in _choices()[f.name] if c is not None))
    return f"{text} ({'; '.join(notes)})".replace("%", "%%")


def _add(group: Any, name: str, help: str, **kw: Any) -> None:
    group.add_argument(f"--{name}", dest=name, help=help, **kw)
    if "_" in name:  # the hyphenated alias, as tyro/HF accept; left out of --help (its description says so)
        group.add_argument("--" + name.replace("_", "-"), dest=name, help=argparse.SUPPRESS, **kw)


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS: only flags given on the command line appear in the namespace, which makes precedence a dict merge.
    p = _Parser(prog="train.py", usage="[torchrun ...] train.py [--stage {1,2}] --model_name_or_path DIR "
                "--vision_tower DIR --data_path JSON --image_folder DIR --output_dir DIR [flags]",
                description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                allow_abbrev=False, argument_default=argparse.SUPPRESS)  # fmt: skip
    for cls, title in zip(_ARG_CLASSES, ("model", "data", "training"), strict=True):
        group = p.add_argument_group(title, inspect.cleandoc(cls.__doc__))
        for f in fields(cls):
            cast = _caster(f.type)
            bare = {"nargs": "?", "const": True} if cast in (str2bool, checkpoint_mode) else {}  # `--bf16` alone: True
            _add(group, f.name, _help(f), type=cast, metavar=_METAVARS[cast], **bare)
    ignored = p.add_argument_group("LLaVA flags accepted but ignored", _IGNORED_NOTE)
    for name, (accepted, why, _) in IGNORED_FLAGS.items():
        values = "any value" if accepted is None else "accepted: " + ", ".join(map(str, accepted))
        _add(ignored, name, f"{why} ({values})", nargs="?", const="True", metavar="VALUE")
    _add(p, "eval_strategy", argparse.SUPPRESS, type=str, metavar="STR")  # --evaluation_strategy's newer HF name
    mapped = p.add_argument_group("LLaVA flags mapped", "Set one of minillava's flags, with a warning saying so.")
    for name, what in MAPPED_FLAGS.items():
        _add(mapped, name, what, nargs="?", const="True", metavar="FILE")
    return p


def _map_deepspeed(path: str) -> bool:
    """--deepspeed zero2.json -> reshard_after_forward False (ZeRO-2-like), zero3*.json -> True (ZeRO-3-like)."""
    name = os.path.basename(path)
    match = re.search(r"zero([23])", name)
    if match is None:
        raise ValueError(f"--deepspeed {path!r}: expected a zero2/zero3 config (FSDP2 replaces DeepSpeed)")
    reshard = match.group(1) == "3"
    msg = f"--deepspeed {path} is mapped to FSDP2 reshard_after_forward={reshard}; DeepSpeed is not used"
    if "offload" in name:  # scripts/zero3_offload.json brings its own optimizer and schedule
        msg += (
            "; CPU offload is not supported, and zero3_offload's DeepSpeed AdamW + WarmupLR (constant lr after "
            "warmup, clipping 1.0) are not reproduced: this run uses the cosine schedule and --max_grad_norm"
        )
    warnings.warn(msg, ConfigWarning, stacklevel=3)
    return reshard


def _consume_ignored(explicit: dict[str, Any]) -> None:
    for name, (accepted, why, warns) in IGNORED_FLAGS.items():
        if name not in explicit:
            continue
        value = explicit.pop(name)
        if accepted is not None:
            like = accepted[0]
            try:
                ok = (str2bool(value) if isinstance(like, bool) else type(like)(value)) in accepted
            except ValueError:
                ok = False
            _check(ok, name, value, f"{why}; only {' or '.join(map(str, accepted))} is accepted")
        if warns:
            warnings.warn(f"--{name} is ignored: {why}", ConfigWarning, stacklevel=3)


def parse_args(argv: list[str] | None = None) -> Config:
    """Resolve dataclass defaults < --stage preset < explicit flags (argv, default sys.argv[1:]) into a Config."""
    explicit = vars(_parser().parse_args(sys.argv[1:] if argv is None else argv))
    if str(explicit.get("save_strategy", "")).lower() == "no" and "save_steps" not in explicit:
        explicit["save_steps"] = 0  # HF's save_strategy "no": no mid-run checkpoints, only the final save
    _consume_ignored(explicit)
    if "eval_strategy" in explicit:  # HF renamed evaluation_strategy (transformers 4.41); both are accepted
        if "evaluation_strategy" in explicit:
            raise ValueError("--eval_strategy and --evaluation_strategy are the same flag; give one")
        explicit["evaluation_strategy"] = explicit.pop("eval_strategy")
    if "deepspeed" in explicit:
        if "reshard_after_forward" in explicit:
            raise ValueError("--deepspeed and --reshard_after_forward both set the sharding mode; give one")
        explicit["reshard_after_forward"] = _map_deepspeed(explicit.pop("deepspeed"))
    stage = explicit.get("stage")
    _check(stage in _CHOICES["stage"], "stage", stage, "supported: 1 (pretrain.sh) or 2 (finetune.sh)")
    values = {**STAGE_PRESETS.get(stage, {}), **explicit}
    missing = [f"--{f.name}" for f in _FIELDS if f.default is MISSING and f.name not in values]
    if missing:
        raise ValueError(f"missing required flag(s): {', '.join(missing)}")
    model, data, train = ({f.name: values[f.name] for f in fields(c) if f.name in values} for c in _ARG_CLASSES)
    return Config(model=ModelArgs(**model), data=DataArgs(**data), train=TrainArgs(**train))


def read_flags(argv: list[str] | None = None) -> Config:
    """train.py's flags: parse_args, with its warnings as one line each (one_line_config_warnings), shown by the
    first rank only (torchrun's RANK)."""
    if os.environ.get("RANK", "0") != "0":
        warnings.filterwarnings("ignore", category=ConfigWarning)
    one_line_config_warnings()
    return parse_args(argv)


def format_config(cfg: Config) -> str:
    """The run's flags that differ from LLaVA's script for its --stage (pretrain.sh / finetune.sh: the preset over the
    defaults; no --stage: the defaults), one `--flag value (script: x)` line each, for printing once on rank 0; the
    whole config goes to output_dir/minillava_config.json (save_config)."""
    preset = STAGE_PRESETS.get(cfg.train.stage, {})
    script = {f.name: f.default for f in _FIELDS} | preset
    ours = {k: v for section in cfg.to_dict().values() for k, v in section.items()}
    name = {1: "pretrain.sh", 2: "finetune.sh"}.get(cfg.train.stage)
    was = lambda k: "" if script[k] is MISSING else f" ({name if k in preset else 'default'}: {_shown(script[k])})"  # noqa: E731
    lines = [f"  --{k} {_shown(v)}{was(k)}" for k, v in ours.items() if k != "stage" and v != script[k]]
    head = f"stage {cfg.train.stage}: LLaVA's {name} with" if name else "LLaVA's defaults with"
    return "\n".join([head, *lines])


def save_config(cfg: Config, output_dir: str) -> str:
    """Write output_dir/minillava_config.json atomically (tmp file + os.replace); returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, CONFIG_NAME)
    with open(path + ".tmp", "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path
