"""The CUDA path, checked where CI can run it. On CUDA the process group is pure NCCL, which reduces CUDA tensors
only, so a tensor built without a device (it lands on the CPU) crashes the first collective it reaches, and a CPU
tensor mixed into a CUDA op crashes the op. Two audits run over a whole train.main (stage 2, accumulation, global
token normalisation, clipping, packing, a mid-run checkpoint and the final save) on 1 rank and on 2 gloo ranks:

- every tensor handed to a torch.distributed collective is on the device its group's backend serves: the run's
  compute device for the default group (CPU here; the same test on a GPU machine checks CUDA), the CPU for the gloo
  group of background checkpoint writes;
- the device-side code (train.py and the model, attention, loss, metrics and distributed modules) creates no tensor
  without naming its device and never asks for a non_blocking copy from pageable memory. The host-side code (the
  dataset and collator, which build CPU batches by design) is not audited.

The first audit can only see a CPU tensor on a GPU run; the second sees its cause on the CPU too: it flags the
`torch.tensor(values, device=None)` that crashed every CUDA run at its first step."""

import functools
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from conftest import flags
from dist import run_distributed
from torch.overrides import TorchFunctionMode

import train
from minillava import distributed as D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_SIDE = {os.path.join(REPO, "train.py")} | {
    os.path.join(REPO, "minillava", f"{m}.py") for m in ("model", "attention", "loss", "metrics", "distributed")
}
FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.eye,
    torch.rand, torch.randn, torch.randint, torch.linspace,
}  # fmt: skip
COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single", "gather", "scatter",
)  # fmt: skip


class DeviceAudit(TorchFunctionMode):
    """Records factory calls without a device, and non_blocking copies from pageable memory, made from `files`."""

    def __init__(self, files: set[str] = DEVICE_SIDE) -> None:
        super().__init__()
        self.files = files
        self.problems: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            self._flag(f"{func.__name__}() without a device")
        elif func is torch.Tensor.to and kwargs.get("non_blocking") and not args[0].is_pinned():
            self._flag("non_blocking copy from pageable memory")
        return func(*args, **kwargs)

    def _flag(self, what: str) -> None:
        # Only direct calls count: sys._getframe(2) is who called the op (these ops are C functions, so no torch
        # frame sits between). Modules built inside torch.nn (nn.Linear's empty()) follow the default device or the
        # meta context by design and are not flagged.
        frame = sys._getframe(2)
        if frame.f_code.co_filename in self.files:
            self.problems.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}: {what}")


def test_the_audit_flags_what_crashes_on_cuda():
    audit = DeviceAudit({__file__})
    with audit:
        torch.tensor([1.0], dtype=torch.float64, device=None)  # the all_reduce that crashed every CUDA run
        torch.zeros(2, device="cpu")  # fine: a device is named
        torch.ones(2, device="cpu").to("cpu", non_blocking=True)  # pageable source
    assert [p.split(": ", 1)[1] for p in audit.problems] == [
        "tensor() without a device",
        "non_blocking copy from pageable memory",
    ]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for x in obj:
            yield from _tensors(x)


def collective_problems(name: str, args: tuple, kwargs: dict, compute: torch.device) -> list[str]:
    """What is wrong with the tensors of one collective call: each must be on the device its group's backend serves,
    CPU for a gloo group (the background checkpoint group, D.background_group, always; the default group on a CPU
    run), the run's compute device otherwise (NCCL)."""
    group = kwargs.get("group") or next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
    served = torch.device("cpu") if "gloo" in str(dist.get_backend(group)) else compute
    return [f"dist.{name} got a tensor on {t.device}, its group's backend serves {served}"
            for t in _tensors([*args, *kwargs.values()]) if t.device != served]  # fmt: skip


