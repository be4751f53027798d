"""The stage-2 final save's streaming path: safetensors headers written ahead of the data, the row split FSDP2
shards by, and a bucketed save of a sharded model on 2 gloo ranks (4 for HSDP) against the unsharded model written
whole by safetensors' save_file, as the save before streaming did."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from dist import run_distributed
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from minillava.formats import SAFETENSORS_DTYPES, safetensors_header, shard_name, to_llava_key
from minillava.gather import _buckets, chunk_rows, gather_layout, save_shards, tensor_pieces


def _random(shape, dtype, gen):
    """Random bytes as a tensor of any dtype (0/1 for bool)."""
    raw = torch.randint(0, 2 if dtype is torch.bool else 256, (math.prod(shape) * dtype.itemsize,), generator=gen)
    return raw.to(torch.uint8).view(dtype).reshape(shape)


def test_safetensors_header_gives_save_files_bytes(tmp_path):
    """Every dtype, in mixed order, with a scalar and an empty tensor: header + each tensor's bytes at its offset
    (written in the given order, not the file's) are save_file's file byte for byte."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (), (0, 4), (2, 1, 3), (7,)]
    tensors = {f"t{(i * 7) % 16}.{dtype}": _random(shapes[i % len(shapes)], dtype, gen)
               for i, dtype in enumerate(reversed(SAFETENSORS_DTYPES))}  # fmt: skip
    save_file(tensors, tmp_path / "theirs", metadata={"format": "pt"})
    header, offsets = safetensors_header((k, t.dtype, t.shape) for k, t in tensors.items())
    with open(tmp_path / "ours", "wb") as f:
        f.write(header)
        for key, t in tensors.items():
            f.seek(offsets[key])
            f.write(t.reshape(-1).view(torch.uint8).numpy())
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
    with safe_open(tmp_path / "ours", "pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(tensors)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_chunk_rows_is_torch_chunks_split(world):
    for n in range(10):
        chunks = [len(c) for c in torch.chunk(torch.arange(n), world)] if n else []
        assert chunk_rows(n, world) == chunks + [0] * (world - len(chunks))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gather_layout_places_each_ranks_rows(world):
    """Rank r's rows of every tensor, in order, then rank r+1's ...: each tensor's row chunks, read back through
    gather_layout one after another, are the tensor (rows uneven, fewer rows than ranks, no row)."""
    shapes = [(7, 2), (1,), (6, 3, 2), (0, 5), (5,)]
    tensors = [torch.arange(math.prod(s)).reshape(s) for s in shapes]
    chunks = [[c.reshape(-1) for c in torch.split(t, chunk_rows(len(t), world))] for t in tensors]
    flat = torch.cat([chunks[i][r] for r in range(world) for i in range(len(tensors))])
    begin = gather_layout(shapes, world)
    assert len(begin) == world * len(shapes) + 1 and begin[-1] == flat.numel()
    for i, t in enumerate(tensors):
        got = torch.cat([flat[begin[r * len(shapes) + i] : begin[r * len(shapes) + i + 1]] for r in range(world)])
        assert torch.equal(got, t.reshape(-1))


def _model() -> nn.Module:
    """LLaVA-named parameters (llm.model.*, llm.lm_head.*) whose row counts split unevenly over 2 and 4 ranks,
    one with a single row, and a plain buffer that FSDP2 leaves unsharded."""
    torch.manual_seed(0)
    model = nn.Module()
    model.llm = nn.Module()
    model.llm.model = nn.Sequential(nn.Linear(6, 7), nn.Linear(7, 1), nn.LayerNorm(1), nn.Linear(1, 10))
    model.llm.lm_head = nn.Linear(10, 5, bias=False)
    model.llm.model.register_buffer("scale", torch.arange(3.0))
    return model


SHARD_BYTES = 60
BUCKET_BYTES = 40  # bf16: 20 elements


def _reference(state: dict[str, torch.Tensor], out: str, dtype: torch.dtype) -> dict:
    """The save before streaming: whole shards in a dict, cast, written by save_file (transformers' shard rule)."""
    shards, size = [{}], 0
    for name, t in state.items():
        t = t.to(dtype).contiguous()
        if shards[-1] and size + t.nbytes > SHARD_BYTES:
            shards, size = [*shards, {}], 0
        shards[-1][to_llava_key(name)] = t
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        save_file(shard, os.path.join(out, shard_name(i, len(shards))), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, shard_name(i, len(shards))))
    return {"metadata": {"total_size": sum(t.numel() for t in state.values()) * dtype.itemsize},
            "weight_map": weight_map}  # fmt: skip


def _save_sharded(rank, world, out, local):
    """FSDP2 per layer and at the root (HSDP when local < world), then save_shards in bf16 and fp32 with tiny
    buckets; rank 0 writes the index. A hand-made state dict covers the other layouts tensor_pieces meets."""
    model = _model()
    mesh = None if local == world else init_device_mesh("cpu", (world // local, local), mesh_dim_names=("r", "s"))
    for layer in model.llm.model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for dtype in (torch.bfloat16, torch.float32):
        folder = os.path.join(out, str(dtype))
        os.makedirs(folder, exist_ok=True)
        index = save_shards(model, folder, dtype, SHARD_BYTES, BUCKET_BYTES)
        if rank == 0:
            with open(os.path.join(folder, "index.json"), "w") as f:
                json.dump(index, f)
    if rank == 0:
        state = get_model_state_dict(model)
        sizes = [len(b.items) for b in _buckets(state, torch.bfloat16, BUCKET_BYTES, [0])]
        torch.save(sizes, os.path.join(out, "buckets.pt"))
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(30.0).reshape(5, 6)
    layouts = {"shard1": [Shard(1)], "replicated": [Replicate()], "shard0": [Shard(0)]}
    state = {name: distribute_tensor(full, mesh, placements) for name, placements in layouts.items()}
    state = {"plain": full, **state}
    for writers in ([0], list(range(world))):  # rank 0 alone (others as if on other nodes), or every rank
        mine = [(name, offset, piece.clone()) for name, parts in tensor_pieces(state, torch.bfloat16, writers, 16)
                for offset, piece in parts]  # fmt: skip
        every = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            got = {name: torch.zeros(30, dtype=torch.bfloat16) for name in state}
            for name, offset, piece in (x for ranks in every for x in ranks):
                got[name].view(torch.uint8)[offset : offset + piece.numel() * 2] = piece.view(torch.uint8)
            want = full.to(torch.bfloat16).reshape(-1)
            assert all(torch.equal(t, want) for t in got.values()), got
            assert sum(p.numel() for ranks in every for _, _, p in ranks) == 30 * len(state)  # each byte once
    dist.barrier()


@pytest.mark.dist
@pytest.mark.parametrize(("world", "local"), [(2, 2), pytest.param(4, 2, id="hsdp")])
def test_bucketed_save_of_a_sharded_model_is_save_files(tmp_path, world, local):
    """Uneven row splits, a 1-row tensor, a plain buffer, several buckets and several shard files: every file is
    byte for byte the one save_file writes from the unsharded model (and 0644), and the index is the same."""
    out = str(tmp_path / "ours")
    run_distributed(_save_sharded, tmp_path, out, local, world_size=world, local_world_size=local)
    sizes = torch.load(os.path.join(out, "buckets.pt"))
    assert len(sizes) > 3 and max(sizes) > 1  # several buckets, some of several tensors
    for dtype in (torch.bfloat16, torch.float32):
        ours, ref = os.path.join(out, str(dtype)), str(tmp_path / f"ref-{dtype}")
        os.makedirs(ref)
        want = _reference(_model().state_dict(), ref, dtype)
        with open(os.path.join(ours, "index.json")) as f:
            index = json.load(f)
        assert index == want and list(index["weight_map"].items()) == list(want["weight_map"].items())
        files = sorted(set(want["weight_map"].values()))
        assert len(files) > 2 and sorted(os.listdir(ours)) == sorted([*files, "index.json"])
        for name in files:
            with open(os.path.join(ours, name), "rb") as a, open(os.path.join(ref, name), "rb") as b:
                assert a.read() == b.read(), name
            assert os.stat(os.path.join(ours, name)).st_mode & 0o777 == 0o644
