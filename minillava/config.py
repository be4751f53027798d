"""Run configuration: LLaVA's ModelArguments / DataArguments / TrainingArguments as dataclasses with LLaVA's names,
plus a few minillava knobs, and a small stdlib argparse bridge (LLaVA: llava/train/train.py L53-112).

parse_args resolves dataclass defaults < `--stage {1,2}` preset < explicit flags, so LLaVA's scripts/v1_5 flag lists
parse unchanged. Unsupported features are ValueErrors; flags accepted but not acted on warn once (ConfigWarning).
"""

import argparse
import json
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, NoReturn

CONFIG_NAME = "minillava_config.json"


class ConfigWarning(UserWarning):
    """A flag that is accepted but not acted on (or mapped); filter this category on ranks other than 0."""


@dataclass(kw_only=True)
class ModelArgs:
    """LLaVA ModelArguments (train.py L53-66) plus minillava's model knobs."""

    model_name_or_path: str  # required (LLaVA default facebook/opt-125m): Vicuna folder or hub id
    version: str = "v0"  # conversation template; LLaVA's default v0 is unsupported, pass plain or v1 (or --stage)
    freeze_backbone: bool = False  # freeze the LLM body incl. embeddings; lm_head stays trainable
    tune_mm_mlp_adapter: bool = False  # stage 1: train only the projector
    vision_tower: str  # required (LLaVA default None = text-only, unsupported): CLIP folder or hub id
    mm_vision_select_layer: int = -1  # CLIP hidden_states index; v1.5 scripts use -2
    pretrain_mm_mlp_adapter: str | None = None  # stage-1 mm_projector.bin loaded into the projector
    mm_projector_type: str = "linear"  # linear | identity | mlp<N>x_gelu; v1.5 uses mlp2x_gelu
    mm_use_im_start_end: bool = False  # only False (v1.5) is supported
    mm_use_im_patch_token: bool = False  # LLaVA default True adds a token; v1.5 passes False; only False supported
    mm_patch_merge_type: str = "flat"  # only flat (v1.5); spatial/unpad are LLaVA-1.6
    mm_vision_select_feature: str = "patch"  # patch drops CLS, cls_patch keeps it
    init_projector: str = "auto"  # minillava: auto = adapter if given (stage 2 requires one) | random = fresh init


@dataclass(kw_only=True)
class DataArgs:
    """LLaVA DataArguments (train.py L69-76); lazy_preprocess and is_multimodal are implied (always True)."""

    data_path: str  # required: LLaVA JSON list of samples
    image_folder: str  # required: prefix joined with sample["image"]
    image_aspect_ratio: str = "square"  # square (resize + center crop) | pad (expand2square, v1.5 finetune)


