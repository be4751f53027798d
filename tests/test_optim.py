"""Optimizer and schedule: GOLDEN lr multipliers (and parity with HF's cosine schedule), LLaVA step counts, param
groups (norm/bias/projector), the lr-0 first update, and FSDP2 DTensor params on 2 gloo ranks."""

import math
import os

import pytest
import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from minillava.config import TrainArgs
from minillava.optim import (
    ADAM_BETAS,
    ADAM_EPS,
    build_optimizer,
    group_lrs,
    lr_multiplier,
    num_training_steps,
    param_groups,
    warmup_steps,
)
from tests.dist import run_distributed

# ---------------------------------------------------------------- schedule

# warmup 3, total 10: 0, 1/3, 2/3, then 0.5 * (1 + cos(pi * k / 7)) for k = 0..7
GOLDEN = [0.0, 1 / 3, 2 / 3, 1.0, 0.9504844339512095, 0.8117449009293668, 0.6112604669781572, 0.38873953302184283,
          0.18825509907063326, 0.04951556604879048, 0.0]  # fmt: skip


def test_lr_multiplier_golden_table() -> None:
    assert [lr_multiplier(s, 3, 10) for s in range(11)] == pytest.approx(GOLDEN, abs=1e-15)
    assert lr_multiplier(0, 3, 10) == 0.0 and lr_multiplier(3, 3, 10) == 1.0 and lr_multiplier(10, 3, 10) == 0.0


def test_lr_multiplier_no_warmup_and_degenerate() -> None:
    assert lr_multiplier(0, 0, 4) == 1.0  # no warmup: the first update runs at the peak lr
    assert lr_multiplier(2, 0, 4) == pytest.approx(0.5)
    assert lr_multiplier(0, 0, 0) == 1.0 and lr_multiplier(0, 1, 1) == 0.0  # no division by zero


@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (1, 1), (1, 5), (3, 10), (66, 2181), (156, 5198)])
def test_lr_multiplier_matches_hf_exactly(warmup: int, total: int) -> None:
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    hf = [sched.lr_lambdas[0](s) for s in range(total + 1)]
    assert [lr_multiplier(s, warmup, total) for s in range(total + 1)] == hf  # bit-identical


def test_llava_step_counts_golden() -> None:
    # scripts/v1_5/finetune.sh: 665,298 samples at global batch 128 -> 5198 steps, warmup 156;
    # pretrain.sh: 558,128 at 256 -> 2181 steps, warmup 66.
    finetune = num_training_steps(math.ceil(665_298 / 128), num_train_epochs=1)
    pretrain = num_training_steps(math.ceil(558_128 / 256), num_train_epochs=1)
    assert (finetune, warmup_steps(finetune, 0.03)) == (5198, 156)
    assert (pretrain, warmup_steps(pretrain, 0.03)) == (2181, 66)
    assert num_training_steps(100, num_train_epochs=1.5) == 150
    assert num_training_steps(7, num_train_epochs=0.5) == 4  # HF rounds up
    assert num_training_steps(5198, num_train_epochs=1, max_steps=10) == 10
    assert warmup_steps(10, 0.0) == 0 and warmup_steps(10, 0.01) == 1


# ---------------------------------------------------------------- param groups


class Tiny(nn.Module):
    """Names like LlavaModel's: an LLM with RMSNorm/embeddings, a tower with LayerNorm, a projector."""

    def __init__(self) -> None:
        super().__init__()
        self.llm = nn.ModuleDict({"embed": nn.Embedding(10, 4), "q_proj": nn.Linear(4, 4, bias=True)})
        self.llm["norm"] = LlamaRMSNorm(4)
        self.vision_tower = nn.ModuleDict({"fc": nn.Linear(4, 4), "post_layernorm": nn.LayerNorm(4)})
        self.mm_projector = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
        self.mm_projector.append(nn.LayerNorm(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.llm["q_proj"](self.vision_tower["post_layernorm"](self.vision_tower["fc"](x)))
        return self.mm_projector(self.llm["norm"](h))


def names(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in groups}


def test_two_groups_without_projector_lr() -> None:
    model = Tiny()
    model.vision_tower.requires_grad_(False)  # frozen params never reach the optimizer
    groups = param_groups(model, weight_decay=0.1, learning_rate=1e-3, mm_projector_lr=None)
    assert names(model, groups) == {
        "decay": {"llm.embed.weight", "llm.q_proj.weight", "mm_projector.0.weight", "mm_projector.2.weight"},
        "no_decay": {"llm.q_proj.bias", "llm.norm.weight", "mm_projector.0.bias", "mm_projector.2.bias",
                     "mm_projector.3.weight", "mm_projector.3.bias"},
    }  # fmt: skip
    assert [(g["weight_decay"], g["lr"]) for g in groups] == [(0.1, 1e-3), (0.0, 1e-3)]


def test_four_groups_with_projector_lr() -> None:
    model = Tiny()
    groups = param_groups(model, weight_decay=0.1, learning_rate=2e-4, mm_projector_lr=2e-5)
    got = names(model, groups)
    assert list(got) == ["decay", "no_decay", "projector_decay", "projector_no_decay"]  # LLaVA's order
    assert got["decay"] == {"llm.embed.weight", "llm.q_proj.weight", "vision_tower.fc.weight"}
    assert got["no_decay"] == {"llm.q_proj.bias", "llm.norm.weight", "vision_tower.fc.bias",
                               "vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"}  # fmt: skip
    assert got["projector_decay"] == {"mm_projector.0.weight", "mm_projector.2.weight"}
    assert got["projector_no_decay"] == {"mm_projector.0.bias", "mm_projector.2.bias", "mm_projector.3.weight",
                                         "mm_projector.3.bias"}  # fmt: skip
    assert [(g["weight_decay"], g["lr"]) for g in groups] == [(0.1, 2e-4), (0.0, 2e-4), (0.1, 2e-5), (0.0, 2e-5)]


def test_empty_groups_skipped_stage1() -> None:
    model = Tiny()
    model.requires_grad_(False)
    model.mm_projector[0].requires_grad_(True)  # stage-1-like: only (part of) the projector trains
    groups = param_groups(model, weight_decay=0.0, learning_rate=1e-3, mm_projector_lr=1e-4)
    assert names(model, groups) == {
        "projector_decay": {"mm_projector.0.weight"},
        "projector_no_decay": {"mm_projector.0.bias"},
    }
    assert param_groups(model, weight_decay=0.0, learning_rate=1e-3, mm_projector_lr=None)[0]["name"] == "decay"


def test_norm_matched_by_module_not_name() -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), LlamaRMSNorm(2))  # "1.weight": no "norm" in the name
    got = names(model, param_groups(model, weight_decay=0.1, learning_rate=1.0, mm_projector_lr=None))
    assert got == {"decay": {"0.weight"}, "no_decay": {"1.weight"}}


