"""End-to-end trainer tests through the real main(argv): one process, and 2 gloo ranks under FSDP2."""

import json
import os

import pytest
import torch
from conftest import flags, losses
from dist import run_distributed

import train


def test_stage1_then_stage2_single_process(assets, tmp_path):
    s1 = str(tmp_path / "s1")
    train.main(flags(assets, s1, stage=1, gradient_checkpointing="True"))
    proj = torch.load(os.path.join(s1, "mm_projector.bin"), weights_only=True)
    assert sorted(proj) == [f"model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")]
    with open(os.path.join(s1, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llava_llama" and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert all(map(lambda x: x == x and x < 100, losses(s1)))  # finite
    with open(os.path.join(s1, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    assert row["copy_wait"] == 0.0 and 0 <= row["data_wait"] < 1  # no device copies to wait for on the CPU
    s2 = str(tmp_path / "s2")
    argv = flags(assets, s2, stage=2, pretrain_mm_mlp_adapter=os.path.join(s1, "mm_projector.bin"))
    train.main(argv)
    assert os.path.exists(os.path.join(s2, "model.safetensors.index.json"))
    assert len(losses(s2)) == 3


def _dist_main(rank, world, argv):
    train.main(argv)


@pytest.mark.dist
@pytest.mark.parametrize(
    ("reduction", "extra", "tol"),
    [
        ("llava", {}, 1e-5),
        ("global_token", {}, 1e-5),
        # bf16 compute (fp32 masters, fp32 reduction) with padding-free packing: each micro-batch is computed the
        # same way on either side, only the gradient sums differ (max difference measured on CPU: 2.4e-7).
        ("llava", {"bf16": "True", "padding_free": "True"}, 1e-5),
    ],
)
def test_two_ranks_match_one_process(assets, tmp_path, reduction, extra, tol):
    """Same global step, split over ranks vs over accumulation micro-steps: the sampler deals chunk j of each
    megabatch to rank j % W at micro-step j // W, so 1 rank x GA 2 sees exactly the 2 ranks' micro-batches."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = dict(loss_reduction=reduction, group_by_modality_length="True", **extra)
    train.main(flags(assets, one, gradient_accumulation_steps=2, **common))
    run_distributed(_dist_main, tmp_path, flags(assets, two, **common))
    torch.testing.assert_close(losses(two), losses(one), rtol=tol, atol=tol)


def test_a_run_that_trains_no_label_token_stops(assets, tmp_path):
    """--model_max_length below every sample's image + prompt: each sample is a named skip, and the run stops with
    an error instead of writing a model that learnt nothing (exit 0 before)."""
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match=r"no label token in 3 steps: .*--model_max_length 12 against the 4 positions"):
        train.main(flags(assets, out, stage=2, model_max_length=12))
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))


def _with_all_prompt_samples(assets, root: str, n: int = 4) -> str:
    """assets' stage-2 records plus n text-only samples whose question alone outgrows --model_max_length 64: each
    loses its whole answer to truncation, so a micro-batch of one of them has no labelled token."""
    with open(assets["data"]) as f:
        records = json.load(f)
    question = " ".join(["Describe the shape and its colour in great detail"] * 12) + "?"
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "No."}]
    records += [{"id": f"all-prompt-{i}", "conversations": turns} for i in range(n)]
    os.makedirs(root)
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


@pytest.mark.dist
def test_a_rank_with_an_all_prompt_micro_batch_matches_one_process(assets, tmp_path):
    """Stage 2 on 2 ranks, one sample per rank, where some steps give one rank an all-prompt sample and the other a
    labelled one: every trainable parameter still gets a (zero) gradient on that rank, so FSDP2's reduce-scatters
    match (lm_head had none: gloo aborted, NCCL would hang), and the losses equal 1 rank x GA 2 on the same batches."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = dict(data_path=_with_all_prompt_samples(assets, str(tmp_path / "d")), per_device_train_batch_size=1,
                  max_steps=10)  # fmt: skip
    train.main(flags(assets, one, gradient_accumulation_steps=2, **common))
    run_distributed(_dist_main, tmp_path, flags(assets, two, **common))
    with open(os.path.join(two, "metrics.jsonl")) as f:
        empty = [json.loads(line)["empty_micro_batches"] for line in f]
    assert 1 in empty, empty  # a step where exactly one of the two ranks had nothing to learn
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=1e-5)
