"""Writing the final outputs (llava/train/train.py safe_save_model_for_hf_trainer) and the atomic file helpers
checkpoints share. What goes into each file (names, contents, config.json) is minillava.formats'.

Final outputs, written by rank 0 through a staging directory:
stage 1 -> output_dir/mm_projector.bin + config.json
stage 2 -> output_dir as a LLaVA stage-2 folder: config.json, sharded safetensors + index, generation_config.json,
           tokenizer files (also save_stage2_folder, from a state dict: minillava.export --merge_lora). The
           weights stream: rank 0 creates the shard files with their headers (the layout follows from the shapes
           alone), then every rank on its node casts its own rows to the saved dtype, bucket by bucket, and writes
           them where they go in the files (tensor_pieces, write_pieces); ranks on other nodes send theirs to
           one of those. Nothing is gathered on one node, and no rank holds more than two buckets of its rows.
LoRA    -> output_dir as LLaVA's LoRA run leaves it: config.json, adapter_config.json, adapter_model.safetensors,
           non_lora_trainables.bin (get_peft_state_maybe_zero_3 / get_peft_state_non_lora_maybe_zero_3).
The projector and LoRA files are small: gathered one tensor at a time (full_tensors).
Writes go to a temporary name (file or staging directory) and are renamed into place, so a kill never leaves
a half-written output.

One run per output_dir: rank 0 holds an flock on output_dir/.minillava.lock for the whole run (lock_output_dir);
a run that stops in its start-up, before writing anything there, removes the lock file and the folders it made
(unclaim_output_dir).
A full disk (or quota) during a save stops the run with one line naming what was being written and the newest
complete checkpoint, which the failed save left untouched; its partial files are removed.
"""

import contextlib
import errno
import fcntl
import itertools
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor, Shard

from minillava.distributed import broadcast_object
from minillava.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INDEX_NAME,
    MANIFEST_NAME,
    NON_LORA,
    SHARD_NAME,
    llava_config,
    local_folder,
    lora_config,
    lora_content,
    mm_projector_content,
    safetensors_header,
    shard_name,
    shard_plan,
    to_llava_key,
)
from minillava.lora import is_lora_param, lora_targets

_LEFTOVER = re.compile(r"checkpoint-\d+\.(tmp|old)-.+|\.final\.tmp-.+")  # from a save that was killed
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
MARKER = "COMPLETE"  # written last into a checkpoint (minillava/checkpoint.py)
LOCK_NAME = ".minillava.lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
BUCKET_BYTES = 32 * 2**20  # the final save's unit of cast, transfer and write: fastest in bench/final_save.py


