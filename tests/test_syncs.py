"""Host-device synchronisations inside train_step, counted on the CPU: every `.item()`, `.tolist()`, `.cpu()`,
`.numpy()`, `bool/int/float` of a tensor, `nonzero` and boolean-mask indexing that the step (model, loss, FSDP2,
clipping, logging) performs; torch.optim's own step counters are not counted. On a GPU each one stalls the launch
queue. The batch layout is finished on the host (minillava/layout.py), so a step reads the device twice whatever
the accumulation: the gradient norm and the logging reduction."""


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
def test_train_step_reads_the_device_twice(assets, tmp_path, padding_free, ga, reduction, clip):
    argv = flags(
        assets, str(tmp_path / "o"), stage=2, padding_free=padding_free, gradient_accumulation_steps=ga,
        loss_reduction=reduction, max_grad_norm=clip, gradient_checkpointing=True,
    )  # fmt: skip
    for where in _count(argv):
        assert len(where) <= 2, where
