"""Will it fit? Trace one real training step on fake tensors and report the memory a rank needs, before booking
a cluster:

    python -m minillava.plan --stage 2 [the train.py flags] --nproc_per_node 8 [--nnodes 8] [--gpu_memory_gb 80]

It reads the config files only (a folder holding just config.json for the LLM and one for the tower will do; no
weight is read), builds the model exactly as train.py does (minillava/step.py sharded_model: the stage's freezing,
bf16 frozen weights, the checkpointing choice, FSDP2 or HSDP over nproc_per_node x nnodes ranks, here a fake
process group), gives it fake parameters (FakeTensorMode: shapes and dtypes, no storage), and runs one real
train_step on the largest micro-batch the sampler can produce, counted by torch's MemTracker. The trace runs on a
fake "cpu" device with the choices the code makes on CUDA forced (the varlen flash kernel, fused AdamW), in the
steady state (AdamW's moments exist, as from the second step on). Beside it, the analytic estimate train.py uses
at start-up (minillava/memory.py) for the same config, and the throughput the FLOP model expects at a given MFU.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore

from minillava import attention
from minillava import distributed as D
from minillava.cli import run_tool
from minillava.config import Config, parse_args
from minillava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from minillava.data import load_records, load_tokenizer, longest_samples
from minillava.formats.hub import local_folder
from minillava.formats.run import run_configs
from minillava.layout import Batch, lay_out
from minillava.memory import BUDGET, micro_batch_tokens
from minillava.metrics import PEAK_BF16_FLOPS
from minillava.model import image_tokens
from minillava.optim import build_optimizer
from minillava.step import sharded_model, train_step

GIB = 2**30


@dataclass(frozen=True)
class Plan:
    """One rank's memory for a config, traced and estimated (GiB), and what it means."""

    world: int
    shard_group: int  # ranks each sharded parameter is split over
    micro_batch: list[int]  # the LLM lengths of the traced micro-batch's samples
    tokens: int  # LLM positions the micro-batch's layout holds (padded: batch x longest; packed: their sum)
    lengths_from: str
    checkpointed_layers: int
    total_layers: int
    parameters_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    temporaries_gib: float
    traced_peak_gib: float
    estimate_gib: float
    gpu_memory_gib: float
    budget_gib: float
    fits: bool
    mfu: float
    tokens_per_s: float  # across every rank, at `mfu`
    samples_per_s: float
    trace_seconds: float


class _Tracker(MemTracker):
    """torch's MemTracker, adapted to the trace: frozen parameters (it would hook their gradients, and
    register_hook raises on them); only the global peak kept (its per-module bookkeeping, a pass over every module
    per op, makes a 7B trace take minutes instead of seconds); and nothing counted while DTensor propagates shardings
    (it runs each op once more on global-shape fake tensors, in the active fake mode: ours, so MemTracker would count
    full-size temporaries that never exist, e.g. every gradient unsharded at the gradient norm)."""

    class _NoHook:
        def remove(self) -> None:
            pass

    def __init__(self) -> None:
        super().__init__()
        self.paused = 0

    @contextlib.contextmanager
    def tracing(self):
        """Track inside this block, paused in ShardingPropagator's fake run of each op (torch 2.10-2.13 all run it
        in _propagate_tensor_meta_non_cached)."""
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        propagate = ShardingPropagator._propagate_tensor_meta_non_cached

        def paused(propagator, *args, **kwargs):
            self.paused += 1
            try:
                return propagate(propagator, *args, **kwargs)
            finally:
                self.paused -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = paused
        try:
            with self:
                yield self
        finally:
            ShardingPropagator._propagate_tensor_meta_non_cached = propagate

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        for p in module.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles.setdefault(p, (self._NoHook(), self._NoHook()))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _track(self, reftype, t) -> None:
        if not self.paused:
            super()._track(reftype, t)

    def _update_peak_stats(self, peak_state) -> None:
        if self.paused:
            return
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], dict(snap)

    def peak(self) -> dict[str, int]:
        snap = next(iter(self._peak_mem_snap.values()), {})
        return {str(getattr(k, "value", k)): v for k, v in snap.items()}


@contextlib.contextmanager
def fake_world(world: int):
    """A fake process group of `world` ranks, this process being rank 0: collectives return at once."""
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield D.DistInfo(0, 0, dist.get_world_size(), torch.device("cpu"), owns)
    finally:
        if owns:
            dist.destroy_process_group()


