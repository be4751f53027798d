"""--max_grad_norm under FSDP2: after one train_step the weights equal those of an unsharded copy of the model that
saw the same micro-batches, clipped by torch.nn.utils.clip_grad_norm_ and stepped by the same AdamW, on 1 and on 2
ranks, for the parameter set of each stage.

The clip is made to matter: AdamW's first update is lr * g / (|g| + eps), nearly lr * sign(g) whatever the gradient's
scale, so max_norm is set so low (1e-6) that the clipped gradient's entries are of eps's size and the update shrinks
several-fold. An unclipped step (the bug this guards against: the norm computed but never applied) lands far away."""

import os

import pytest
import torch
from conftest import flags, trainer_parts
from dist import run_distributed

import train
from minillava import distributed as D
from minillava.config import parse_args
from minillava.formats import run_settings
from minillava.gather import full_tensors
from minillava.model import build_llava_from_config, set_trainable
from minillava.optim import build_optimizer

MAX_NORM = 1e-6


def _argv(assets, out, stage):
    return flags(assets, out, stage=stage, max_grad_norm=MAX_NORM, warmup_ratio=0, learning_rate="1e-3", max_steps=2)


def _one_step(argv: list[str]) -> dict:
    """Rank-local: build the FSDP2 model as train.py does, run one train_step; returns what the reference needs."""
    cfg = parse_args(argv)
    info = D.init_distributed()
    try:
        model, optimizer, scheduler, stream = trainer_parts(cfg, info, 2)
        micro = [next(stream)[1] for _ in range(cfg.train.gradient_accumulation_steps)]
        before = {k: v.clone() for k, v in full_tensors(model)}  # a 1-rank full tensor may alias the shard
        metrics = train.train_step(model, micro, optimizer, scheduler, cfg)
        micro = [b.to(torch.device("cpu")) for b in micro]  # the reference runs on the CPU
        return {"before": before, "after": dict(full_tensors(model)), "micro": micro, "grad_norm": metrics["grad_norm"]}
    finally:
        D.cleanup(info)


def _reference(argv: list[str], before: dict, micro_by_rank: list[list[dict]], max_norm: float) -> dict:
    """The unsharded copy: the same weights and micro-batches, LLaVA's loss normalisation (mean per micro-batch,
    / accumulation steps, / ranks as FSDP averages), torch's clip_grad_norm_, the trainer's AdamW groups."""
    from transformers import AutoConfig, CLIPVisionConfig

    cfg = parse_args(argv)
    m = cfg.model
    llm_config = AutoConfig.from_pretrained(m.model_name_or_path)
    vision_config = CLIPVisionConfig.from_pretrained(m.vision_tower)
    model = build_llava_from_config(llm_config, vision_config, run_settings(cfg), padding_free=cfg.train.padding_free)
    model.load_state_dict(before)
    set_trainable(model, tune_mm_mlp_adapter=m.tune_mm_mlp_adapter)
    optimizer, _ = build_optimizer(model, cfg.train, 2)
    world = len(micro_by_rank)
    for micro in micro_by_rank:
        for batch in micro:
            loss_sum, n_tok = model(**batch)
            (loss_sum / max(n_tok, 1) / len(micro) / world).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else None
    optimizer.step()
    return {"after": {k: v.detach() for k, v in model.state_dict().items()}, "norm": norm}


def _check(argv, before, after, micro_by_rank, grad_norm):
    clipped = _reference(argv, before, micro_by_rank, MAX_NORM)
    unclipped = _reference(argv, before, micro_by_rank, 0.0)
    assert grad_norm == pytest.approx(float(clipped["norm"]), rel=1e-5) and grad_norm > 100 * MAX_NORM
    trained = [k for k in after if not torch.equal(after[k], before[k])]
    assert trained, "nothing trained"
    for k in after:
        torch.testing.assert_close(after[k], clipped["after"][k], rtol=1e-5, atol=1e-7, msg=lambda s, k=k: f"{k}: {s}")
    # the clip changed the update: the unclipped step moves the weights several times further
    moved = sum((after[k] - before[k]).abs().sum() for k in trained)
    moved_unclipped = sum((unclipped["after"][k] - before[k]).abs().sum() for k in trained)
    assert moved < 0.5 * moved_unclipped


@pytest.mark.parametrize("stage", [1, 2])
def test_clip_one_rank_equals_torch_clip_grad_norm_unsharded(assets, tmp_path, stage):
    argv = _argv(assets, str(tmp_path / "o"), stage)
    argv = [*argv, "--gradient_accumulation_steps", "2"]
    r = _one_step(argv)
    _check(argv, r["before"], r["after"], [r["micro"]], r["grad_norm"])


def _dist_steps(rank, world, argvs, out_dir):
    for i, argv in enumerate(argvs):
        torch.save(_one_step(argv), os.path.join(out_dir, f"case{i}_rank{rank}.pt"))


@pytest.mark.dist
def test_clip_two_ranks_equals_torch_clip_grad_norm_unsharded(assets, tmp_path):
    """Both stages in one 2-rank launch; each rank's grads are DTensor shards, the norm is the global one."""
    argvs = [_argv(assets, str(tmp_path / f"o{stage}"), stage) for stage in (1, 2)]
    run_distributed(_dist_steps, tmp_path, argvs, str(tmp_path))
    for i, argv in enumerate(argvs):
        ranks = [torch.load(tmp_path / f"case{i}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert ranks[0]["grad_norm"] == ranks[1]["grad_norm"]
        _check(argv, ranks[0]["before"], ranks[0]["after"], [r["micro"] for r in ranks], ranks[0]["grad_norm"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clip_on_cuda_equals_torch_clip_grad_norm_unsharded(assets, tmp_path):
    """fp32 on the GPU (TF32 off: conftest) against the unsharded copy on the CPU."""
    argv = [*_argv(assets, str(tmp_path / "o"), 2), "--gradient_accumulation_steps", "2"]
    r = _one_step(argv)
    _check(argv, r["before"], r["after"], [r["micro"]], r["grad_norm"])
