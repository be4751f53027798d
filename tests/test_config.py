"""Config: defaults, --stage presets and precedence, str2bool, aliases, ignored/mapped/unsupported flags, validation,
and GOLDEN parses of LLaVA's scripts/v1_5 flag lists (tests/assets) and of our configs/*.sh launchers."""

import json
import os
import re
import shlex
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from minillava.config import (
    CONFIG_NAME,
    IGNORED_FLAGS,
    MAPPED_FLAGS,
    STAGE_PRESETS,
    Config,
    ConfigWarning,
    DataArgs,
    ModelArgs,
    TrainArgs,
    format_config,
    parse_args,
    save_config,
    str2bool,
)
from minillava.conversation import KNOWN_VERSIONS
from minillava.formats import check_paths

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["--model_name_or_path", "m", "--vision_tower", "clip", "--data_path", "d.json", "--image_folder", "img",
         "--output_dir", "out"]  # fmt: skip
STAGE1 = [*PATHS, "--version", "plain", "--tune_mm_mlp_adapter", "True"]


def parse(*argv: str) -> Config:
    """parse_args with warnings recorded silently (tests that care use record())."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return parse_args(list(argv))


def record(argv: list[str]) -> tuple[Config, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = parse_args(argv)
    return cfg, [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


def script_flags(path: Path) -> list[str]:
    """The flag lines of a LLaVA-style launcher script (launcher line stripped), shell-split."""
    lines = [ln.strip().removesuffix("\\") for ln in path.read_text().splitlines()]
    return [tok for ln in lines if ln.startswith("--") for tok in shlex.split(ln)]


# ---------------------------------------------------------------- defaults and precedence


def test_defaults_are_llavas() -> None:
    cfg = parse(*STAGE1)
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.mm_vision_select_layer, m.mm_projector_type, m.mm_vision_select_feature) == (-1, "linear", "patch")
    assert (m.freeze_backbone, m.mm_use_im_start_end, m.mm_use_im_patch_token) == (False, False, False)
    assert (m.pretrain_mm_mlp_adapter, t.attn_implementation, m.init_projector) == (None, "sdpa", "auto")
    assert d.image_aspect_ratio == "square"
    assert (t.model_max_length, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (512, 8, 1)
    assert (t.learning_rate, t.weight_decay, t.warmup_ratio, t.num_train_epochs, t.max_steps) == (5e-5, 0, 0, 3, -1)
    assert (t.max_grad_norm, t.seed, t.bf16, t.report_to, t.loss_reduction) == (0.0, 42, False, "none", "llava")
    assert (t.reshard_after_forward, t.stage, t.mm_projector_lr, t.resume_from_checkpoint) == (True, None, None, None)


@pytest.mark.parametrize("flag", ["model_name_or_path", "vision_tower", "data_path", "image_folder", "output_dir"])
def test_missing_required_path_names_flag(flag: str) -> None:
    i = PATHS.index(f"--{flag}")
    with pytest.raises(ValueError, match=f"--{flag}"):
        parse(*PATHS[:i], *PATHS[i + 2 :], "--stage", "1")


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_preset_applies(stage: int) -> None:
    cfg = parse(*PATHS, "--stage", str(stage), "--pretrain_mm_mlp_adapter", "p.bin")
    flat = {**cfg.to_dict()["model"], **cfg.to_dict()["data"], **cfg.to_dict()["train"]}
    assert {k: flat[k] for k in STAGE_PRESETS[stage]} == STAGE_PRESETS[stage]
    assert flat["stage"] == stage


def test_explicit_flags_beat_preset_in_any_order() -> None:
    a = parse(*PATHS, "--stage", "1", "--learning_rate", "2e-4", "--bf16", "False")
    b = parse("--learning_rate", "2e-4", "--bf16", "False", "--stage", "1", *PATHS)
    assert a == b
    assert (a.train.learning_rate, a.train.bf16, a.train.per_device_train_batch_size) == (2e-4, False, 32)


def test_stage2_preset_values() -> None:
    t = parse(*PATHS, "--stage", "2", "--pretrain_mm_mlp_adapter", "p.bin").train
    assert (t.learning_rate, t.per_device_train_batch_size, t.group_by_modality_length) == (2e-5, 16, True)
    assert t.reshard_after_forward is True


def test_invalid_stage() -> None:
    with pytest.raises(ValueError, match="--stage"):
        parse(*STAGE1, "--stage", "3")


# ---------------------------------------------------------------- parsing mechanics


@pytest.mark.parametrize("text", ["true", "True", "TRUE", "1", "yes", "Yes"])
def test_str2bool_true(text: str) -> None:
    assert str2bool(text) is True


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "NO"])
def test_str2bool_false(text: str) -> None:
    assert str2bool(text) is False


@pytest.mark.parametrize("text", ["", "maybe", "2", "t", "y", "none"])
def test_str2bool_strict(text: str) -> None:
    with pytest.raises(ValueError):
        str2bool(text)


def test_bad_bool_flag_names_flag() -> None:
    with pytest.raises(ValueError, match="--bf16"):
        parse(*STAGE1, "--bf16", "maybe")


def test_bare_bool_flag_means_true() -> None:
    cfg = parse(*STAGE1, "--gradient_checkpointing", "--bf16")
    assert cfg.train.gradient_checkpointing is True and cfg.train.bf16 is True
    assert parse(*STAGE1, "--bf16", "--group_by_modality_length", "0").train.group_by_modality_length is False


def test_hyphen_aliases() -> None:
    cfg = parse(*STAGE1, "--per-device-train-batch-size", "4", "--mm-vision-select-layer", "-2", "--lazy-preprocess")
    assert (cfg.train.per_device_train_batch_size, cfg.model.mm_vision_select_layer) == (4, -2)


def test_types() -> None:
    cfg = parse(*STAGE1, "--weight_decay", "0.", "--learning_rate", "1e-3", "--num_train_epochs", "1",
                "--mm_projector_lr", "2e-5", "--save_total_limit", "1")  # fmt: skip
    assert cfg.train.weight_decay == 0.0 and cfg.train.learning_rate == 1e-3
    assert isinstance(cfg.train.num_train_epochs, float) and cfg.train.mm_projector_lr == 2e-5
    assert cfg.train.save_total_limit == 1


@pytest.mark.parametrize("argv", [["--no_such_flag", "1"], ["--learning-rat", "1"], ["--bf"], ["stray"]])
def test_unknown_flag_is_error(argv: list[str]) -> None:
    with pytest.raises(ValueError, match="unrecognized arguments: " + argv[0]):
        parse(*STAGE1, *argv)


def test_parse_args_reads_sys_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["train.py", *STAGE1, "--seed", "7"])
    assert parse_args().train.seed == 7


# ---------------------------------------------------------------- --help

OURS = ("init_projector", "stage", "longest_first", "loss_reduction", "attn_implementation", "padding_free",
        "reshard_after_forward", "hsdp")  # fmt: skip


def help_text(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`train.py --help` (exit 0) as {group title: its text with whitespace collapsed}."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping (which breaks words at hyphens)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    parts = re.split(r"^([A-Za-z][\w ]*):$", out, flags=re.M)  # a group title: a line of words and ':'
    titles, texts = ["top", *parts[1::2]], parts[::2]
    return {t: " ".join(b.split()) for t, b in zip(titles, texts, strict=True)}


METAVAR = r"(?:STR|INT|FLOAT|\[BOOL\]|\[BOOL\|auto\]|\[VALUE\]|\[FILE\])"


def entry(group: str, flag: str) -> str:
    """One flag's entry in a collapsed group text: its metavar and help, up to the next flag's entry."""
    match = re.search(rf"(?:^| )--{flag} ({METAVAR} .*?)(?= --[a-z0-9_]+ {METAVAR} |$)", group)
    assert match, flag
    return match.group(1)


def test_help_explains_every_flag_with_its_default_and_choices(capsys, monkeypatch) -> None:
    groups = help_text(capsys, monkeypatch)
    assert list(groups) == ["top", "options", "model", "data", "training", "LLaVA flags accepted but ignored",
                            "LLaVA flags mapped"]  # fmt: skip
    assert groups["top"].startswith("usage: [torchrun ...] train.py [--stage {1,2}] --model_name_or_path DIR")
    assert "--stage 1 pretrain the projector" in groups["top"] and "--stage 2 finetune the LLM" in groups["top"]
    assert "torchrun --nproc_per_node 8 train.py --stage 1 --model_name_or_path" in groups["top"]
    for cls, title in ((ModelArgs, "model"), (DataArgs, "data"), (TrainArgs, "training")):
        for f in fields(cls):
            text = entry(groups[title], f.name)
            assert " ".join(f.metadata["help"].split()) in text, f.name
            shown = "required" if f.default is MISSING else f"default: {'unset' if f.default is None else f.default}"
            assert f"({shown}" in text, f.name
    train = groups["training"]
    assert entry(train, "learning_rate").endswith("(default: 5e-05; --stage 1: 0.001; --stage 2: 2e-05)")
    assert entry(train, "model_max_length").endswith("(default: 512; --stage 1, 2: 2048)")
    assert "choices: llava, global_token" in entry(train, "loss_reduction")
    assert "choices: True, False, auto" in entry(train, "gradient_checkpointing")
    assert entry(groups["model"], "version").endswith(f"choices: {', '.join(sorted(KNOWN_VERSIONS))})")
    assert "choices: square, pad" in entry(groups["data"], "image_aspect_ratio")
    group_of = {f.name: title for cls, title in ((ModelArgs, "model"), (TrainArgs, "training")) for f in fields(cls)}
    for name in OURS:
        assert entry(groups[group_of[name]], name).split(" ", 1)[1].startswith("minillava:"), name
    assert not entry(train, "learning_rate").split(" ", 1)[1].startswith("minillava")
    assert "--per-device-train-batch-size" not in train  # the hyphen aliases parse, unlisted
    assert not any("llava-reference" in text or "%" in text for text in groups.values())


def test_help_lists_ignored_mapped_and_unsupported_flags(capsys, monkeypatch) -> None:
    groups = help_text(capsys, monkeypatch)
    ignored, mapped = groups["LLaVA flags accepted but ignored"], groups["LLaVA flags mapped"]
    for name, (accepted, why, _) in IGNORED_FLAGS.items():
        text = entry(ignored, name)
        assert why in text and (accepted is None) == ("(any value)" in text), name
    for name in ("bits", "fp16", "double_quant", "quant_type"):
        assert "not supported" in entry(ignored, name), name
    assert "LLaVA never reads it" in entry(ignored, "lora_weight_path") and "(accepted: 16)" in entry(ignored, "bits")
    for name in ("lora_enable", "lora_r", "lora_alpha", "lora_dropout", "lora_bias"):  # LoRA flags are real ones
        assert name not in IGNORED_FLAGS and "finetune_lora.sh" in entry(groups["training"], "lora_enable"), name
    assert set(MAPPED_FLAGS) == {"deepspeed"} and "--reshard_after_forward False" in entry(mapped, "deepspeed")
    assert "warns once" in ignored and "warning" in mapped


def test_help_of_stage_is_derived_from_the_presets(capsys, monkeypatch) -> None:
    """--stage's line lists what each preset changes, read from STAGE_PRESETS (a changed preset changes it)."""
    stage = entry(help_text(capsys, monkeypatch)["training"], "stage")
    assert "1 sets --reshard_after_forward False --version plain" in stage and "--learning_rate 0.001" in stage
    assert "2 sets --version v1" in stage and "--image_aspect_ratio pad --group_by_modality_length True" in stage
    assert "--weight_decay" not in stage  # 0.0 in both presets: the default, not a change
    monkeypatch.setitem(STAGE_PRESETS[2], "learning_rate", 7e-06)
    groups = help_text(capsys, monkeypatch)
    assert "--learning_rate 7e-06" in entry(groups["training"], "stage")
    assert entry(groups["training"], "learning_rate").endswith("--stage 2: 7e-06)")


