"""Everything torch.distributed: process group setup, FSDP2 wrapping, activation checkpointing, weight loading from
rank 0, and the few collectives the loop needs. Model code stays plain nn.Module; parallelism is applied from here."""

import datetime
import functools
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # False when a caller (a test harness) created the process group and will destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(background: bool = False) -> DistInfo:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU). A plain `python train.py` becomes a 1-rank group,
    so single-process runs take exactly the same FSDP2 code path as 8-GPU runs. background: also make
    background_group() now, while torchrun's store is up (a save on preemption may come after the agent died)."""
    owns = not dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if owns:
        kw = dict(timeout=datetime.timedelta(minutes=30), device_id=device if device.type == "cuda" else None)
        if "RANK" not in os.environ:  # not under torchrun: a private 1-rank group; os.environ is left untouched
            kw.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kw)
    if background:
        background_group()
    control_group()  # made now, by every rank together (it is the default group on gloo and at 1 rank)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, owns)


_BACKGROUND: list = []  # background_group()'s group, made once


def background_group() -> dist.ProcessGroup:
    """A gloo group over every rank for the collectives of a background thread (DCP's async checkpoint writes),
    which must not interleave with the step's on the default group. Collective the first time (every rank calls it)."""
    if not _BACKGROUND:
        _BACKGROUND.append(dist.new_group(backend="gloo"))
    return _BACKGROUND[0]


_CONTROL: list = []  # control_group()'s group, made once


