"""Run a function on N gloo ranks in fresh processes (file:// rendezvous).

The processes are forked from a forkserver that imported torch, transformers and the trainer once for the whole
session (multiprocessing's forkserver with preloaded modules): each call gets new processes with a clean state, as
spawn gives, without paying those imports again (about 3 s a process on 2 cores). Workers get the caller's
environment as it is at the call (what modules read at import is the server's: a test that needs a fresh
interpreter launches one itself).

Workers return results by writing files under tmp_path (torch.save); passing tensors back through an mp Queue fails
once the producing process exits (ConnectionRefusedError)."""

import datetime
import gc
import multiprocessing
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "transformers", "train", "conftest"]


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    fn: Callable[..., Any],
    args: tuple,
    local: int,
    timeout_s: float | None,
    env: dict[str, str],
) -> None:
    gc.freeze()  # what the forkserver imported: never scanned again by this rank's collections (conftest.py)
    os.environ.clear()
    os.environ.update(env)  # the caller's, at the call (a forkserver child starts with the server's)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank % local), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(local)
    )
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, **timeout)
    try:
        fn(rank, world_size, *args)
    finally:
        # What fn built (FSDP2 modules sit in reference cycles holding the group) is freed while the group is alive;
        # left to interpreter exit, a gloo group's threads could be torn down unjoined (SIGABRT, "terminate called").
        gc.collect()
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    tmp_path,
    *args: Any,
    world_size: int = 2,
    local_world_size: int | None = None,
    timeout_s: float | None = None,
) -> None:
    """Call fn(rank, world_size, *args) on `world_size` gloo ranks (as nodes of local_world_size ranks, default all
    on one); raises if any rank fails. timeout_s: a collective waiting longer fails (a hang becomes an error)."""
    init_file = os.path.join(str(tmp_path), f"dist_init_{os.getpid()}_{id(fn)}")
    local = local_world_size or world_size
    multiprocessing.set_forkserver_preload(PRELOAD)  # read when the server starts (the first call)
    mp.start_processes(_worker, args=(world_size, init_file, fn, args, local, timeout_s, dict(os.environ)),
                       nprocs=world_size, join=True, start_method="forkserver")  # fmt: skip