# ---------------------------------------------------------------- ignored / mapped / unsupported flags


def test_ignored_flags_warn_once_each() -> None:
    argv = [*STAGE1, "--tf32", "True", "--lazy_preprocess", "True", "--lazy_preprocess", "True",
            "--evaluation_strategy", "no", "--per_device_eval_batch_size", "4", "--cache_dir", "/tmp/x"]  # fmt: skip
    cfg, msgs = record(argv)
    assert sorted(m.split()[0] for m in msgs) == sorted(["--tf32", "--lazy_preprocess", "--cache_dir"])
    assert all("ignored" in m for m in msgs)  # the eval flags are HF's, acted on (tests/test_eval.py): no warning
    assert (cfg.train.evaluation_strategy, cfg.train.per_device_eval_batch_size) == ("no", 4)


@pytest.mark.parametrize(
    "argv", [["--optim", "adamw_torch"], ["--lora_enable", "False"], ["--bits", "16"], ["--fp16", "False"]]
)
def test_supported_value_of_fieldless_flag_is_silent(argv: list[str]) -> None:
    assert record([*STAGE1, *argv])[1] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--lora_enable", "True", "--tune_mm_mlp_adapter", "True"],
        ["--lora_bias", "all"],
        ["--bits", "4"],
        ["--bits", "8"],
        ["--bits", "four"],
        ["--fp16", "True"],
        ["--fp16"],
        ["--optim", "adamw_8bit"],
        ["--save_strategy", "epoch"],
        ["--mm_use_im_start_end", "True"],
        ["--mm_use_im_patch_token", "True"],
        ["--image_aspect_ratio", "anyres"],
        ["--mm_patch_merge_type", "spatial_unpad"],
        ["--lr_scheduler_type", "linear"],
        ["--mm_projector_type", "mlp"],
        ["--mm_projector_type", "mlp2x_relu"],
        ["--mm_vision_select_feature", "cls"],
        ["--attn_implementation", "flash"],
        ["--loss_reduction", "mean"],
        ["--report_to", "tensorboard"],
        ["--init_projector", "zeros"],
        ["--version", "llama_2"],
    ],
)
def test_unsupported_values_name_the_flag(argv: list[str]) -> None:
    with pytest.raises(ValueError, match=argv[0]):
        parse(*STAGE1, *argv)