@dataclass(kw_only=True)
class TrainArgs:
    """The used subset of LLaVA TrainingArguments (train.py L79-112 + inherited HF fields) plus minillava knobs."""

    output_dir: str  # required: checkpoints, metrics and minillava_config.json
    stage: int | None = None  # minillava: 1 or 2 selects STAGE_PRESETS; None = no preset
    freeze_mm_mlp_adapter: bool = False  # freeze the projector
    model_max_length: int = 512  # tokenizer max length and post-splice truncation; v1.5 uses 2048
    mm_projector_lr: float | None = None  # separate lr for names containing mm_projector (4 param groups)
    group_by_modality_length: bool = False  # LLaVA's modality/length-grouped sampler (stage 2)
    longest_first: bool = False  # minillava: put the longest megabatch first (early OOM check)
    bf16: bool = False  # bf16 compute with fp32 master weights; False = fp32 (fp16 is unsupported)
    num_train_epochs: float = 3.0  # HF default; v1.5 uses 1
    max_steps: int = -1  # HF: > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8  # micro-batch per rank; global = this x world size x grad accumulation
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 5e-5  # HF default peak lr; v1.5: 1e-3 stage 1, 2e-5 stage 2
    weight_decay: float = 0.0  # AdamW decay for non-norm, non-bias params
    warmup_ratio: float = 0.0  # warmup steps = ceil(ratio x total steps)
    lr_scheduler_type: str = "cosine"  # only cosine is implemented (HF default linear; every v1.5 script: cosine)
    max_grad_norm: float = 0.0  # minillava 0 = off: HF's 1.0 unused: scripts/zero{2,3}.json lack gradient_clipping
    loss_reduction: str = "llava"  # minillava: llava (per-micro-batch mean) | global_token (step-wide token mean)
    gradient_checkpointing: bool | str = False  # True: every LLM block (LLaVA's); auto: the fewest that fit (memory.py)
    attn_implementation: str = "sdpa"  # minillava: sdpa | flash_attention_2 | eager (LLaVA train_mem.py: fa2)
    padding_free: bool = False  # minillava: pack each micro-batch's real tokens into one varlen-attention sequence
    # (the --stage presets pack: the same loss, no FLOP on padding)
    reshard_after_forward: bool = True  # minillava FSDP2 knob; --deepspeed zero2/zero3 maps to False/True
    hsdp: bool = False  # minillava: shard within a node (torchrun's LOCAL_WORLD_SIZE), replicate across nodes
    torch_compile: bool = False  # minillava: torch.compile each decoder layer (dynamic shapes); off until measured
    torch_compile_backend: str = "inductor"  # minillava: aot_eager traces without code generation (CPU tests)
    seed: int = 42  # HF default
    logging_steps: int = 1  # log every N steps (HF default 500; v1.5 uses 1)
    save_steps: int = 500  # HF default; checkpoint every N steps, 0 = only the final save
    save_total_limit: int | None = None  # keep at most N step checkpoints; None = all
    resume_from_checkpoint: str | None = None  # minillava: None | auto (latest in output_dir) | checkpoint path
    report_to: str = "none"  # none | wandb (HF 4.37 default all)
    dataloader_num_workers: int = 0  # DataLoader worker processes per rank
    lora_enable: bool = False  # LoRA on every Linear of the LLM body (finetune_lora.sh: True); base weights frozen
    lora_r: int = 64  # adapter rank (finetune_lora.sh: 128)
    lora_alpha: int = 16  # adapter scale alpha / r (finetune_lora.sh: 256)
    lora_dropout: float = 0.05  # dropout on the adapters' input
    lora_bias: str = "none"  # only none (every v1.5 LoRA script)


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
    ),
    2: dict(  # finetune.sh: LLM + projector, global batch 16 x 8 GPUs = 128
        reshard_after_forward=True,  # --deepspeed ./scripts/zero3.json
        version="v1", mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_aspect_ratio="pad", group_by_modality_length=True, bf16=True,
        num_train_epochs=1.0, per_device_train_batch_size=16, gradient_accumulation_steps=1, save_steps=50000,
        save_total_limit=1, learning_rate=2e-5, weight_decay=0.0, warmup_ratio=0.03, lr_scheduler_type="cosine",
        logging_steps=1, model_max_length=2048, gradient_checkpointing="auto", dataloader_num_workers=4,
        padding_free=True,
    ),
}
# fmt: on

# LLaVA/HF flags without a field: flag -> (accepted values, None = any; warning text, None = silent because the
# accepted value is what minillava does anyway). Any other value is a ValueError.
_QLORA = "QLoRA is not supported (only used with --bits 4|8)"
IGNORED_FLAGS: dict[str, tuple[tuple[Any, ...] | None, str | None]] = {
    "evaluation_strategy": (None, "there is no evaluation loop"),
    "per_device_eval_batch_size": (None, "there is no evaluation loop"),
    "lazy_preprocess": (None, "the dataset is always lazy"),
    "tf32": (None, "TF32 matmuls are always enabled on GPU"),
    "save_strategy": (("steps", "no"), "checkpoints are written every --save_steps (0 = final only; 'no' sets 0)"),
    "remove_unused_columns": (None, "there is no HF Trainer column pruning"),
    "mpt_attn_impl": (None, "MPT is not supported"),
    "cache_dir": (None, "weights load through the default HF cache"),
    "optim": (("adamw_torch",), None),  # torch AdamW is the only optimizer (HF's adamw_torch)
    "bits": ((16,), None),  # QLoRA's 4/8-bit base weights (bitsandbytes): refused, _REFUSED says why
    "fp16": ((False,), None),  # bf16 or fp32 only
    "lora_weight_path": (None, "LLaVA never reads it"),
    **{k: (None, _QLORA) for k in ("double_quant", "quant_type")},
}
_REFUSED = {"bits": "QLoRA (4/8-bit base weights) is not supported; LoRA (--lora_enable True) trains on bf16 weights"}
MAPPED_FLAGS: dict[str, str] = {"deepspeed": "reshard_after_forward"}  # zero2 -> False, zero3* -> True


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def str2bool(value: str | bool) -> bool:
    """Strict bool parsing: true/false/1/0/yes/no, case-insensitive; anything else is a ValueError."""
    if not isinstance(value, bool) and value.lower() not in _BOOLS:
        raise ValueError(f"expected a bool (true/false/1/0/yes/no), got {value!r}")
    return value if isinstance(value, bool) else _BOOLS[value.lower()]