def synthetic_batch(lengths: list[int], image_tokens: int, max_len: int, padding_free: bool) -> Batch:
    """A micro-batch of samples with these LLM lengths, laid out by the trainer's own lay_out: one image each
    (when it fits), every text token a label (the most the loss can hold)."""
    ids, labels = [], []
    for n in lengths:
        with_image = n > image_tokens
        text = n - image_tokens + 1 if with_image else n
        x = torch.full((text,), 7, dtype=torch.long)
        if with_image:
            x[1] = IMAGE_TOKEN_INDEX
        y = x.clone()
        y[: 2 if with_image else 1] = IGNORE_INDEX
        ids.append(x)
        labels.append(y)
    width = max(map(len, ids))
    pad = lambda xs, v: torch.stack([torch.cat([x, x.new_full((width - len(x),), v)]) for x in xs])  # noqa: E731
    raw = {"input_ids": pad(ids, 0), "labels": pad(labels, IGNORE_INDEX),
           "attention_mask": pad([torch.ones(len(x), dtype=torch.bool) for x in ids], False),
           "pixel_values": torch.zeros(len(lengths), 3, 1, 1)}  # fmt: skip  (one image slot each; sized in trace)
    return lay_out(raw, image_tokens=image_tokens, max_len=max_len, padding_free=padding_free)


def micro_batch_lengths(cfg: Config, n_image_tokens: int) -> tuple[list[int], str]:
    """The LLM lengths of the largest micro-batch: from --data_path's longest samples when it is given, else every
    sample at model_max_length."""
    t, d = cfg.train, cfg.data
    B, max_len = t.per_device_train_batch_size, t.model_max_length
    if d.data_path is None or not os.path.isfile(d.data_path):
        return [max_len] * B, "every sample at --model_max_length (no --data_path file)"
    try:
        tokenizer = load_tokenizer(local_folder(cfg.model.model_name_or_path, "--model_name_or_path"), max_len)
    except (OSError, ValueError):
        tokenizer = None
    lengths = longest_samples(load_records(d.data_path), B, tokenizer=tokenizer, version=cfg.model.version,
                              image_tokens=n_image_tokens, max_len=max_len)  # fmt: skip
    how = "tokenized" if tokenizer is not None else "estimated from word counts (no tokenizer in the LLM folder)"
    return lengths, f"the {len(lengths)} longest samples of {d.data_path}, {how}"


def _fake_batch(batch: Batch, fake, size: int) -> Batch:
    """The host batch as fake tensors (call inside `fake`), with pixel values of the tower's image size."""
    return replace(batch._map(fake.from_tensor), pixel_values=torch.empty(batch.pixel_values.shape[0], 3, size, size))


