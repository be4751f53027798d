"""Host-device synchronisations inside train_step, counted on the CPU: every `.item()`, `.tolist()`, `.cpu()`,
`.numpy()`, `bool/int/float` of a tensor, `nonzero` and boolean-mask indexing that the step (model, loss, FSDP2,
clipping, logging) performs; torch.optim's own step counters are not counted. On a GPU each one stalls the launch
queue. The batch layout is finished on the host (minillava/layout.py), so a step reads the device twice whatever
the accumulation: the gradient norm and the logging reduction."""

import sys

import pytest
import torch
from conftest import flags, trainer_parts
from torch.overrides import TorchFunctionMode

import train
from minillava import distributed as D
from minillava.config import parse_args

READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
    torch.Tensor.any, torch.Tensor.all, torch.masked_select,
}  # fmt: skip


def _is_bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        reads = func in READS and not (func in (torch.Tensor.any, torch.Tensor.all) and isinstance(out, torch.Tensor))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _is_bool_index(args[1]):
            reads = True
        if reads and not self._in_optimizer():
            frame = sys._getframe(1)
            self.where.append(f"{func.__name__} at {frame.f_code.co_filename}:{frame.f_lineno}")
        return out

    @staticmethod
    def _in_optimizer() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if "/torch/optim/" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False


def _count(argv: list[str], steps: int = 2) -> list[int]:
    cfg = parse_args(argv)
    info = D.init_distributed()
    try:
        model, optimizer, scheduler, stream = trainer_parts(cfg, info, steps + 1)
        counts = []
        for _ in range(steps):
            micro = [next(stream)[1] for _ in range(cfg.train.gradient_accumulation_steps)]
            counter = SyncCounter()
            with counter:
                train.train_step(model, micro, optimizer, scheduler, cfg)
            counts.append(counter.where)
        return counts
    finally:
        D.cleanup(info)


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize(("ga", "reduction", "clip"), [(1, "llava", 0), (3, "global_token", 1.0)])
def test_train_step_reads_the_device_twice(assets, tmp_path, padding_free, ga, reduction, clip):
    argv = flags(
        assets, str(tmp_path / "o"), stage=2, padding_free=padding_free, gradient_accumulation_steps=ga,
        loss_reduction=reduction, max_grad_norm=clip, gradient_checkpointing=True,
    )  # fmt: skip
    for where in _count(argv):
        assert len(where) <= 2, where
