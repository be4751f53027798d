"""Host-device synchronisations of the training loop, counted on the CPU: every `.item()`, `.tolist()`, `.cpu()`,
`.numpy()`, `bool/int/float` of a tensor, `nonzero` and boolean-mask indexing that a step (model, loss, FSDP2,
clipping, the optimizer, the scheduler, logging) performs; torch.optim's own step counters are not counted. On a GPU
each one stalls the launch queue. The batch layout is finished on the host (minillava/layout.py) and the step's
metrics stay on the device (train.StepRecord), so train_step reads nothing, and the loop reads one window of steps
at once, on the steps that log, save or end the run: none on the others."""


import json
import os
import sys

import pytest
from conftest import flags, trainer_parts

import train
from bench.counts import HostReads
from minillava import distributed as D
from minillava.config import parse_args


def _count(argv: list[str], steps: int = 2) -> list[int]:
    cfg = parse_args(argv)
    info = D.init_distributed()
    try:
        model, optimizer, scheduler, stream = trainer_parts(cfg, info, steps + 1)
        counts = []
        for _ in range(steps):
            micro = [next(stream)[1] for _ in range(cfg.train.gradient_accumulation_steps)]
            counter = HostReads()
            with counter:
                train.train_step(model, micro, optimizer, scheduler, cfg)
            counts.append(counter.where)
        return counts
    finally:
        D.cleanup(info)


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize(("ga", "reduction", "clip"), [(1, "llava", 0), (3, "global_token", 1.0)])
def test_train_step_reads_nothing_from_the_device(assets, tmp_path, padding_free, ga, reduction, clip):
    argv = flags(
        assets, str(tmp_path / "o"), stage=2, padding_free=padding_free, gradient_accumulation_steps=ga,
        loss_reduction=reduction, max_grad_norm=clip, gradient_checkpointing=True,
    )  # fmt: skip
    for where in _count(argv):
        assert where == []


class LoopReads(HostReads):
    """HostReads from the loop's first train_step to the final save, outside the host-side data pipeline (the
    collator's layout reads CPU tensors by design: with --dataloader_num_workers 0 it runs in this thread)."""

    HOST_SIDE = (os.path.join("minillava", "layout.py"), os.path.join("minillava", "data.py"), "/torch/utils/data/")

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        before = len(self.where)
        out = super().__torch_function__(func, types, args, kwargs)
        if len(self.where) > before and (not self.on or self._host_side()):
            del self.where[before:]
        return out

    def _host_side(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if any(part in frame.f_code.co_filename for part in self.HOST_SIDE):
                return True
            frame = frame.f_back
        return False


@pytest.mark.parametrize(("logging_steps", "reads"), [(1, 6), (3, 3)])
def test_the_loop_reads_the_device_once_per_logging_step(assets, tmp_path, monkeypatch, logging_steps, reads):
    """6 steps, with clipping and accumulation: one read (a .tolist of the window's records) on each step that logs
    (the first, every --logging_steps-th, the last), none on the others; and the logged records are complete."""
    counter = LoopReads()
    step, final = train.train_step, train.save_final

    def counted_step(*args, **kwargs):
        counter.on = True
        return step(*args, **kwargs)

    def uncounted_final(*args, **kwargs):
        counter.on = False
        return final(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", counted_step)
    monkeypatch.setattr(train, "save_final", uncounted_final)
    out = str(tmp_path / "o")
    argv = flags(assets, out, stage=2, max_steps=6, logging_steps=logging_steps, gradient_accumulation_steps=2,
                 max_grad_norm=1.0, loss_reduction="global_token")  # fmt: skip
    with counter:
        train.main(argv)
    assert len(counter.where) == reads and all(w.startswith("tolist at ") for w in counter.where), counter.where
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == ([1, 2, 3, 4, 5, 6] if logging_steps == 1 else [1, 3, 6])
    assert all(r["grad_norm"] > 0 and r["label_tokens"] > 0 and r["step_time"] > 0 for r in rows)
