"""HSDP (--hsdp True): a 2-D (replicate, shard) device mesh, parameters sharded within a node and replicated across
nodes. 4 gloo ranks as 2 nodes x 2 train exactly as plain FSDP over the same 4 ranks: the same logged losses."""

import json
import os

import pytest
import torch
from conftest import flags, losses
from dist import run_distributed

import train


def _both(rank, world, argvs, out):
    meshes, real = [], train.D.apply_fsdp

    def recording(model, **kw):  # the mesh each run shards on
        mesh = kw["mesh"]
        meshes.append(None if mesh is None else dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True)))
        real(model, **kw)

    train.D.apply_fsdp = recording
    for argv in argvs:
        train.main(argv)
    with open(os.path.join(out, f"meshes_{rank}.json"), "w") as f:
        json.dump(meshes, f)


@pytest.mark.dist
def test_hsdp_2x2_equals_fsdp_on_4_ranks(assets, tmp_path):
    fsdp, hsdp = str(tmp_path / "fsdp"), str(tmp_path / "hsdp")
    common = dict(per_device_train_batch_size=1, max_steps=3, save_steps=0)
    argvs = [flags(assets, fsdp, **common), flags(assets, hsdp, hsdp=True, **common)]
    run_distributed(_both, tmp_path, argvs, str(tmp_path), world_size=4, local_world_size=2)
    with open(tmp_path / "meshes_3.json") as f:
        assert json.load(f) == [None, {"replicate": 2, "shard": 2}]
    assert len(losses(hsdp)) == 3
    torch.testing.assert_close(losses(hsdp), losses(fsdp), rtol=1e-5, atol=1e-5)
    with open(os.path.join(hsdp, "metrics.jsonl")) as f:
        assert all(json.loads(line)["grad_norm"] > 0 for line in f)