def test_default_version_v0_is_rejected_with_hint() -> None:
    with pytest.raises(ValueError, match=r"--version 'v0'.*plain"):
        parse(*PATHS, "--tune_mm_mlp_adapter", "True")


@pytest.mark.parametrize(
    ("path", "reshard", "offload"),
    [("./scripts/zero2.json", False, False), ("./scripts/zero3.json", True, False), ("zero3_offload.json", True, True)],
)
def test_deepspeed_maps_to_reshard_with_one_warning(path: str, reshard: bool, offload: bool) -> None:
    cfg, msgs = record([*STAGE1, "--deepspeed", path])
    assert cfg.train.reshard_after_forward is reshard
    assert len(msgs) == 1 and "reshard_after_forward" in msgs[0]
    assert ("offload is not supported" in msgs[0]) is offload and ("WarmupLR" in msgs[0]) is offload


def test_deepspeed_overrides_preset() -> None:
    assert parse(*PATHS, "--stage", "1", "--deepspeed", "zero3.json").train.reshard_after_forward is True
    assert parse(*PATHS, "--stage", "1", "--reshard_after_forward", "True").train.reshard_after_forward is True


@pytest.mark.parametrize(
    "argv", [["--deepspeed", "ds_config.json"], ["--deepspeed", "zero3.json", "--reshard_after_forward", "False"]]
)
def test_deepspeed_errors(argv: list[str]) -> None:
    with pytest.raises(ValueError, match="--deepspeed"):
        parse(*STAGE1, *argv)