# ---------------------------------------------------------------- optimizer + scheduler


def train_args(**kw: object) -> TrainArgs:
    return TrainArgs(output_dir="unused", **{"learning_rate": 1e-2, "warmup_ratio": 0.3, **kw})


def test_build_optimizer_settings() -> None:
    model = Tiny()
    opt, sched = build_optimizer(model, train_args(weight_decay=0.05, mm_projector_lr=1e-3), total_steps=10)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == ADAM_BETAS and g["eps"] == ADAM_EPS for g in opt.param_groups)
    assert ADAM_BETAS == (0.9, 0.999) and ADAM_EPS == 1e-8
    assert not opt.defaults["fused"]  # CPU params: torch's default implementation
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0, 0.05, 0.0]
    assert group_lrs(opt) == {"decay": 0.0, "no_decay": 0.0, "projector_decay": 0.0, "projector_no_decay": 0.0}
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-2, 1e-2, 1e-3, 1e-3]
    assert sched.last_epoch == 0


def test_first_step_has_lr_zero_but_updates_moments_then_follows_schedule() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt, sched = build_optimizer(model, train_args(weight_decay=0.1), total_steps=10)  # warmup ceil(3.0) = 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lrs = []
    for step in range(10):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:  # lr 0: parameters bit-identical, Adam moments already moved
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
            used = [p for n, p in model.named_parameters() if n != "llm.embed.weight"]  # embed gets no grad
            assert all(opt.state[p]["exp_avg"].abs().sum() > 0 for p in used)
            assert all(opt.state[p]["step"].item() == 1 for p in used)
    assert lrs == pytest.approx([1e-2 * m for m in GOLDEN[:10]], rel=1e-12, abs=1e-18)
    assert not torch.equal(model.llm["q_proj"].weight, before["llm.q_proj.weight"])


def test_no_trainable_params_is_error() -> None:
    model = Tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, train_args(), total_steps=10)


def test_scheduler_state_round_trip() -> None:
    model = Tiny()
    opt, sched = build_optimizer(model, train_args(), total_steps=10)
    for _ in range(4):
        opt.step()
        sched.step()
    opt2, sched2 = build_optimizer(model, train_args(), total_steps=10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 4 and group_lrs(opt2) == group_lrs(opt)
    assert group_lrs(opt)["decay"] == pytest.approx(1e-2 * GOLDEN[4])


# ---------------------------------------------------------------- FSDP2 (DTensor params)


def _fsdp_worker(rank: int, world_size: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = Tiny()
    model.vision_tower.requires_grad_(False)
    fully_shard(model.mm_projector)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt, sched = build_optimizer(model, train_args(mm_projector_lr=1e-3), total_steps=4)
    group_names = [g["name"] for g in opt.param_groups]
    before = {n: p.full_tensor() for n, p in model.named_parameters()}
    torch.manual_seed(1)  # same batch on every rank
    for step in range(2):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step == 0:
            assert all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())
    after = {n: p.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save({"names": group_names, "before": before, "after": after}, os.path.join(out_dir, "fsdp.pt"))


@pytest.mark.dist
def test_fsdp2_dtensor_params_match_single_process(tmp_path: pytest.TempPathFactory) -> None:
    run_distributed(_fsdp_worker, tmp_path, str(tmp_path))
    got = torch.load(os.path.join(tmp_path, "fsdp.pt"))
    assert got["names"] == ["decay", "no_decay", "projector_decay", "projector_no_decay"]
    torch.manual_seed(0)
    model = Tiny()
    model.vision_tower.requires_grad_(False)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, sched = build_optimizer(model, train_args(mm_projector_lr=1e-3), total_steps=4)
    torch.manual_seed(1)
    for _ in range(2):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(got["before"][n], init[n])
        torch.testing.assert_close(got["after"][n], p.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["after"]["mm_projector.0.weight"], got["before"]["mm_projector.0.weight"])
