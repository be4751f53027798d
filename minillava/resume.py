"""Resuming a run from a checkpoint (checkpoint.py writes them): find the newest usable one (auto) or check the one
named, refuse what the run cannot honour (a changed global batch or dataset, a changed order mid-epoch, changed
trained shapes: naming the flag and its saved value), then load the trainable weights, the optimizer and scheduler
state, the RNG of every rank and the sampler position, so the run continues as if it had never stopped.

Files damaged after COMPLETE (a disk error, a copy cut short) are caught before anything is loaded: rank 0 checks
that the JSON files parse, .metadata reads, every shard is as long as .metadata says and the RNG files load
(checkpoint_problem), and tells the other ranks. `--resume_from_checkpoint auto` then falls back to the previous
complete checkpoint with a warning naming the broken file, and starts fresh if none is usable; an explicit PATH is a
ValueError. Damage these checks cannot see (bytes changed in place) fails in dcp.load, also as a ValueError."""

import json
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from minillava.atomic import (
    MARKER,
    atomic_write,
    complete_checkpoints,
    first_line,
    rank0,
    read_json,
    write_text,
)
from minillava.checkpoint import _RNG, STATE_KEYS, STATE_NAME, TRAINABLE, TRAINABLE_LOAD, Checkpointer
from minillava.config import CONFIG_NAME
from minillava.distributed import broadcast_object, print0
from minillava.formats.manifest import MANIFEST_NAME, manifest_changes


def checkpoint_problem(path: str) -> str | None:
    """What is broken in the complete checkpoint `path`, naming the file, or None. Reads no tensor data."""
    for name, keys in ((STATE_NAME, STATE_KEYS), (CONFIG_NAME, ())):
        file = os.path.join(path, name)
        try:
            content = read_json(file)
        except (OSError, ValueError) as e:  # missing, or torn JSON
            return f"{file} is unreadable ({first_line(e)})"
        if not isinstance(content, dict) or any(k not in content for k in keys):
            return f"{file} lacks some of {list(keys)}"
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # missing, or a torn pickle (any unpickling error)
        return f"{os.path.join(path, '.metadata')} is unreadable ({first_line(e)})"
    needed: dict[str, int] = {}  # shard file -> the end of its last item
    for item in metadata.storage_data.values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        shard = os.path.join(path, name)
        if not os.path.isfile(shard):
            return f"{shard} is missing"
        if os.path.getsize(shard) < size:
            return f"{shard} is truncated ({os.path.getsize(shard)} bytes; .metadata records {size})"
    for name in sorted(filter(_RNG.fullmatch, os.listdir(path))):  # every rank's: they share the filesystem
        file = os.path.join(path, name)
        try:
            torch.load(file, weights_only=True)
        except Exception as e:
            return f"{file} is unreadable ({first_line(e)})"
    return None


def find_checkpoint(spec: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint: None -> None; auto -> the newest usable complete checkpoint (damaged ones are
    skipped with a warning) or None; PATH -> PATH if complete and undamaged, else ValueError."""
    if not spec:
        return None
    if spec == "auto":
        for _, path in reversed(complete_checkpoints(output_dir)):
            if (problem := checkpoint_problem(path)) is None:
                return path
            print(f"warning: --resume_from_checkpoint auto: skipping {path}: {problem}")
        return None
    if not os.path.isfile(os.path.join(spec, MARKER)):
        why = "no such directory" if not os.path.isdir(spec) else f"no {MARKER} marker: its save was interrupted"
        raise ValueError(f"--resume_from_checkpoint {spec}: not a complete checkpoint ({why}); pass another or auto")
    if problem := checkpoint_problem(spec):
        raise ValueError(f"--resume_from_checkpoint {spec}: damaged: {problem}; pass an older checkpoint or auto")
    return spec


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: str, saved: set[str]) -> None:
    """Restore exactly the saved optimizer state: params without a saved entry end with no state (AdamW creates it
    at their first gradient, as in the uninterrupted run) instead of the zero-lr step's placeholder."""
    osd = get_optimizer_state_dict(model, optimizer)  # the fresh optimizer: a placeholder entry for every param
    osd["state"] = {fqn: s for fqn, s in osd["state"].items() if all(f"optimizer.state.{fqn}.{k}" in saved for k in s)}
    dcp.load({"optimizer": osd}, checkpoint_id=path)
    # load_state_dict replaces the whole state, so the placeholders of params missing from osd are dropped.
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(strict=False))


