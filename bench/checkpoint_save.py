"""How long a mid-run checkpoint stops training, ours (async DCP) beside blocking dcp.save (CPU, 2 gloo ranks):

    python bench/checkpoint_save.py [--gb 3.6] [--repeats 3] [--out bench_out/checkpoint_save]

The state is a stage-2-like trainable state of --gb GB in all: fp32 weights of Linear(4096, 4096) layers, each
layer FSDP2-sharded over the 2 ranks, plus AdamW's two moments (12 bytes per parameter), made by one real step.
First, as train.py does after step 1, the background Checkpointer allocates the stager's host buffers (once per
run; reported on its own). Then each repeat, in this order, on every rank (the slowest rank's figure; medians over
the repeats after a warm-up one):
  blocking dcp.save       minillava.checkpoint.Checkpointer with --async_save False (what a save cost before):
                          training stops for the whole save, COMPLETE and rename included
  async: step blocked     Checkpointer.save with --async_save True (the default) until it returns: the copy of
                          the state into the stager's host buffers and the small files; then the write runs in
                          DCP's thread
  async: until published  from save() until wait() returns: the checkpoint is complete and renamed
  reference: host copy    copy_ of every local tensor into preallocated host buffers, the floor of any staging
                          (on a GPU this is the device-to-host copy)
  reference: torch.save   torch.save of each rank's local tensors + fsync, as the issue measured it
Prints one JSON line per measurement and a markdown table (BENCHMARKS.md, "Host memory and I/O")."""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillava import distributed as D
from minillava.checkpoint import Checkpointer
from minillava.config import parse_args

WIDTH = 4096


def build_state(gb: float):
    """An FSDP2-sharded stack of Linear layers and an AdamW with state for every parameter: --gb GB in all."""
    layers = max(1, round(gb * 1e9 / (12 * WIDTH * WIDTH)))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(1, WIDTH)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler, layers


def checkpointer(model, optimizer, scheduler, out: str, background: bool) -> Checkpointer:
    unused = ("model_name_or_path", "vision_tower", "data_path", "image_folder")  # required flags, never read here
    paths = [x for flag in unused for x in (f"--{flag}", "-")]
    flags = ["--stage", "2", *paths, "--output_dir", out, "--save_steps", "2", "--save_total_limit", "1",
             "--async_save", str(background)]  # fmt: skip
    sampler = SimpleNamespace(steps_per_epoch=1000)
    return Checkpointer(parse_args(flags), model, optimizer, scheduler, sampler, 1000, torch.bfloat16)


def local_tensors(model, optimizer) -> list[torch.Tensor]:
    out = [p.to_local() for p in model.parameters()]
    for state in optimizer.state.values():
        out += [v.to_local() if hasattr(v, "to_local") else v for v in state.values() if torch.is_tensor(v)]
    return out


def slowest(seconds: float) -> float:
    return D.all_reduce([seconds], op="max")[0]


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - t0)


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    info = D.init_distributed(background=True)
    model, optimizer, scheduler, layers = build_state(args.gb)
    tensors = local_tensors(model, optimizer)
    local_bytes = sum(t.nbytes for t in tensors)
    total_gb = D.all_reduce([local_bytes])[0] / 1e9
    blocking = checkpointer(model, optimizer, scheduler, os.path.join(args.out, "blocking"), background=False)
    background = checkpointer(model, optimizer, scheduler, os.path.join(args.out, "async"), background=True)
    buffers = [torch.empty_like(t) for t in tensors]
    rows: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds)

    # As train.py after step 1: the stager's host buffers are allocated (and pinned on CUDA) once per run, here.
    record("async: host buffers allocated (once per run, after step 1)", timed(lambda: background.save_if_due(1)))
    for r in range(args.repeats + 1):  # repeat 0: a warm-up (first writes of each file), not reported
        step = 2 * (r + 1)  # a step every save is due at (--save_steps 2), so save_if_due saves
        record("blocking dcp.save", timed(lambda step=step: blocking.save_if_due(step)))
        t0 = time.perf_counter()
        background.save_if_due(step)
        record("async: step blocked", slowest(time.perf_counter() - t0))
        background.wait()
        record("async: until published", slowest(time.perf_counter() - t0))
        record("reference: host copy", timed(lambda: [b.copy_(t) for b, t in zip(buffers, tensors, strict=True)]))
        path = os.path.join(args.out, "torch_save", f"rank{rank}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)

        def torch_save(path=path) -> None:
            with open(path, "wb") as f:
                torch.save(tensors, f)
                f.flush()
                os.fsync(f.fileno())

        record("reference: torch.save + fsync", timed(torch_save))
        os.remove(path)
    background.close()
    if rank == 0:
        table = []
        for name, values in rows.items():
            values = values[1:] if len(values) > args.repeats else values  # repeat 0 is a warm-up
            row = {"measurement": name, "seconds": round(statistics.median(values), 3),
                   "repeats": [round(v, 3) for v in values], "state_gb": round(total_gb, 2), "ranks": 2,
                   "layers": layers}  # fmt: skip
            print(json.dumps(row), flush=True)
            table.append(row)
        ref = next(r["seconds"] for r in table if r["measurement"] == "blocking dcp.save")
        print(f"\n| {total_gb:.1f} GB state, 2 ranks | seconds | vs blocking dcp.save |\n|---|---|---|")
        for row in table:
            print(f"| {row['measurement']} | {row['seconds']:.2f} | {row['seconds'] / ref:.2f}x |")
    D.cleanup(info)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.6, help="trainable state in GB over both ranks (weights + AdamW)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_out/checkpoint_save")
    args = ap.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    mp.spawn(worker, args=(args, D._free_port()), nprocs=2, join=True)
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