def rank0() -> bool:
    return dist.get_rank() == 0


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N in output_dir that holds its COMPLETE marker, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        path = os.path.join(output_dir, name)
        if (m := _CHECKPOINT.fullmatch(name)) and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def lock_file(path: str):
    """Take an exclusive flock on `path` (created if absent) and write our pid and host into it. Returns the open
    file: closing it, or the process's death (even by kill -9), releases the lock. ValueError if another process
    holds it. Where flock is not supported (some NFS or Lustre mounts), warns and returns the file unlocked."""
    f = open(path, "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "pid unknown"
        f.close()
        raise ValueError(f"in use by another run ({holder})") from None
    except OSError as e:
        print(f"warning: cannot lock {path} ({e.strerror}): make sure no other run uses this --output_dir")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def lock_output_dir(output_dir: str):
    """Collective: claim output_dir for this run, before anything is written there. A second run on it would
    delete the first one's checkpoint in progress (make_tmp_dir), so it stops instead, on every rank. Returns the
    lock file (rank 0; None elsewhere) to close at the end. Advisory: only minillava runs take this lock."""
    lock = error = None
    if rank0():
        try:
            os.makedirs(output_dir, exist_ok=True)
            lock = lock_file(os.path.join(output_dir, LOCK_NAME))
        except ValueError as e:  # held
            error = f"--output_dir {output_dir}: {e}; wait for that run to end or pass another --output_dir"
        except OSError as e:
            error = f"--output_dir {output_dir}: cannot create {LOCK_NAME} ({e.strerror}); check its permissions"
    error = broadcast_object(error)
    if error:
        raise ValueError(error)
    return lock


# What an earlier run left in --output_dir: a run that started (metrics.jsonl, its config), finished (manifest.json)
# or saved checkpoints. --overwrite_output_dir removes these and the final outputs' weights and config.
RUN_FILES = ("metrics.jsonl", "minillava_config.json", MANIFEST_NAME)
CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")
OUTPUT_FILES = ("config.json", "mm_projector.bin", INDEX_NAME, ADAPTER_CONFIG, ADAPTER_WEIGHTS, NON_LORA)


def earlier_run(output_dir: str) -> list[str]:
    """The names in output_dir that an earlier minillava run wrote (RUN_FILES, checkpoint-N folders), sorted."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(n for n in names if n in RUN_FILES or CHECKPOINT_DIR.fullmatch(n))


def check_output_dir(cfg) -> None:
    """Collective: refuse to start in an --output_dir holding an earlier run (its model would be overwritten at the
    end and its metrics mixed with this run's) unless the run resumes it (--resume_from_checkpoint) or starts over
    (--overwrite_output_dir, HF Trainer's flag)."""
    t, error = cfg.train, None
    if rank0() and not t.resume_from_checkpoint and not t.overwrite_output_dir and (found := earlier_run(t.output_dir)):
        checkpoints = any(CHECKPOINT_DIR.fullmatch(n) for n in found)
        what = "a finished run" if MANIFEST_NAME in found else "checkpoints of a run" if checkpoints else "a run"
        error = (f"--output_dir {t.output_dir} holds {what} ({', '.join(found[:3])}); pass --resume_from_checkpoint "
                 "auto to continue it, --overwrite_output_dir to start over, or pass another --output_dir")  # fmt: skip
    if error := broadcast_object(error):
        raise ValueError(error)


def clear_output_dir(output_dir: str) -> list[str]:
    """Rank 0, --overwrite_output_dir once the start-up has passed: remove an earlier run's files (earlier_run) and
    its final outputs' weights and config, so the folder holds only this run's; returns the names removed."""
    names = os.listdir(output_dir)
    gone = [n for n in names if n in RUN_FILES or n in OUTPUT_FILES or SHARD_NAME.fullmatch(n)
            or CHECKPOINT_DIR.fullmatch(n) or _LEFTOVER.fullmatch(n)]  # fmt: skip
    for name in gone:
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    fsync_dir(output_dir)
    return sorted(gone)


def new_dirs(path: str) -> list[str]:
    """The folders os.makedirs(path) would create (lock_output_dir does), deepest first; [] if path exists."""
    made, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def unclaim_output_dir(lock, output_dir: str, made: list[str]) -> None:
    """Rank 0, for a run that stops before writing into output_dir: undo lock_output_dir, so the directory is
    as the run found it. The lock file goes (while still held: no other run can be using it), then the folders
    in `made` (new_dirs, taken before the claim) while empty; nothing a user or an earlier run put there is
    touched. lock None (the claim failed): only the empty folders go."""
    if lock is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, LOCK_NAME))
        lock.close()
    for path in made:
        try:
            os.rmdir(path)  # refuses a folder that holds anything
        except OSError:
            break


def _disk_full_errno(e: BaseException, directory: str) -> int | None:
    """ENOSPC or EDQUOT if `e` comes from a full disk or quota. The libraries hide the OSError: torch.save raises
    a RuntimeError with it as __context__, safetensors names it in its message, DCP lists every rank's error in a
    CheckpointException (pickled, losing __context__: then the free space of `directory` decides)."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in DISK_FULL:
            return x.errno
        for code in DISK_FULL:
            if os.strerror(code) in str(x):
                return code
        todo += [x.__cause__, x.__context__]
        if isinstance(x, CheckpointException):
            todo += [exc for exc, _ in x.failures.values()]
    if isinstance(e, CheckpointException) and shutil.disk_usage(directory).free < 2**20:
        return errno.ENOSPC
    return None


@contextlib.contextmanager
def removed_on_error(tmp: str, target: str, output_dir: str):
    """Around a save into the temporary directory `tmp`: if it fails, remove `tmp`; a full disk (or quota) is
    re-raised as one line naming `target`, the fix, and the newest complete checkpoint."""
    try:
        yield
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        code = _disk_full_errno(e, output_dir)  # before removing tmp, whose files are what filled the disk
        shutil.rmtree(tmp, ignore_errors=True)
        if code is None:
            raise
        found = complete_checkpoints(output_dir)
        kept = f"{found[-1][1]} is still loadable" if found else "no complete checkpoint was saved before"
        error = OSError(f"{os.strerror(code).lower()} while writing {target}: free space or point --output_dir "
                        f"elsewhere; {kept}")  # fmt: skip
        error.errno = code
        raise error from e


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str, obj: dict) -> None:
    atomic_write(path, lambda tmp: write_text(tmp, json.dumps(obj, indent=2, default=str) + "\n"))


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def make_tmp_dir(parent: str, prefix: str) -> str:
    """A fresh directory inside `parent` (same filesystem, so the final rename is atomic), made by rank 0."""
    path = None
    if rank0():
        os.makedirs(parent, exist_ok=True)
        for name in os.listdir(parent):  # leftovers of a killed save (lock_output_dir: no other run writes here)
            if _LEFTOVER.fullmatch(name):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o777 & ~umask)  # mkdtemp's 0700 would hide checkpoints from the other users of a cluster
    return broadcast_object(path)


def discard_dir(path: str) -> None:
    """Rename out of the checkpoint-N pattern (atomic), then delete: a kill mid-delete leaves only a leftover."""
    doomed = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=os.path.dirname(path))
    os.replace(path, doomed)  # replaces the empty directory mkdtemp made
    shutil.rmtree(doomed, ignore_errors=True)


def replace_dir(tmp: str, final: str) -> None:
    """Rename tmp to final, discarding an existing final first (a re-run of the same step)."""
    if os.path.exists(final):
        discard_dir(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def full_tensors(
    model: nn.Module, prefix: str = "", device: str | None = "cpu", names: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) for every parameter/buffer of the state dict whose name starts with `prefix` (and is
    in `names`, if given), moved to `device` (None: left where the all-gather put it, for ranks that discard it).
    Every rank must iterate: each DTensor.full_tensor() is an all-gather. Only one full tensor exists at a time."""
    for name, value in get_model_state_dict(model).items():  # sharded views, nothing gathered yet
        if not name.startswith(prefix) or (names is not None and name not in names):
            continue
        if isinstance(value, DTensor):
            value = value.full_tensor()
        yield name, value.detach() if device is None else value.detach().to(device)


def save_projector(model: nn.Module, path: str, dtype: torch.dtype) -> None:
    """Write LLaVA's mm_projector.bin. Collective: call on all ranks."""
    state = mm_projector_content(full_tensors(model, "mm_projector."), dtype)
    if rank0():
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def chunk_rows(n: int, world: int) -> list[int]:
    """How many of n rows each of `world` ranks holds under DTensor's Shard(0), FSDP2's split (torch.chunk's):
    ceil(n / world) each in rank order, so the last ranks may hold fewer or none."""
    chunk = -(-n // world)
    return [max(0, min(n, (r + 1) * chunk) - r * chunk) for r in range(world)]


def gather_layout(shapes: list[Sequence[int]], world: int) -> list[int]:
    """Where each rank's rows of each tensor go in a bucket's flat layout for row-split tensors of these (global)
    shapes: rank after rank, each rank's rows of every tensor in order. begin[r * len(shapes) + i] is where
    rank r's rows of tensor i start; the list ends with the total, so rank r's part is
    [begin[r * len(shapes)], begin[(r + 1) * len(shapes)])."""
    splits = [chunk_rows(shape[0], world) for shape in shapes]
    sizes = (rows[r] * math.prod(shape[1:]) for r in range(world) for rows, shape in zip(splits, shapes, strict=True))
    return list(itertools.accumulate(sizes, initial=0))


def _row_split(value: DTensor) -> tuple[list[int], dist.ProcessGroup] | None:
    """For a DTensor split by rows over one mesh dim and replicated over any other (FSDP2's Shard(0), HSDP's
    (Replicate(), Shard(0))): the global ranks holding row chunks 0, 1, ... on the line of that dim through rank 0,
    and the dim's process group. None for any other layout."""
    split = [d for d, p in enumerate(value.placements) if not p.is_replicate()]
    if len(split) != 1 or type(value.placements[split[0]]) is not Shard or value.placements[split[0]].dim != 0:
        return None
    mesh, dim = value.device_mesh, split[0]
    lines = mesh.mesh.movedim(dim, -1).reshape(-1, mesh.size(dim)).tolist()
    peers = next((line for line in lines if 0 in line), None)
    return None if peers is None else (peers, mesh.get_group(dim))


@dataclass
class _Bucket:
    """Consecutive state-dict entries handled together: row-split DTensors sharing one split (_row_split's), one
    cast and at most one transfer per rank for them all; or a single entry of any other kind (split None). dest:
    the writer that receives the parts of ranks that do not write (other nodes), or writes a whole entry."""

    items: list[tuple[str, torch.Tensor]]
    split: tuple[list[int], dist.ProcessGroup] | None
    nbytes: int
    dest: int


def _buckets(state: dict[str, torch.Tensor], dtype: torch.dtype, bucket_bytes: int, writers: list[int]) -> list:
    """The state dict, in order, cut into buckets of at most bucket_bytes in the saved dtype (a larger tensor
    alone in its own), dealt to the writers in turn as dest. Every rank plans the same buckets from the sharded
    views: nothing is gathered yet."""
    buckets: list[_Bucket] = []
    for name, value in state.items():
        split = _row_split(value) if isinstance(value, DTensor) else None
        nbytes = value.numel() * dtype.itemsize
        last = buckets[-1] if buckets else None
        if split and last and last.split == split and last.nbytes + nbytes <= bucket_bytes:
            last.items.append((name, value))
            last.nbytes += nbytes
        else:
            buckets.append(_Bucket([(name, value)], split, nbytes, writers[len(buckets) % len(writers)]))
    return buckets


class _Slots:
    """The two buffers tensor_pieces alternates between (the bucket being written, the next one being cast and
    received), kept across buckets: a fresh 32 MiB allocation per bucket is a fresh mmap whose page faults cost
    more CPU time than the cast. slot(k, n, ...) is buffer k % 2, grown to n elements when smaller."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.device], torch.Tensor] = {}

    def slot(self, k: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (k % 2, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


Pieces = list[tuple[int, torch.Tensor]]  # (byte offset in the tensor's row-major bytes, flat CPU tensor)


def _start_rows(bucket: _Bucket, dtype: torch.dtype, k: int, slots: _Slots, writers: list[int]) -> Iterator:
    """Start a bucket of row-split DTensors; returns the iterator that finishes it, yielding (name, pieces) for the
    rows this rank writes. Each rank casts its rows of every tensor into one flat buffer in `dtype` on its own
    device (the one the backend serves: the DTensor's). A writer writes its own rows where they go in the file, so
    on one node nothing travels; a rank that does not write (on another node) sends its part to the bucket's dest,
    which writes it too. Point-to-point, not an all-gather: gloo's all-gather moved 0.2-0.6 GiB/s where its
    send/recv moved 3-4 (2 CPU ranks). Ranks off rank 0's line of the mesh (other HSDP replicas) take no part."""
    peers, group = bucket.split
    rank = dist.get_rank()
    if rank not in peers:
        return iter(())
    me, count = peers.index(rank), len(bucket.items)
    local = [value.to_local() for _, value in bucket.items]
    if [t.shape[0] for t in local] != [chunk_rows(v.shape[0], len(peers))[me] for _, v in bucket.items]:
        raise RuntimeError("a Shard(0) DTensor's local rows are not torch.chunk's split")
    begin = gather_layout([value.shape for _, value in bucket.items], len(peers))
    mine = [me] + ([r for r, p in enumerate(peers) if p not in writers] if rank == bucket.dest else [])
    sizes = [begin[(r + 1) * count] - begin[r * count] for r in mine]  # the parts this rank holds, in this order
    starts = dict(zip(mine, itertools.accumulate(sizes, initial=0), strict=False))  # ... and where, in its buffer
    flat = slots.slot(k, sum(sizes), dtype, local[0].device)
    lo = begin[me * count]
    for i, t in enumerate(local, start=me * count):  # copy_ casts as it copies: 3x faster than torch.cat(out=)
        flat[begin[i] - lo : begin[i + 1] - lo].copy_(t.reshape(-1))
    if rank not in writers:
        return _sent(dist.batch_isend_irecv([dist.P2POp(dist.isend, flat, bucket.dest, group)]), flat)
    ops = [dist.P2POp(dist.irecv, flat[starts[r] : starts[r] + size], peers[r], group)
           for r, size in zip(mine[1:], sizes[1:], strict=True)]  # fmt: skip
    works = dist.batch_isend_irecv(ops) if ops else []
    host = flat if flat.device.type == "cpu" else slots.slot(k, flat.numel(), dtype, torch.device("cpu"))
    return _received(works, flat, host, bucket, starts, begin)


def _sent(works: list, buffer: torch.Tensor) -> Iterator:
    """A sender's end of _start_rows: wait for the transfer, holding the buffer sent until then; yields nothing."""
    for work in works:
        work.wait()
    yield from ()


def _received(works: list, flat: torch.Tensor, host: torch.Tensor, bucket: _Bucket, starts: dict, begin) -> Iterator:
    """A writer's end of _start_rows: wait for the parts it receives, copy the buffer to the host buffer `host` once
    (if it is on a GPU), then yield (name, pieces): the rows of each tensor that it holds (rank r's part starts at
    starts[r] in flat), each at its byte offset in the tensor (a row-major tensor's row chunks lie one after
    another, rank after rank)."""
    for work in works:
        work.wait()
    flat = host.copy_(flat) if host is not flat else flat
    count, peers = len(bucket.items), len(bucket.split[0])
    for i, (name, value) in enumerate(bucket.items):
        row_bytes = math.prod(value.shape[1:]) * flat.element_size()
        offsets = list(itertools.accumulate(chunk_rows(value.shape[0], peers), initial=0))
        pieces = []
        for r in starts:
            a, b = begin[r * count + i] - begin[r * count], begin[r * count + i + 1] - begin[r * count]
            if b > a:
                pieces.append((offsets[r] * row_bytes, flat[starts[r] + a : starts[r] + b]))
        yield name, pieces


def _start_whole(bucket: _Bucket, dtype: torch.dtype) -> Iterator:
    """_start_rows' counterpart for a single entry that is not row-split: dest writes it, from its own copy when it
    holds the tensor whole (a plain tensor, a replicated DTensor), else after every rank's DTensor.full_tensor()."""
    [(name, value)] = bucket.items
    if isinstance(value, DTensor):
        value = value.to_local() if all(p.is_replicate() for p in value.placements) else value.full_tensor()
    mine = dist.get_rank() == bucket.dest
    return iter([(name, [(0, value.to("cpu", dtype).contiguous().reshape(-1))])] if mine else [])


def tensor_pieces(
    state: dict[str, torch.Tensor], dtype: torch.dtype, writers: list[int], bucket_bytes: int = BUCKET_BYTES
) -> Iterator[tuple[str, Pieces]]:
    """Yield (name, pieces) for what this rank writes of a sharded state dict (get_model_state_dict), in order:
    pieces are (byte offset, flat CPU tensor) parts of the entry's row-major bytes in `dtype`. Together the
    writers' pieces cover every entry once. Every rank must iterate to the end. Bucket k+1 is cast and received
    while bucket k is written: a writer holds two buckets of its own rows (plus what other nodes send it). The
    pieces are views of buffers that later buckets reuse: write an entry's pieces before asking for the next."""
    finish_previous: Iterator = iter(())
    slots = _Slots()  # bucket k's buffers are reused by bucket k + 2, which starts once k is written
    for k, bucket in enumerate(_buckets(state, dtype, bucket_bytes, writers)):
        # this bucket's cast and transfer start
        finish = _start_rows(bucket, dtype, k, slots, writers) if bucket.split else _start_whole(bucket, dtype)
        yield from finish_previous  # ... while the previous one is written
        finish_previous = finish
    yield from finish_previous


def _writers(state: dict[str, torch.Tensor]) -> list[int]:
    """The ranks that write the final shard files: those on rank 0's node (torchrun numbers them 0 ..
    LOCAL_WORLD_SIZE - 1), which share its page cache, so writes into one file from several of them are safe;
    among them, those holding rows of every row-split tensor (all of them, for FSDP2 and HSDP meshes)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    peers = [split[0] for v in state.values() if isinstance(v, DTensor) and (split := _row_split(v))]
    return [r for r in range(min(local, dist.get_world_size())) if r == 0 or all(r in p for p in peers)]


def save_shards(
    model: nn.Module, out: str, dtype: torch.dtype, max_shard_bytes: int, bucket_bytes: int = BUCKET_BYTES
) -> dict:
    """Stream the full model into model-0000x-of-0000y.safetensors in `out`: rank 0 creates the files (header,
    full length), then every writer rank (_writers) casts its own rows in buckets and writes them where they go
    (tensor_pieces, write_pieces), in parallel and with no transfer on one node; ranks on other nodes send theirs
    to a writer. A failed write (a full disk) is raised on every rank, after every transfer is done. Returns the
    index on rank 0. Collective: call on all ranks."""
    state = get_model_state_dict(model)  # sharded views, nothing gathered yet
    shapes = [(name, value.shape) for name, value in state.items()]
    writers, rank = _writers(state), dist.get_rank()
    index, error = {}, None
    try:
        if rank == 0:
            index = create_shards(out, shapes, dtype, max_shard_bytes)
    except Exception as e:
        error = e
    error = _shared_failure(error)  # also the barrier: the files exist before anyone writes into them
    pieces = tensor_pieces(state, dtype, writers, bucket_bytes)
    try:
        if error is None and rank in writers:
            write_pieces(out, shapes, dtype, max_shard_bytes, pieces)
    except Exception as e:
        error = e
    for _ in pieces:  # after a failed write: the transfers other ranks still wait for
        pass
    _shared_failure(error)
    return index


def _shared_failure(error: Exception | None) -> None:
    """Collective: raise this rank's error, else the first other rank's (an OSError keeps its errno, so a full disk
    reads the same everywhere), else return None."""
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else (getattr(error, "errno", None), first_line(error)))
    if error is not None:
        raise error
    if failure := next((f for f in failures if f is not None), None):
        code, what = failure
        raise OSError(code, f"another rank's write failed: {what}") if code else RuntimeError(what)


def first_line(e: BaseException) -> str:
    """An error as one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _shard_layout(shapes: list[tuple[str, Sequence[int]]], dtype: torch.dtype, max_shard_bytes: int) -> list:
    """Each shard file's (file name, header bytes, our name -> file offset of its data, data bytes), in order: the
    split is formats.shard_plan's, each header formats.safetensors_header's, from the shapes alone."""
    sizes = {name: math.prod(shape) * dtype.itemsize for name, shape in shapes}
    shape_of = dict(shapes)
    files = shard_plan(sizes.items(), max_shard_bytes)
    layout = []
    for i, names in enumerate(files):
        header, offsets = safetensors_header((to_llava_key(n), dtype, shape_of[n]) for n in names)
        at = {n: offsets[to_llava_key(n)] for n in names}
        layout.append((shard_name(i, len(files)), header, at, sum(sizes[n] for n in names)))
    return layout


def create_shards(out: str, shapes: list[tuple[str, Sequence[int]]], dtype: torch.dtype, max_shard_bytes: int) -> dict:
    """Create model-0000x-of-0000y.safetensors in `out` at their full length, each with its header (the data is
    written by write_pieces), as safetensors' save_file would lay them out. Files are 0644 (save_file's are 0600,
    which hid them from other users). Returns the index (LLaVA key -> file, total bytes)."""
    weight_map: dict[str, str] = {}
    for file, header, at, nbytes in _shard_layout(shapes, dtype, max_shard_bytes):
        with open(os.path.join(out, file), "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(header)
            f.truncate(len(header) + nbytes)
        weight_map.update({to_llava_key(n): file for n in at})
    total = sum(math.prod(shape) * dtype.itemsize for _, shape in shapes)
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def write_pieces(
    out: str,
    shapes: list[tuple[str, Sequence[int]]],
    dtype: torch.dtype,
    max_shard_bytes: int,
    pieces: Iterable[tuple[str, Pieces]],
) -> None:
    """Write (name, pieces) into the shard files create_shards made: each piece's bytes at its tensor's offset in
    its file plus the piece's own offset, straight from the tensor's memory (no copy). Together the files become
    byte for byte what save_file writes."""
    where = {n: (file, at[n]) for file, _, at, _ in _shard_layout(shapes, dtype, max_shard_bytes) for n in at}
    with contextlib.ExitStack() as stack:
        fds: dict[str, int] = {}
        for name, parts in pieces:
            file, base = where[name]
            if file not in fds:
                fds[file] = os.open(os.path.join(out, file), os.O_WRONLY)
                stack.callback(os.close, fds[file])
            for offset, piece in parts:
                data, at = memoryview(piece.view(torch.uint8).numpy()), base + offset
                while data:  # os.pwrite may write less than asked (at most about 2 GiB at a time)
                    n = os.pwrite(fds[file], data, at)
                    data, at = data[n:], at + n
def _publish(stage: str, out: str) -> None:
    """Move the staged files into `out`, index and config.json last; remove shards of an earlier save that the new
    index does not list. Every file was complete before its rename."""
    names = sorted(os.listdir(stage), key=lambda n: (n in (INDEX_NAME, "config.json"), n))
    if INDEX_NAME in names:
        for old in os.listdir(out):
            if SHARD_NAME.fullmatch(old) and old not in names:
                os.remove(os.path.join(out, old))
    for name in names:
        os.replace(os.path.join(stage, name), os.path.join(out, name))
    fsync_dir(out)
    os.rmdir(stage)


def save_final(
    model: nn.Module, cfg, tokenizer, dtype: torch.dtype, max_shard_bytes: int = 5 * 2**30, manifest=None
) -> None:
    """Stage 1: mm_projector.bin + config.json. Stage 2: a full HF folder, its weights streamed (save_shards). Both
    with the run's manifest.json (formats.run_manifest) when given. Everything is written into a staging directory
    inside output_dir and renamed into place at the end, so a kill mid-save leaves no partial file in output_dir.
    Collective: call on all ranks."""
    out = cfg.train.output_dir
    stage = make_tmp_dir(out, ".final.tmp-")
    full = not cfg.model.tune_mm_mlp_adapter and not cfg.train.lora_enable
    with removed_on_error(stage, out, out):
        if cfg.model.tune_mm_mlp_adapter:
            save_projector(model, os.path.join(stage, "mm_projector.bin"), dtype)
        elif cfg.train.lora_enable:
            _save_lora(model, stage, cfg, dtype)
        else:
            index = save_shards(model, stage, dtype, max_shard_bytes)
        if rank0():
            if full:
                llm = local_folder(cfg.model.model_name_or_path, "--model_name_or_path")
                _stage2_extras(stage, index, model.llm.generation_config, tokenizer, llm)
            if manifest is not None:
                write_json(os.path.join(stage, MANIFEST_NAME), manifest)
            write_json(os.path.join(stage, "config.json"), llava_config(model, cfg, dtype))
            _publish(stage, out)
    dist.barrier()


def _stage2_extras(stage: str, index: dict, generation_config, tokenizer, tokenizer_src: str) -> None:
    """A stage-2 folder's files besides the weights: the index, generation_config.json and the tokenizer."""
    write_json(os.path.join(stage, INDEX_NAME), index)
    generation_config.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    sp_model = os.path.join(tokenizer_src, "tokenizer.model")
    if os.path.isfile(sp_model) and not os.path.exists(os.path.join(stage, "tokenizer.model")):
        shutil.copyfile(sp_model, os.path.join(stage, "tokenizer.model"))  # LLaVA loads use_fast=False


def _save_lora(model: nn.Module, stage: str, cfg, dtype: torch.dtype) -> None:
    """LLaVA's LoRA files (train.py end of train()): the adapters in peft's layout, every other trainable tensor
    (the projector) in non_lora_trainables.bin. Collective: every rank gathers, rank 0 writes."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if is_lora_param(n)}
    adapters = lora_content(full_tensors(model, names=lora), dtype)
    non_lora = lora_content(full_tensors(model, names=trainable - lora), dtype)
    if rank0():
        lora_config(cfg, lora_targets(model)).save_pretrained(stage)  # adapter_config.json
        save_file(adapters, os.path.join(stage, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        os.chmod(os.path.join(stage, ADAPTER_WEIGHTS), 0o644)  # safetensors creates 0600 files
        torch.save(non_lora, os.path.join(stage, NON_LORA))


def save_stage2_folder(
    out: str,
    state: dict[str, torch.Tensor],
    config: dict,
    dtype: torch.dtype,
    generation_config,
    tokenizer,
    tokenizer_src: str,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """A LLaVA stage-2 folder from full tensors (our names), without a process group (minillava.export
    --merge_lora): the same shard writer as save_final's, one tensor cast at a time; staged and renamed into place
    as save_final's."""
    os.makedirs(out, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".final.tmp-", dir=out)
    shapes = [(name, t.shape) for name, t in state.items()]
    index = create_shards(stage, shapes, dtype, max_shard_bytes)
    pieces = ((name, [(0, t.to("cpu", dtype).contiguous().reshape(-1))]) for name, t in state.items())
    write_pieces(stage, shapes, dtype, max_shard_bytes, pieces)
    _stage2_extras(stage, index, generation_config, tokenizer, tokenizer_src)
    write_json(os.path.join(stage, "config.json"), config)
    _publish(stage, out)


def next_steps(cfg) -> str:
    """What the final outputs are and how to use them, printed at the end of a run."""
    out = os.path.abspath(cfg.train.output_dir)
    if cfg.train.lora_enable:
        return (f"LoRA adapters: {out} (LLaVA's LoRA layout; peft.PeftModel.from_pretrained loads them onto the base "
                f"LLM). For generate / export, merge them: python -m minillava.export --merge_lora {out} --output "
                f"{out}-merged")  # fmt: skip
    if cfg.model.tune_mm_mlp_adapter:
        return (f"projector: {out}/mm_projector.bin. Next, stage 2 (LLaVA's finetune.sh): the same launcher with "
                f"train.py --stage 2 --pretrain_mm_mlp_adapter {out}/mm_projector.bin --data_path <instruction "
                "data> --output_dir <stage-2 dir>")  # fmt: skip
    return (f"model: {out} (LLaVA stage-2 format). Try it: python -m minillava.generate --checkpoint {out} --image "
            f"<image> --prompt <question>; as a llava-hf folder: python -m minillava.export --checkpoint {out} "
            f"--output {out}-hf")  # fmt: skip