def resume(ckpt: Checkpointer) -> int:
    """Restore --resume_from_checkpoint (auto | PATH), if given, into the Checkpointer's model, optimizer, scheduler
    and sampler (collective); returns the step to continue from (0: fresh)."""
    t = ckpt.cfg.train
    found = None
    if rank0():  # rank 0 looks, every rank gets the answer (or the error: no rank may wait for the others)
        try:
            found = (find_checkpoint(t.resume_from_checkpoint, t.output_dir), None)
        except ValueError as e:
            found = (None, str(e))
    path, error = broadcast_object(found)
    if error:
        raise ValueError(error)
    if path is None:
        if t.resume_from_checkpoint:
            print0(f"--resume_from_checkpoint auto: no usable checkpoint in {t.output_dir}; starting fresh")
        return 0
    state = read_json(os.path.join(path, STATE_NAME))
    _check_shape(ckpt.shape, state["run"], path)
    saved_config = read_json(os.path.join(path, CONFIG_NAME))
    _check_flags(ckpt.cfg, ckpt.sampler, saved_config, state["step"], path)
    _report_config_changes(ckpt.cfg, ckpt.manifest, saved_config, path)
    saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    model_sd = get_model_state_dict(ckpt.model, options=TRAINABLE)
    ours, theirs = set(model_sd), {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    if ours != theirs:
        raise ValueError(
            f"cannot resume from {path}: trainable parameters differ (missing there: {sorted(ours - theirs)[:3]}, "
            f"extra there: {sorted(theirs - ours)[:3]}); did --stage, --tune_mm_mlp_adapter or --freeze_* change?"
        )
    try:
        dcp.load({"model": model_sd}, checkpoint_id=path)
        set_model_state_dict(ckpt.model, model_sd, options=TRAINABLE_LOAD)
        _load_optimizer(ckpt.model, ckpt.optimizer, path, saved)
    except CheckpointException as e:  # every rank raises it (DCP gathers the failures)
        rank, (first, _) = next(iter(e.failures.items()))
        raise ValueError(
            f"cannot resume from {path}: its DCP shards do not load (rank {rank}: {first_line(first)}); "
            "the checkpoint is damaged: pass an older one with --resume_from_checkpoint"
        ) from e
    ckpt.scheduler.load_state_dict(state["scheduler"])
    # The learning rate of the first resumed step is the current schedule's (a longer --max_steps moves it), with
    # the checkpoint's base rates; unchanged flags give exactly the saved value.
    for group, base, fn in zip(ckpt.optimizer.param_groups, ckpt.scheduler.base_lrs, ckpt.scheduler.lr_lambdas,
                               strict=True):  # fmt: skip
        group["lr"] = base * fn(ckpt.scheduler.last_epoch)
    ckpt.scheduler._last_lr = [g["lr"] for g in ckpt.optimizer.param_groups]
    # Where the next step starts, in this run's micro-batches: every split of the same global batch into ranks x
    # accumulation x micro-batch holds the same samples at each step (sampler.py), so the step says it all.
    spe, step = ckpt.sampler.steps_per_epoch, state["step"]
    ckpt.sampler.load_state_dict({"epoch": step // spe, "position": step % spe * t.gradient_accumulation_steps})
    rng = os.path.join(path, f"rng_state_{dist.get_rank()}.pth")
    if os.path.isfile(rng):  # absent when the world size changed (allowed if world x GA x batch did not)
        _set_rng_state(torch.load(rng, weights_only=True))
    if rank0():
        _trim_metrics(t.output_dir, state["step"])
        later = [p for step, p in complete_checkpoints(t.output_dir) if step > state["step"]]
        # Resumed from an older PATH: these belong to the trajectory being replaced. (auto skipped them: damaged.)
        if later and t.resume_from_checkpoint != "auto":
            print(f"warning: {later} are newer than {path}; `auto` would pick them until this run overwrites them")
    s = state["sampler"]
    print0(f"resumed from {path}: step {state['step']}, epoch {s['epoch']}, micro-batch {s['position']}")
    return state["step"]


def _check_shape(shape: dict, old: dict, path: str) -> None:
    """Refuse when the data order or the step count would change: global batch or dataset length differ."""
    keys = ("world_size", "gradient_accumulation_steps", "per_device_train_batch_size")
    desc = lambda r: " x ".join(str(r[k]) for k in keys) + f" = {math.prod(r[k] for k in keys)}"  # noqa: E731
    changed = []
    if math.prod(old[k] for k in keys) != math.prod(shape[k] for k in keys):
        changed.append(f"world_size x gradient_accumulation_steps x per_device_train_batch_size was {desc(old)}, "
                       f"now {desc(shape)}")  # fmt: skip
    if old["dataset_length"] != shape["dataset_length"]:
        changed.append(f"the dataset had {old['dataset_length']} samples, now {shape['dataset_length']}")
    if changed:
        raise ValueError(
            f"cannot resume from {path}: {'; '.join(changed)}. The checkpoint's sampler position and step count "
            "would no longer match the data order; restore those settings or start a new --output_dir"
        )


def _check_flags(cfg, sampler, saved_config: dict, step: int, path: str) -> None:
    """Refuse the flag changes a resume cannot honour, naming the flag and its saved value: the order of an epoch
    under way (--seed, --group_by_modality_length, --longest_first: samples would be trained twice or never) and
    the shapes of the trained state (--lora_r, --mm_projector_type)."""
    flat = lambda sections: {k: v for d in sections.values() for k, v in d.items()}  # noqa: E731
    old, new = flat(saved_config), flat(cfg.to_dict())
    mid_epoch = step % sampler.steps_per_epoch != 0
    order = ("seed", "group_by_modality_length", "longest_first") if mid_epoch else ()
    for flag in (*order, "lora_r", "mm_projector_type"):
        if flag in old and old[flag] != new[flag] and (flag != "lora_r" or new["lora_enable"]):
            why = "the order of the epoch under way" if flag in order else "the shapes of the trained weights"
            hint = " (it may change at an epoch boundary)" if flag in order else ""
            raise ValueError(f"cannot resume from {path}: --{flag} {new[flag]} changes {why}; the checkpoint "
                             f"was trained with --{flag} {old[flag]}: pass that{hint}")  # fmt: skip


def _report_config_changes(cfg, ours: dict | None, old: dict, path: str) -> None:
    new = cfg.to_dict()
    skip = {"output_dir", "resume_from_checkpoint"}
    diffs = [f"{s}.{k}: {v!r} -> {new[s][k]!r}" for s, d in old.items() for k, v in d.items()
             if k not in skip and new[s].get(k) != v]  # fmt: skip
    if diffs:
        print0(f"resuming with changed settings (checkpoint -> now): {', '.join(diffs)}. Learning rates and "
                "weight decay stay the checkpoint's; warmup and total steps follow the current flags")  # fmt: skip
    manifest = os.path.join(path, MANIFEST_NAME)
    if ours is not None and os.path.isfile(manifest):  # rank 0 holds the manifest
        changes = manifest_changes(read_json(manifest), ours)
        if changes:
            print(f"warning: {path} was written by a different setup (checkpoint -> now): {'; '.join(changes)}. "
                  "The run continues, but it may no longer match an uninterrupted one")  # fmt: skip


def _trim_metrics(output_dir: str, step: int) -> None:
    """Drop metrics.jsonl records after `step`: a killed run may have logged steps the resumed run repeats."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError):
                pass  # a line torn by the kill
    atomic_write(path, lambda tmp: write_text(tmp, "".join(keep)))