def _known_versions() -> set[str]:
    from minillava.conversation import KNOWN_VERSIONS  # lazy: the template module owns the list of versions

    return set(KNOWN_VERSIONS)


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
    "lora_bias": ("none",),  # LLaVA's all / lora_only also train biases; no v1.5 script uses them
}
_POSITIVE = ("per_device_train_batch_size", "gradient_accumulation_steps", "model_max_length", "logging_steps",
             "save_total_limit", "lora_r", "lora_alpha")  # fmt: skip
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
        for name, allowed in {"version": tuple(sorted(_known_versions())), **_CHOICES}.items():
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
        if v["lora_enable"] and v["tune_mm_mlp_adapter"]:
            raise ValueError("--lora_enable True adapts the LLM (stage 2): drop --tune_mm_mlp_adapter")
        # The stage-2 "adapter or --init_projector random" rule reads --model_name_or_path: formats.check_paths.
        adapter, init = v["pretrain_mm_mlp_adapter"], v["init_projector"]
        if init == "random" and adapter is not None:
            raise ValueError("--init_projector random contradicts --pretrain_mm_mlp_adapter; give one of them")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # ValueError (naming the flag) instead of SystemExit(2)
        raise ValueError(message)


def _spellings(name: str) -> list[str]:
    hyphen = name.replace("_", "-")  # hyphenated alias, as tyro/HF accept
    return [f"--{name}"] + ([f"--{hyphen}"] if hyphen != name else [])


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


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS: only flags given on the command line appear in the namespace, which makes precedence a dict merge.
    p = _Parser(prog="train.py", allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for f in _FIELDS:
        cast = _caster(f.type)
        bare = {"nargs": "?", "const": True} if cast in (str2bool, checkpoint_mode) else {}  # `--bf16` alone: True
        p.add_argument(*_spellings(f.name), dest=f.name, type=cast, **bare)
    for name in (*IGNORED_FLAGS, *MAPPED_FLAGS):
        p.add_argument(*_spellings(name), dest=name, nargs="?", const="True")
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
    for name, (accepted, why) in IGNORED_FLAGS.items():
        if name not in explicit:
            continue
        value = explicit.pop(name)
        if accepted is not None:
            like = accepted[0]
            try:
                ok = (str2bool(value) if isinstance(like, bool) else type(like)(value)) in accepted
            except ValueError:
                ok = False
            want = _REFUSED.get(name, f"unsupported; minillava only accepts {' or '.join(map(str, accepted))}")
            _check(ok, name, value, want)
        if why is not None:
            warnings.warn(f"--{name} is ignored: {why}", ConfigWarning, stacklevel=3)


def parse_args(argv: list[str] | None = None) -> Config:
    """Resolve dataclass defaults < --stage preset < explicit flags (argv, default sys.argv[1:]) into a Config."""
    explicit = vars(_parser().parse_args(sys.argv[1:] if argv is None else argv))
    if str(explicit.get("save_strategy", "")).lower() == "no" and "save_steps" not in explicit:
        explicit["save_steps"] = 0  # HF's save_strategy "no": no mid-run checkpoints, only the final save
    _consume_ignored(explicit)
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


def format_config(cfg: Config) -> str:
    """The resolved config as aligned `section.field value` lines, for printing once on rank 0."""
    items = [(f"{sec}.{k}", v) for sec, d in cfg.to_dict().items() for k, v in d.items()]
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k:<{width}}  {v!r}" for k, v in items)


def save_config(cfg: Config, output_dir: str) -> str:
    """Write output_dir/minillava_config.json atomically (tmp file + os.replace); returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, CONFIG_NAME)
    with open(path + ".tmp", "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path