def test_a_gloo_group_is_served_on_the_cpu_whatever_the_run_computes_on():
    """On a CUDA run the default group is NCCL (CUDA tensors) while the background checkpoint group is gloo (CPU
    tensors, by design): the audit expects each group's own device, not the compute device everywhere."""
    cuda, cpu = torch.device("cuda", 0), torch.zeros(1, device="cpu")
    info = D.init_distributed(background=True)
    try:
        assert collective_problems("all_reduce", (cpu,), {"group": D.background_group()}, cuda) == []
        nccl = lambda group=None: "nccl" if group is None else dist.Backend.GLOO  # noqa: E731
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dist, "get_backend", nccl)
            assert collective_problems("all_reduce", (cpu,), {}, cuda) == [
                "dist.all_reduce got a tensor on cpu, its group's backend serves cuda:0"
            ]
            assert collective_problems("broadcast", (cpu, 0, D.background_group()), {}, cuda) == []
    finally:
        D.cleanup(info)


def audited_main(argv: list[str]) -> list[str]:
    """train.main(argv) with both audits on; returns every problem found (empty when the CUDA path is sound)."""
    compute = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    problems, originals = [], {}

    def checked(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            problems.extend(collective_problems(name, args, kwargs, compute))
            return fn(*args, **kwargs)

        return wrapper

    for name in COLLECTIVES:  # FSDP2 calls dist.<name>; object collectives call c10d's module-level functions
        for mod in (dist, c10d):
            if hasattr(mod, name):
                originals[mod, name] = getattr(mod, name)
                setattr(mod, name, checked(name, originals[mod, name]))
    audit = DeviceAudit()
    try:
        with audit:
            train.main(argv)
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)
    return problems + audit.problems


def _argv(assets, out):
    return flags(
        assets, out, stage=2, gradient_accumulation_steps=2, loss_reduction="global_token", max_grad_norm=0.5,
        padding_free=True, save_steps=1, max_steps=2,
    )  # fmt: skip


def test_one_rank_collectives_and_tensors_on_the_compute_device(assets, tmp_path):
    out = str(tmp_path / "o")
    assert audited_main(_argv(assets, out)) == []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]  # the audited run did train


def _dist_audit(rank, world, argv, out_dir):
    with open(os.path.join(out_dir, f"problems_{rank}.json"), "w") as f:
        json.dump(audited_main(argv), f)


@pytest.mark.dist
def test_two_ranks_collectives_and_tensors_on_the_compute_device(assets, tmp_path):
    run_distributed(_dist_audit, tmp_path, _argv(assets, str(tmp_path / "o")), str(tmp_path))
    for rank in (0, 1):
        with open(tmp_path / f"problems_{rank}.json") as f:
            assert json.load(f) == [], f"rank {rank}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_run_collectives_and_tensors_on_the_gpu(assets, tmp_path):
    """The same audits on a real NCCL run, in bf16 (fp32 masters and reductions) with the varlen kernel."""
    argv = [*_argv(assets, str(tmp_path / "o")), "--bf16", "True"]
    assert audited_main(argv) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_copies_ahead_and_yields_the_host_batches(assets, tmp_path):
    """micro_batch_stream on CUDA copies each batch on a side stream one batch ahead: the batches it yields equal
    the CPU stream's, in the same order."""
    from minillava.config import parse_args
    from minillava.data import load_image_processor, load_tokenizer

    cfg = parse_args(_argv(assets, str(tmp_path / "o")))
    info = D.init_distributed()
    try:
        tok, proc = load_tokenizer(cfg.model.model_name_or_path, 64), load_image_processor(cfg.model.vision_tower)
        streams = []
        for device in (torch.device("cpu"), info.device):
            loader, sampler = train.build_loader(cfg, tok, proc, info, 4)
            stream = train.micro_batch_stream(loader, sampler, 0, device)
            streams.append([next(stream)[1] for _ in range(5)])
        for host, dev in zip(*streams, strict=True):
            assert all(torch.equal(host[k], dev[k].cpu()) for k in host if isinstance(host[k], torch.Tensor))
    finally:
        D.cleanup(info)