def trace(cfg: Config, configs: tuple, *, nnodes: int, nproc_per_node: int, gpu_memory_gib: float,
          lengths: list[int] | None = None, lengths_from: str = "", mfu: float = 0.4,
          peak_tflops: float = PEAK_BF16_FLOPS["H100"] / 1e12) -> Plan:  # fmt: skip
    """Lay the model out on a fake world of nnodes x nproc_per_node ranks and trace one train_step (see above)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    t, vision_config = cfg.train, configs[1]
    n_img = image_tokens(vision_config, cfg.model.mm_vision_select_feature)
    if lengths is None:
        lengths, lengths_from = micro_batch_lengths(cfg, n_img)
    tokens = micro_batch_tokens(lengths, t.padding_free)
    device_bytes = int(gpu_memory_gib * GIB)
    world = nnodes * nproc_per_node
    batch = synthetic_batch(lengths, n_img, t.model_max_length, t.padding_free)
    with fake_world(world) as info, contextlib.redirect_stdout(io.StringIO()), attention.as_on_cuda(), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The module hierarchy tracking")  # MemTracker's
        model, flops, plan = sharded_model(cfg, info, configs, lengths=lengths, device_bytes=device_bytes,
                                           local_world_size=nproc_per_node)  # fmt: skip
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake:
            model.to_empty(device=torch.device("cpu"))
            optimizer, scheduler = build_optimizer(model, t, total_steps=1000, fused=True)
            for p in model.parameters():  # the steady state: AdamW's moments made by a step on zero gradients
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            fake_batch = _fake_batch(batch, fake, vision_config.image_size)
            tracker = _Tracker()
            tracker.track_external(model, optimizer)
            with tracker.tracing():
                train_step(model, [fake_batch], optimizer, scheduler, cfg)
        local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
        params = sum(local(p).nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
        grads = sum(local(p).numel() * local(p).element_size() for p in model.parameters() if p.requires_grad)
        opt = sum(local(v).nbytes for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        peak = tracker.peak()
    total = peak.get("Total", 0)
    activations = peak.get("Activation", 0)
    sample_flops = sum(map(flops.sample_flops, lengths))
    step_s = sample_flops / (mfu * peak_tflops * 1e12)  # one micro-batch on one rank
    return Plan(
        world=world, shard_group=plan.shard_group, micro_batch=lengths, tokens=tokens, lengths_from=lengths_from,
        checkpointed_layers=plan.layers, total_layers=plan.total_layers,
        parameters_gib=params / GIB, gradients_gib=grads / GIB, optimizer_gib=opt / GIB,
        activations_gib=activations / GIB, temporaries_gib=max(0, total - params - opt - activations) / GIB,
        traced_peak_gib=total / GIB, estimate_gib=plan.estimate_bytes / GIB, gpu_memory_gib=gpu_memory_gib,
        budget_gib=device_bytes * BUDGET / GIB, fits=total <= device_bytes * BUDGET, mfu=mfu,
        tokens_per_s=world * sum(lengths) / step_s, samples_per_s=world * len(lengths) / step_s,
        trace_seconds=time.perf_counter() - t0,
    )  # fmt: skip


def describe(cfg: Config, plan: Plan) -> str:
    """The plan as a short table for the console."""
    t = cfg.train
    layout = f"HSDP, sharded over {plan.shard_group} ranks of a node" if t.hsdp else "FSDP2 over every rank"
    mb = plan.micro_batch
    rows = [("parameters (sharded masters, whole frozen weights, buffers)", plan.parameters_gib),
            ("gradients (sharded, from their reduce-scatter to the optimizer step)", plan.gradients_gib),
            ("optimizer state (AdamW moments)", plan.optimizer_gib),
            ("activations at the peak (saved for backward, gathered weights)", plan.activations_gib),
            ("temporaries at the peak (backward working set, gradients, loss)", plan.temporaries_gib)]  # fmt: skip
    fit = "fits" if plan.fits else "does NOT fit"
    if not plan.fits and plan.traced_peak_gib <= plan.gpu_memory_gib:
        fit = "is at risk (the peak fits, but not with the headroom the allocator and NCCL need)"
    return "\n".join([
        f"stage {t.stage}: {plan.world} ranks, {layout}; bf16 {t.bf16}, padding_free {t.padding_free}",
        f"largest micro-batch: {len(mb)} samples of {min(mb)}{f'-{max(mb)}' * (max(mb) > min(mb))} LLM tokens = "
        f"{plan.tokens:,} positions "
        f"({plan.lengths_from})",
        f"activation checkpointing ({t.gradient_checkpointing}): {plan.checkpointed_layers} of "
        f"{plan.total_layers} decoder layers",
        "per rank, GiB:",
        *(f"  {name:<72}{v:8.2f}" for name, v in rows),
        f"  {'traced peak':<72}{plan.traced_peak_gib:8.2f}",
        f"  {'analytic estimate (memory.py, what train.py plans with)':<72}{plan.estimate_gib:8.2f}",
        f"{fit} in {plan.gpu_memory_gib:g} GiB: a peak of at most {plan.budget_gib:.1f} GiB leaves {1 - BUDGET:.0%} "
        "headroom",
        f"at {plan.mfu:.0%} MFU: {plan.tokens_per_s:,.0f} tokens/s, {plan.samples_per_s:,.1f} samples/s over "
        f"{plan.world} ranks (micro-batches like this one; the FLOP model of minillava/metrics.py)",
        f"(traced in {plan.trace_seconds:.0f} s)",
    ])  # fmt: skip


def parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace, list[str]]:
    """The planner's own flags; the rest are train.py's."""
    p = argparse.ArgumentParser(prog="python -m minillava.plan [train.py flags]", add_help=False)
    p.add_argument("--nproc_per_node", type=int, default=8, help="ranks per node (torchrun's)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (torchrun's)")
    p.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one card, GiB")
    p.add_argument("--mfu", type=float, default=0.4, help="the MFU the throughput figure assumes")
    p.add_argument("--peak_tflops", type=float, default=PEAK_BF16_FLOPS["H100"] / 1e12,
                   help="the card's dense bf16 peak (H100: 989)")  # fmt: skip
    p.add_argument("--sample_length", type=int, default=None,
                   help="plan for samples of this many LLM tokens (e.g. 617 for LLaVA-558K: 576 image + ~40 text) "
                   "instead of --data_path's longest")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-h", "--help", action="store_true", help="this text (train.py --help lists the training flags)")
    return p, *p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args, rest = parse(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(__doc__.strip() + "\n")
        parser.print_help()
        return 0
    try:
        cfg = parse_args(rest)
        if args.nproc_per_node < 1 or args.nnodes < 1:
            raise ValueError("--nproc_per_node and --nnodes must be at least 1")
        configs = run_configs(cfg)
        lengths = how = None
        if args.sample_length is not None:
            n = min(args.sample_length, cfg.train.model_max_length)
            lengths, how = [n] * cfg.train.per_device_train_batch_size, f"every sample {n} tokens (--sample_length)"
        plan = trace(cfg, configs, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, lengths=lengths,
                     lengths_from=how, gpu_memory_gib=args.gpu_memory_gb, mfu=args.mfu,
                     peak_tflops=args.peak_tflops)  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(plan)) if args.json else describe(cfg, plan))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