def test_ignored_flag_tables_are_disjoint_from_fields() -> None:
    names = {f for c in (ModelArgs, DataArgs, TrainArgs) for f in c.__dataclass_fields__}
    assert not names & set(IGNORED_FLAGS)
    assert not any(k in names for k in ("deepspeed", "fp16", "tf32"))


# ---------------------------------------------------------------- validation


def test_stage2_requires_adapter_unless_random_projector(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # PATHS exist here: check_paths looks at them first
    for folder in ("m", "clip", "img"):
        os.mkdir(folder)
    open("d.json", "w").close()
    cfg = parse(*PATHS, "--stage", "2")  # parse_args reads no file: the rule is checked at start-up
    with pytest.raises(ValueError, match=r"--pretrain_mm_mlp_adapter.*--init_projector random"):
        check_paths(cfg)
    assert parse(*PATHS, "--stage", "2", "--init_projector", "random").model.init_projector == "random"
    assert parse(*PATHS, "--stage", "2", "--pretrain_mm_mlp_adapter", "p.bin").model.pretrain_mm_mlp_adapter
    with pytest.raises(ValueError, match="--init_projector random contradicts"):
        parse(*PATHS, "--stage", "2", "--init_projector", "random", "--pretrain_mm_mlp_adapter", "p.bin")


def test_stage1_needs_no_adapter_and_group_by_modality_is_fine() -> None:
    assert parse(*PATHS, "--stage", "1", "--group_by_modality_length", "True").train.group_by_modality_length


@pytest.mark.parametrize(
    "argv",
    [
        ["--per_device_train_batch_size", "0"],
        ["--gradient_accumulation_steps", "-1"],
        ["--model_max_length", "0"],
        ["--logging_steps", "0"],
        ["--save_total_limit", "0"],
        ["--learning_rate", "-1e-3"],
        ["--mm_projector_lr", "-1"],
        ["--max_grad_norm", "-1"],
        ["--save_steps", "-5"],
        ["--warmup_ratio", "1.5"],
        ["--num_train_epochs", "0"],
    ],
)
def test_range_checks_name_the_flag(argv: list[str]) -> None:
    with pytest.raises(ValueError, match=argv[0]):
        parse(*STAGE1, *argv)


def test_valid_edge_values() -> None:
    cfg = parse(*STAGE1, "--num_train_epochs", "0", "--max_steps", "10", "--mm_projector_type", "mlp3x_gelu",
                "--mm_vision_select_feature", "cls_patch", "--version", "v1", "--save_steps", "0")  # fmt: skip
    assert (cfg.train.max_steps, cfg.model.mm_projector_type, cfg.model.version) == (10, "mlp3x_gelu", "v1")
    for projector in ("linear", "identity", "mlp2x_gelu"):
        assert parse(*STAGE1, "--mm_projector_type", projector).model.mm_projector_type == projector


def test_direct_construction_validates() -> None:
    m = ModelArgs(model_name_or_path="m", vision_tower="v", version="plain", tune_mm_mlp_adapter=True)
    d = DataArgs(data_path="d", image_folder="i")
    assert Config(m, d, TrainArgs(output_dir="o")).train.output_dir == "o"
    with pytest.raises(ValueError, match="--per_device_train_batch_size"):
        Config(m, d, TrainArgs(output_dir="o", per_device_train_batch_size=0))


# ---------------------------------------------------------------- record


def test_to_dict_format_and_atomic_save(tmp_path: Path) -> None:
    cfg = parse(*PATHS, "--stage", "2", "--pretrain_mm_mlp_adapter", "p.bin")
    text = format_config(cfg)  # the console's short form: the flags that differ from finetune.sh (the paths here)
    changed = [line.split()[0] for line in text.splitlines()[1:]]
    assert text.splitlines()[0] == "stage 2: LLaVA's finetune.sh with" and "--learning_rate" not in text
    assert changed == ["--model_name_or_path", "--vision_tower", "--pretrain_mm_mlp_adapter", "--data_path",
                       "--image_folder", "--output_dir"]  # fmt: skip
    assert "--learning_rate 0.001 (finetune.sh: 2e-05)" in format_config(parse(*PATHS, "--stage", "2",
                                                                             "--learning_rate", "1e-3"))  # fmt: skip
    out = tmp_path / "run" / "nested"
    path = save_config(cfg, str(out))
    assert path == str(out / CONFIG_NAME) and os.listdir(out) == [CONFIG_NAME]  # no .tmp left behind
    loaded = json.loads(Path(path).read_text())
    assert loaded == cfg.to_dict()
    assert Config(ModelArgs(**loaded["model"]), DataArgs(**loaded["data"]), TrainArgs(**loaded["train"])) == cfg
    save_config(parse(*STAGE1), str(out))  # overwrite in place
    assert json.loads(Path(path).read_text())["model"]["version"] == "plain"


# ---------------------------------------------------------------- GOLDEN: LLaVA's scripts and our launchers

COMMON = {  # what every v1.5 script sets (scripts/v1_5/*.sh)
    "vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2, "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "bf16": True,
    "num_train_epochs": 1.0, "gradient_accumulation_steps": 1, "save_total_limit": 1, "weight_decay": 0.0,
    "warmup_ratio": 0.03, "lr_scheduler_type": "cosine", "logging_steps": 1, "model_max_length": 2048,
    "gradient_checkpointing": True, "dataloader_num_workers": 4, "report_to": "wandb", "max_grad_norm": 0.0,
}  # fmt: skip
PRETRAIN = {
    **COMMON, "reshard_after_forward": False, "version": "plain", "tune_mm_mlp_adapter": True,
    "per_device_train_batch_size": 32, "learning_rate": 1e-3, "save_steps": 24000, "image_aspect_ratio": "square",
    "group_by_modality_length": False, "pretrain_mm_mlp_adapter": None,
    "data_path": "./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
    "image_folder": "./playground/data/LLaVA-Pretrain/images",
}  # fmt: skip
FINETUNE = {
    **COMMON, "reshard_after_forward": True, "version": "v1", "tune_mm_mlp_adapter": False,
    "per_device_train_batch_size": 16, "learning_rate": 2e-5, "save_steps": 50000, "image_aspect_ratio": "pad",
    "group_by_modality_length": True, "data_path": "./playground/data/llava_v1_5_mix665k.json",
    "image_folder": "./playground/data",
}  # fmt: skip
IGNORED_IN_SCRIPTS = {"--save_strategy", "--tf32", "--lazy_preprocess"}  # the eval flags are HF's, acted on
GOLDEN = [
    ("tests/assets/llava_pretrain.sh", {**PRETRAIN, "model_name_or_path": "lmsys/vicuna-13b-v1.5",
                                        "output_dir": "./checkpoints/llava-v1.5-13b-pretrain"}),
    ("tests/assets/llava_finetune.sh", {**FINETUNE, "model_name_or_path": "lmsys/vicuna-13b-v1.5",
     "pretrain_mm_mlp_adapter": "./checkpoints/llava-v1.5-13b-pretrain/mm_projector.bin",
     "output_dir": "./checkpoints/llava-v1.5-13b"}),
    ("configs/llava_v15_7b_stage1.sh", {**PRETRAIN, "model_name_or_path": "./checkpoints/vicuna-7b-v1.5",
                                        "output_dir": "./checkpoints/llava-v1.5-7b-pretrain"}),
    ("configs/llava_v15_7b_stage2.sh", {**FINETUNE, "model_name_or_path": "./checkpoints/vicuna-7b-v1.5",
     "pretrain_mm_mlp_adapter": "./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin",
     "output_dir": "./checkpoints/llava-v1.5-7b"}),
]  # fmt: skip


@pytest.mark.parametrize(("script", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_script_parses_unchanged(script: str, expected: dict) -> None:
    cfg, msgs = record(script_flags(ROOT / script))
    flat = {**cfg.to_dict()["model"], **cfg.to_dict()["data"], **cfg.to_dict()["train"]}
    assert {k: flat[k] for k in expected} == expected
    assert {m.split()[0] for m in msgs} == {"--deepspeed", *IGNORED_IN_SCRIPTS} and len(msgs) == 4
    assert (flat["evaluation_strategy"], flat["per_device_eval_batch_size"]) == ("no", 4)


@pytest.mark.parametrize(
    ("stage", "script"), [(1, "tests/assets/llava_pretrain.sh"), (2, "tests/assets/llava_finetune.sh")]
)
def test_stage_preset_equals_llava_script(stage: int, script: str) -> None:
    """--stage N plus the paths resolves to exactly what LLaVA's script resolves to (report_to aside)."""
    from_script = parse(*script_flags(ROOT / script))
    m, d, t = from_script.model, from_script.data, from_script.train
    paths = ["--model_name_or_path", m.model_name_or_path, "--vision_tower", m.vision_tower, "--output_dir",
             t.output_dir, "--data_path", d.data_path, "--image_folder", d.image_folder]  # fmt: skip
    if m.pretrain_mm_mlp_adapter:
        paths += ["--pretrain_mm_mlp_adapter", m.pretrain_mm_mlp_adapter]
    from_preset = parse(*paths, "--stage", str(stage), "--report_to", "wandb")
    from_preset.train.stage = None
    # The presets' two speed settings, neither of which changes the loss: checkpoint only what memory needs, pack.
    assert (from_preset.train.gradient_checkpointing, from_preset.train.padding_free) == ("auto", True)
    assert (from_script.train.gradient_checkpointing, from_script.train.padding_free) == (True, False)
    from_preset.train.gradient_checkpointing, from_preset.train.padding_free = True, False
    assert from_preset == from_script


def test_configs_differ_from_llava_only_in_launcher_and_paths() -> None:
    for ours, theirs in [
        ("llava_v15_7b_stage1.sh", "llava_pretrain.sh"),
        ("llava_v15_7b_stage2.sh", "llava_finetune.sh"),
    ]:
        a, b = (
            (ROOT / "configs" / ours).read_text().splitlines(),
            (ROOT / "tests/assets" / theirs).read_text().splitlines(),
        )
        assert len(a) == len(b)
        diff = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
        assert diff[0] == ("torchrun --nproc_per_node 8 train.py \\", "deepspeed llava/train/train_mem.py \\")
        assert all(
            x.split()[0] in {"--model_name_or_path", "--output_dir", "--pretrain_mm_mlp_adapter"} for x, _ in diff[1:]
        )
        assert all(x.split()[0] == y.split()[0] and "7b" in x and "13b" in y for x, y in diff[1:])


def test_save_strategy_no_turns_mid_run_checkpoints_off():
    base = [
        "--model_name_or_path",
        "m",
        "--vision_tower",
        "v",
        "--data_path",
        "d",
        "--image_folder",
        "i",
        "--output_dir",
        "o",
        "--stage",
        "1",
    ]
    with pytest.warns(ConfigWarning):
        assert parse_args([*base, "--save_strategy", "no"]).train.save_steps == 0
    with pytest.warns(ConfigWarning):
        assert parse_args([*base, "--save_strategy", "steps"]).train.save_steps == 24000
