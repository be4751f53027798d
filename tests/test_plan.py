"""The memory plan (minillava/plan.py, minillava/memory.py): the trace of one real train_step on fake tensors and
the analytic estimate train.py plans with agree within 10% over a grid of layouts (stage 1 and 2, FSDP and HSDP at
8 and 64 ranks, bf16 and fp32, packed and padded, checkpointing none / auto / all); the 7B figures from folders
holding only config.json; auto checkpoints the fewest layers whose estimate fits; the CLI's one-line errors."""

import json

import pytest
import torch
from conftest import make_tiny_llava, tiny_clip_config, tiny_llama_config
from transformers import CLIPVisionConfig, LlamaConfig

from minillava import plan as P
from minillava.config import parse_args
from minillava.memory import BUDGET, micro_batch_tokens, plan_checkpointing

GIB = 2**30


def _args(stage=2, batch=4, ac="False", bf16="True", packed="True", hsdp="False", max_len=256, extra=()):
    return ["--stage", str(stage), "--model_name_or_path", "m", "--vision_tower", "v", "--data_path", "d",
            "--image_folder", "i", "--output_dir", "o", "--init_projector", "random", "--bf16", bf16,
            "--per_device_train_batch_size", str(batch), "--model_max_length", str(max_len),
            "--gradient_checkpointing", ac, "--padding_free", packed, "--hsdp", hsdp, *extra]  # fmt: skip


def _small():  # big enough that no rounding dominates, small enough to trace in a second
    llm = tiny_llama_config(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return llm, tiny_clip_config(image_size=112, hidden_size=64, intermediate_size=128)  # 64 image tokens


LORA = ("--lora_enable", "True", "--lora_r", "16", "--lora_alpha", "32", "--mm_projector_lr", "2e-5")
GRID = [  # stage, batch, checkpointing, bf16, packed, nodes x ranks, hsdp, more flags
    (2, 4, "False", "True", "True", 1, "False", ()),
    (2, 8, "True", "True", "False", 8, "True", ()),
    (2, 4, "False", "False", "True", 8, "False", ()),
    (1, 16, "False", "True", "True", 1, "False", ()),
    (1, 8, "True", "False", "False", 8, "True", ()),
    (2, 16, "True", "True", "True", 8, "True", ()),
    (2, 4, "False", "True", "True", 1, "False", LORA),
    (2, 4, "False", "True", "False", 1, "False", ("--reshard_after_forward", "False")),
]


@pytest.mark.parametrize(("stage", "batch", "ac", "bf16", "packed", "nodes", "hsdp", "extra"), GRID)
def test_estimate_matches_the_trace(stage, batch, ac, bf16, packed, nodes, hsdp, extra):
    cfg = parse_args(_args(stage, batch, ac, bf16, packed, hsdp, extra=extra))
    lengths = [256 - 9 * i for i in range(batch)]  # samples of unequal lengths: padding counts on the padded path
    plan = P.trace(cfg, _small(), nnodes=nodes, nproc_per_node=8, gpu_memory_gib=80, lengths=lengths)
    assert plan.tokens == micro_batch_tokens(lengths, packed == "True")
    assert plan.shard_group == (8 if hsdp == "True" or nodes == 1 else 64)
    assert plan.checkpointed_layers == (4 if ac == "True" else 0)
    assert plan.estimate_gib == pytest.approx(plan.traced_peak_gib, rel=0.10)
    assert plan.parameters_gib > 0 and plan.activations_gib > 0 and plan.optimizer_gib > 0


def _vicuna_folders(tmp_path, size="7b"):
    """Folders holding only config.json: Vicuna-7B/13B-v1.5's LLM, CLIP-L/336's tower."""
    d, inter, layers, heads = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40)}[size]
    LlamaConfig(hidden_size=d, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=4096,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llm")  # fmt: skip
    CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=336, patch_size=14, projection_dim=768).save_pretrained(tmp_path / "clip")  # fmt: skip
    return str(tmp_path / "llm"), str(tmp_path / "clip")


def _run(capsys, argv):
    assert P.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_7b_from_config_only_folders(tmp_path, capsys):
    """LLaVA-1.5-7B on 64 H100s (8 nodes x 8, HSDP): stage 2 at finetune.sh's batch 16 fits with some layers
    checkpointed, and the trace agrees with the estimate; stage 1 at pretrain.sh's batch 32 holds the frozen LLM
    whole (about 13 GiB of bf16 weights on every rank)."""
    llm, clip = _vicuna_folders(tmp_path)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": str(i), "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
        {"from": "gpt", "value": "word " * (5 + i // 2)}]}
        for i in range(40)]))  # fmt: skip
    common = ["--model_name_or_path", llm, "--vision_tower", clip, "--image_folder", str(tmp_path),
              "--output_dir", str(tmp_path / "out"), "--mm_projector_type", "mlp2x_gelu",
              "--mm_vision_select_layer", "-2", "--json", "--nproc_per_node", "8"]  # fmt: skip
    two = _run(capsys, [*common, "--stage", "2", "--data_path", str(tmp_path / "none.json"),
                        "--init_projector", "random", "--per_device_train_batch_size", "16", "--nnodes", "8",
                        "--hsdp", "True"])  # fmt: skip
    assert two["world"] == 64 and two["shard_group"] == 8 and two["tokens"] == 16 * 2048
    assert 0 < two["checkpointed_layers"] < 32 and two["fits"]
    assert two["estimate_gib"] == pytest.approx(two["traced_peak_gib"], rel=0.10)
    assert two["traced_peak_gib"] <= 80 * BUDGET
    one = _run(capsys, [*common, "--stage", "1", "--data_path", str(data), "--per_device_train_batch_size", "32"])
    # no tokenizer in a config-only folder: lengths estimated (from above) from the words; each sample has an image
    assert len(one["micro_batch"]) == 32 and all(576 + 20 < n < 720 for n in one["micro_batch"])
    assert one["micro_batch"] == sorted(one["micro_batch"], reverse=True) and one["tokens"] == sum(one["micro_batch"])
    assert 12.5 < one["parameters_gib"] < 14 and one["optimizer_gib"] < 0.1
    assert one["estimate_gib"] == pytest.approx(one["traced_peak_gib"], rel=0.10)
    assert one["tokens_per_s"] > 0 and one["fits"]


