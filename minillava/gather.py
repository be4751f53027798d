"""How the final weights leave the sharded ranks. Small outputs (the projector, LoRA's files) are gathered one
tensor at a time (full_tensors). A stage-2 model streams into its safetensors shards (save_shards): rank 0 creates
the shard files with their headers (the layout follows from the shapes alone), then every rank on its node casts its
own rows to the saved dtype, bucket by bucket, and writes them where they go in the files (tensor_pieces,
write_pieces); ranks on other nodes send theirs to one of those. Nothing is gathered on one node, and no rank holds
more than two buckets of its rows. Together the files are byte for byte what safetensors' save_file writes."""

import contextlib
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor, Shard

from minillava.atomic import first_line
from minillava.formats.folders import safetensors_header, shard_name, shard_plan
from minillava.formats.llava import to_llava_key

BUCKET_BYTES = 32 * 2**20  # the final save's unit of cast, transfer and write: fastest in bench/final_save.py


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


def _shard_layout(shapes: list[tuple[str, Sequence[int]]], dtype: torch.dtype, max_shard_bytes: int) -> list:
    """Each shard file's (file name, header bytes, our name -> file offset of its data, data bytes), in order: the
    split is formats.folders.shard_plan's, each header formats.folders.safetensors_header's, from the shapes alone."""
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
