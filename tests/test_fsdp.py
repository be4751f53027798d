"""FSDP2 behaviour of the real trainer: frozen weights stay bit-identical, bf16 mixed precision keeps fp32 masters,
and a rank whose batches are all text-only neither hangs nor diverges from the others."""

import json
import os

import pytest
import torch
from conftest import flags, write_llava_dataset
from dist import run_distributed

import train
from minillava import distributed as D
from minillava.config import parse_args
from minillava.formats import pretrained_state_dict, run_configs
from minillava.gather import full_tensors


def _build(argv):
    cfg = parse_args(argv)
    info = D.init_distributed()
    model, _ = train.build_model(cfg, info, run_configs(cfg))
    return cfg, info, model


def test_stage1_leaves_llm_and_tower_bit_identical(assets, tmp_path):
    cfg, info, model = _build(flags(assets, str(tmp_path / "o"), stage=1, bf16="False", learning_rate="1e-2"))
    try:
        loader, sampler = train.build_loader(cfg, *_processors(cfg), info, model.num_image_tokens)
        optimizer, scheduler = train.build_optimizer(model, cfg.train, 3)
        stream = train.micro_batch_stream(loader, sampler, 0, info.device)
        before = {n: t.clone() for n, t in full_tensors(model)}
        for _ in range(3):
            train.train_step(model, [next(stream)[1]], optimizer, scheduler, cfg)
        after = dict(full_tensors(model))
        reference = pretrained_state_dict(cfg.model.model_name_or_path, cfg.model.vision_tower)
        for name, value in after.items():
            if name.startswith("mm_projector."):
                assert not torch.equal(value, before[name]), f"{name} did not train"
            else:
                assert torch.equal(value, reference[name].to(value.dtype)), f"{name} changed in stage 1"
    finally:
        D.cleanup(info)


def _processors(cfg):
    from minillava.data import load_image_processor, load_tokenizer

    return load_tokenizer(cfg.model.model_name_or_path, cfg.train.model_max_length), load_image_processor(
        cfg.model.vision_tower
    )


def test_bf16_keeps_fp32_masters_and_trains(assets, tmp_path):
    cfg, info, model = _build(flags(assets, str(tmp_path / "o"), stage=2, bf16="True"))
    try:
        trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
        assert trainable and set(trainable.values()) == {torch.float32}  # fp32 master weights for the optimizer
        assert frozen and set(frozen.values()) == {torch.bfloat16}  # the frozen tower needs no master copy
        loader, sampler = train.build_loader(cfg, *_processors(cfg), info, model.num_image_tokens)
        optimizer, scheduler = train.build_optimizer(model, cfg.train, 2)
        stream = train.micro_batch_stream(loader, sampler, 0, info.device)
        for _ in range(2):
            m = train.train_step(model, [next(stream)[1]], optimizer, scheduler, cfg)
            assert 0 < m["loss"] < 20 and m["grad_norm"] > 0
    finally:
        D.cleanup(info)


@pytest.mark.dist
def _main(rank, world, argv):
    train.main(argv)


def test_text_only_rank_does_not_hang(assets, tmp_path):
    """One image sample and one text-only sample, one per rank: the text-only rank still runs the tower and the
    projector on its zero image, so both ranks issue the same all-gathers and reduce-scatters. A collective waiting
    more than 120 s fails the run (a hang fails the test instead of blocking the suite)."""
    data, images = write_llava_dataset(str(tmp_path / "d"), n_image=1, n_text=1)
    out = str(tmp_path / "o")
    argv = flags(assets, out, stage=2, per_device_train_batch_size=1, max_steps=4)
    argv[argv.index("--data_path") + 1] = data
    argv[argv.index("--image_folder") + 1] = images
    run_distributed(_main, tmp_path, argv, timeout_s=120)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(0 < r["loss"] < 20 for r in rows)


def test_stage1_keeps_the_frozen_llm_and_tower_whole(assets, tmp_path):
    """Stage 1 shards only the projector: the frozen LLM and tower are plain, whole tensors on every rank (no
    all-gather of frozen weights per step); stage 2 shards every decoder layer and the root, and keeps the frozen
    tower whole too (it was sharded before: all-gathered twice a step for no gradient)."""
    from torch.distributed.tensor import DTensor

    for stage, sharded in ((1, {"mm_projector"}), (2, {"mm_projector", "llm"})):
        _, info, model = _build(flags(assets, str(tmp_path / f"o{stage}"), stage=stage))
        try:
            kinds = {n.split(".")[0] for n, p in model.named_parameters() if isinstance(p, DTensor)}
            assert kinds == sharded, stage
        finally:
            D.cleanup(info)


class AllGatherCount:
    """Counts FSDP2's all-gathers (dist.all_gather_into_tensor, or all_gather_single in later torch; the outer call
    only) made on this rank while active."""

    NAMES = ("all_gather_into_tensor", "all_gather_single")

    def __init__(self) -> None:
        self.count, self._depth, self._originals = 0, 0, {}

    def _wrap(self, fn):
        def wrapper(*args, **kwargs):
            self.count += self._depth == 0
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return wrapper

    def __enter__(self):
        import torch.distributed as dist

        for name in self.NAMES:
            if hasattr(dist, name):
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(self._originals[name]))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self._originals.items():
            setattr(dist, name, fn)


def _count_all_gathers(rank, world, argv, out_dir):
    from conftest import trainer_parts

    cfg = parse_args(argv)
    info = D.init_distributed()
    model, optimizer, scheduler, stream = trainer_parts(cfg, info, 3)
    counts = []
    for _ in range(2):  # the first step includes FSDP2's lazy initialisation
        with AllGatherCount() as counter:
            train.train_step(model, [next(stream)[1]], optimizer, scheduler, cfg)
        counts.append(counter.count)
    with open(os.path.join(out_dir, f"gathers_{rank}.json"), "w") as f:
        json.dump(counts, f)


@pytest.mark.dist
@pytest.mark.parametrize("reshard", [True, False])
def test_all_gathers_per_step_skip_the_frozen_tower(assets, tmp_path, reshard):
    """Stage 2 on 2 ranks: each step all-gathers every decoder layer in forward (and again in backward when
    --reshard_after_forward True, zero3.json) plus the root (embeddings, norm, lm_head, projector) once; the frozen
    vision tower is kept whole on every rank, so it is never gathered (it was gathered in forward and again by
    backward prefetch, for no gradient)."""
    layers = 2  # conftest.tiny_llama_config
    argv = flags(assets, str(tmp_path / "o"), stage=2, reshard_after_forward=reshard)
    run_distributed(_count_all_gathers, tmp_path, argv, str(tmp_path))
    expected = (2 if reshard else 1) * layers + 1
    for rank in (0, 1):
        with open(tmp_path / f"gathers_{rank}.json") as f:
            assert json.load(f) == [expected, expected], rank