def test_auto_checkpoints_the_fewest_layers_that_fit():
    model = make_tiny_llava()
    t = lambda mode: parse_args(_args(batch=4, ac=mode, bf16="False")).train  # noqa: E731
    none = plan_checkpointing(model, t("False"), 1, 10**12)
    every = plan_checkpointing(model, t("True"), 1, 10**12)
    assert (none.layers, every.layers) == (0, 2) and every.estimate_bytes < none.estimate_bytes
    assert plan_checkpointing(model, t("auto"), 1, 10**12).layers == 0  # plenty of memory: none
    tight = int((none.estimate_bytes + every.estimate_bytes) / 2 / BUDGET)  # between the two: one layer
    assert plan_checkpointing(model, t("auto"), 1, tight).layers == 1
    assert plan_checkpointing(model, t("auto"), 1, 1).layers == 2  # nothing fits: every layer
    assert "1 of 2 decoder layers" in plan_checkpointing(model, t("auto"), 1, tight).describe()
    # more ranks in the shard group, less per rank; HSDP shards over a node only
    assert plan_checkpointing(model, t("False"), 8, 10**12).estimate_bytes < none.estimate_bytes
    # fewer tokens (LLaVA-558K's ~620 per sample, not model_max_length): less activation memory
    assert plan_checkpointing(model, t("False"), 1, 10**12, lengths=[20] * 4).estimate_bytes < none.estimate_bytes


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert P.main(["--stage", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: missing required flag") and err.count("\n") == 1
    assert P.main([*_args(), "--nproc_per_node", "0"]) == 1
    assert "--nproc_per_node" in capsys.readouterr().err


def test_longest_samples_are_the_datasets_longest(assets, tokenizer, image_processor):
    """The planner's (and train.py's) largest micro-batch: the LLM lengths the dataset's own samples take, images
    expanded and truncated, of its longest samples; without a tokenizer an estimate from the words that is never
    below them."""
    from minillava.data import LazySupervisedDataset, longest_samples
    from minillava.layout import lay_out

    for image_tokens, max_len in ((4, 2048), (40, 48)):  # 48: some samples truncated
        ds = LazySupervisedDataset(assets["data"], tokenizer, image_processor, image_folder=assets["images"],
                                   version="v1", model_max_length=max_len, image_tokens=image_tokens)  # fmt: skip
        real = sorted(
            (lay_out({"input_ids": s["input_ids"][None], "labels": s["labels"][None],
                      "attention_mask": torch.ones(1, len(s["input_ids"]), dtype=torch.bool),
                      "pixel_values": s["pixel_values"][None]}, image_tokens=image_tokens, max_len=max_len,
                     padding_free=True).seq_lens[0] for s in (ds[i] for i in range(len(ds)))),
            reverse=True,
        )  # fmt: skip
        kw = dict(version="v1", image_tokens=image_tokens, max_len=max_len)
        assert longest_samples(ds.records, 3, tokenizer=tokenizer, **kw) == real[:3]
        estimated = longest_samples(ds.records, 3, tokenizer=None, **kw)
        assert all(e >= r for e, r in zip(estimated, real[:3], strict=True))


def test_train_plans_with_the_data(assets, tmp_path, capsys, monkeypatch):
    """train.py plans with the data's longest samples (not batch x model_max_length) and says so in one line."""
    from conftest import flags

    import train

    seen = []
    build = train.build_model
    monkeypatch.setattr(train, "build_model", lambda *a, **kw: seen.append(kw["lengths"]) or build(*a, **kw))
    train.main(flags(assets, str(tmp_path / "out"), max_steps="1", model_max_length="1024"))
    (lengths,) = seen
    assert len(lengths) == 2 and 4 < min(lengths) <= max(lengths) < 100  # the tiny dataset's, not 1024
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("memory plan: "))
    assert "activation checkpointing (auto): 0 of 2 decoder layers" in line and "% of it usable" in line


def test_help_lists_the_planners_flags(capsys):
    assert P.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Will it fit?") and all(f in out for f in ("--nproc_per_node", "--gpu_memory_gb", "--json"))