def control_group() -> dist.ProcessGroup | None:
    """The group any_rank's host flags travel on: the default group where it is gloo (CPU runs) or 1 rank, else
    (NCCL) a gloo group of its own, made once (collective the first time: init_distributed makes it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or "gloo" in str(dist.get_backend()):
        return None
    if not _CONTROL:
        _CONTROL.append(dist.new_group(backend="gloo"))
    return _CONTROL[0]


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank: one int all-reduced on the host (control_group, gloo), so the device is
    never waited for. The loop asks it before each step's collectives, which a rank that cannot run the step (its
    data failed) would otherwise leave every other rank waiting in."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device="cpu")  # gloo's
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return bool(t.item())


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if we created it (and background_group's and control_group's with it)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        _BACKGROUND.clear()
        _CONTROL.clear()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """The device whose tensors the default group's backend serves: NCCL takes CUDA tensors only (the current
    device, which init_distributed sets to LOCAL_RANK), gloo CPU ones. Every tensor this module hands to a collective
    is made here. We keep one backend per run rather than a "cpu:gloo,cuda:nccl" pair: a second (TCP) mesh per rank
    costs start-up time at scale and would hide a CPU tensor that slipped onto the GPU path. (Async checkpoints
    need a gloo group, background_group(); --async_save False does without it.)"""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_on_device(values: list[float | torch.Tensor], op: str = "sum") -> torch.Tensor:
    """All-reduce a few numbers (Python floats, or 0-dim tensors on the compute device) in one float64 collective
    on collective_device() (op: sum, max or mean); the result stays there. Nothing is read back to the host: floats
    become fill kernels (torch.full), not host-to-device copies."""
    dev = collective_device()

    def scalar(v: float | torch.Tensor) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            return v.to(dev, torch.float64).reshape(())
        return torch.full((), v, dtype=torch.float64, device=dev)

    t = torch.stack([scalar(v) for v in values])
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.get_world_size()
    return t


def all_reduce(values: list[float | torch.Tensor], op: str = "sum") -> list[float]:
    """all_reduce_on_device, read back as Python floats: one host sync (the benchmarks; the loop reads StepRecords)."""
    return all_reduce_on_device(values, op).tolist()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from rank `src` to every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def apply_activation_checkpointing(layers: list[nn.Module]) -> None:
    """Non-reentrant activation checkpointing per decoder layer. We wrap `forward` in place instead of using
    checkpoint_wrapper so parameter names (and thus checkpoint keys) stay LLaVA's. FSDP2's hooks live on __call__,
    which still runs; the recompute calls the raw forward while the layer is unsharded for backward."""
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def device_mesh(device: torch.device, hsdp: bool, local_world_size: int) -> DeviceMesh | None:
    """None (FSDP2's default: one flat mesh over every rank), or for HSDP a 2-D (replicate, shard) mesh: parameters
    sharded over the local_world_size ranks of a node (torchrun's LOCAL_WORLD_SIZE; the planner passes its own),
    replicated across nodes. Gradients are then reduce-scattered inside a node and all-reduced across nodes, so the
    slow inter-node link carries one shard."""
    if not hsdp:
        return None
    world, local = dist.get_world_size(), local_world_size
    if world % local:
        raise ValueError(f"--hsdp: {world} ranks do not split into nodes of LOCAL_WORLD_SIZE={local}")
    return init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))


def compile_blocks(layers: list[nn.Module], backend: str = "inductor") -> None:
    """torch.compile each decoder layer's forward in place (dynamic shapes: packed lengths change every step). Like
    apply_activation_checkpointing it wraps `forward`, so FSDP2's hooks on __call__ stay outside the graph and the
    parameter names stay LLaVA's; call it first, so checkpointing wraps the compiled forward."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True, backend=backend)


def parallelize(model: nn.Module, t, device: torch.device, *, checkpoint_layers: int | None,
                local_world_size: int) -> None:  # fmt: skip
    """The run's layout on its meta model, from the train flags `t`: each decoder layer compiled (--torch_compile),
    the first checkpoint_layers checkpointed (None: all), then FSDP2 (HSDP across nodes of local_world_size ranks
    with --hsdp); reduce-scatters sum instead of average under --loss_reduction global_token."""
    layers = model.decoder_layers()
    if t.torch_compile:  # each block's forward; AC then checkpoints the compiled forward, FSDP2's hooks stay outside
        compile_blocks(layers, t.torch_compile_backend)
    mesh = device_mesh(device, t.hsdp, local_world_size)
    if checkpoint_layers != 0:
        apply_activation_checkpointing(layers[:checkpoint_layers])
    apply_fsdp(model, bf16=t.bf16, reshard_after_forward=t.reshard_after_forward,
               sum_gradients=t.loss_reduction == "global_token", mesh=mesh)  # fmt: skip


def apply_fsdp(
    model: nn.Module, *, bf16: bool, reshard_after_forward: bool, sum_gradients: bool, mesh: DeviceMesh | None = None
) -> None:
    """fully_shard each LLM decoder layer, then the root (embeddings, norm, head, projector). The frozen vision tower
    is never sharded: whole on every rank (0.6 GB in bf16 for CLIP-L), it is never all-gathered (as its own FSDP
    unit it was gathered in forward and again by backward prefetch, for no gradient). With the whole LLM frozen
    (stage 1) only the projector is sharded: the frozen LLM stays whole on every rank too (about 14 GB in bf16 at
    7B, as LLaVA's ZeRO-2 run also kept it), so no step all-gathers frozen weights and only the projector's
    gradients are reduced.

    - bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); sharded params (the master weights the
      optimizer updates) stay in whatever dtype they were built in (fp32 for trainable ones).
    - reshard_after_forward: True = ZeRO-3-like (zero3.json), False = ZeRO-2-like (zero2.json).
    - mesh: device_mesh(...): None for FSDP over every rank, a 2-D mesh for HSDP.
    - sum_gradients: for --loss_reduction global_token the loss is already divided by the global token count, so
      FSDP must sum gradients instead of averaging them over ranks. set_gradient_divide_factor(1.0) alone asks for
      PREMUL_SUM, which gloo lacks; forcing sum reduction makes it a plain SUM on every backend.
    """
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    if not any(p.requires_grad for p in model.llm.parameters()):
        fully_shard(model.mm_projector, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    else:
        for layer in model.decoder_layers():
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        # The root is never resharded after forward: backward needs lm_head first, and embed_tokens' gradient keeps
        # it gathered to the end of backward anyway, so resharding would only add an all-gather per step.
        frozen_tower = set(model.vision_tower.parameters())  # never trained: whole on every rank, never gathered
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, ignored_params=frozen_tower)
    if sum_gradients:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)


def _reinit_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """to_empty() leaves non-persistent buffers (rotary inv_freq, CLIP position_ids) uninitialised, and they are not
    in any state dict. Rebuild each owning module from its config on the CPU and copy those buffers over."""
    for module in model.modules():
        names = [n for n in module._non_persistent_buffers_set if getattr(module, n, None) is not None]
        if not names:
            continue
        if not hasattr(module, "config"):
            raise RuntimeError(f"cannot re-initialise non-persistent buffers {names} of {type(module).__name__}")
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for n in names:
            getattr(module, n).copy_(getattr(fresh, n).to(device))


@torch.no_grad()
def materialize_and_load(model: nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Allocate the sharded (meta-built) model on `device` and fill it from a full state dict that only rank 0 holds.

    Only rank 0 reads the checkpoint files; set_model_state_dict(broadcast_from_rank0=True) streams each tensor to
    the other ranks, which keep just their shard, so 8 ranks never hold 8 full CPU copies of a 7B model."""
    model.to_empty(device=device)
    _reinit_non_persistent_buffers(model, device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full_state if dist.get_rank() == 0 else {}, options=options)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args: object) -> None:
    """print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def clip_grad_norm(model: nn.Module, max_norm: float) -> dict[str, torch.Tensor]:
    """Gradient norms over all ranks' shards (DTensor-aware), as 0-dim tensors left on the device (no host read):
    `grad_norm` of everything and `grad_norm_<child>` of each top-level child with gradients (llm, mm_projector);
    with max_norm > 0 every gradient is scaled by min(1, max_norm / grad_norm), as torch.nn.utils.clip_grad_norm_
    does on an unsharded model. LLaVA v1.5 ran with no clipping (scripts/zero2.json and zero3.json set no
    gradient_clipping), hence off by default.

    get_total_norm over sharded gradients gives a DTensor with a pending (partial) reduction: full_tensor() is the
    all-reduce that makes it global. clip_grads_with_norm_ takes the *parameters* (it reads .grad) and the norm as a
    tensor, so clipping needs no host read either."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            groups.setdefault(name.split(".")[0], []).append(p)
    if not groups:
        return {"grad_norm": torch.zeros((), device=collective_device())}
    norms = [torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0) for params in groups.values()]
    per_child = torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms])
    total = torch.linalg.vector_norm(per_child)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for params in groups.values() for p in params], max_norm, total)
    return {"grad_norm": total, **{f"grad_norm_{child}": n for child, n in zip(groups, per_child, strict=True)}}
