"""Time and host memory of the stage-2 final save's weights on 2 gloo ranks (CPU), beside save_pretrained:

    python bench/final_save.py [--layers 18] [--hidden 1024] [--repeats 5] [--buckets 16,32,256] [--shard_mb 200]

Builds a Llama-like model (transformers LlamaForCausalLM, random weights: about 297M parameters, 0.59 GB in bf16,
under an `llm` attribute so the names are the trainer's), keeps fp32 masters and shards them with fully_shard per
decoder layer and at the root, as minillava.distributed.apply_fsdp does. Then measures, in paired repeats (each
repeat runs every variant once, in turn, after one warm-up round; medians reported):
  old:  the save before streaming, kept below as old_save_shards (reference only): per-tensor fp32
        DTensor.full_tensor() all-gathers, rank 0 casts and holds a whole shard, safetensors' save_file writes it;
  new:  minillava.gather.save_shards, at each --buckets size (MiB): every rank casts and writes its own rows;
  save_pretrained: transformers' save_pretrained of the same weights, already bf16, in one process (rank 0 while
        rank 1 waits), with the same max_shard_size: the reference the ratios are to;
  save_pretrained from fp32: the same from an fp32 copy, cast to bf16 in the save (state_dict=...), for scale:
        the cast from fp32 masters is work every save from them does, and save_pretrained of bf16 weights skips it.
Each save writes the bf16 shards (and, for old/new, the index) into a fresh folder, after os.sync() so no earlier
save's writeback competes. Time: rank 0's wall clock from a barrier to its last write. Memory: rank 0's peak resident
memory during the save minus its resident memory before (Linux VmHWM, the high-water mark, reset first through
/proc/self/clear_refs), so what the save itself allocates; malloc_trim first hands the memory earlier saves freed
back to the system, so a save cannot reuse it unseen. On the CPU the cast buffers are host memory, and they
count: new holds two buckets of its own rows (one being written, the next being cast; a bucket is --buckets MiB, or
the largest tensor when that is larger: the 65.5 MB embeddings, of which each rank holds half), old a whole shard
plus one fp32 tensor. Both ranks write (they share a node), so nothing is transferred. Written files live
in the page cache, not in the process, and do not count. Afterwards every new folder is compared byte for byte with
old's.
Prints one JSON line per measurement and a markdown table."""

import argparse
import copy
import ctypes
import filecmp
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from minillava.atomic import write_json
from minillava.formats import shard_name, to_llava_key
from minillava.gather import full_tensors, save_shards

DTYPE = torch.bfloat16


# ---------------------------------------------------------------- REFERENCE ONLY: the save before streaming
# minillava/outputs.py _save_shards + write_shards as they were at commit 921142b (the branch point).


def old_save_shards(model: nn.Module, out: str, dtype: torch.dtype, max_shard_bytes: int) -> dict:
    tensors = full_tensors(model, device=None)
    if dist.get_rank() != 0:
        for _ in tensors:
            pass
        return {}
    return old_write_shards(tensors, out, dtype, max_shard_bytes)


def old_write_shards(named: Iterable[tuple[str, torch.Tensor]], out: str, dtype: torch.dtype, max_shard_bytes: int):
    shards: list[list[str]] = []
    buf: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buf, size
        save_file(buf, os.path.join(out, f"part-{len(shards)}"), metadata={"format": "pt"})
        os.chmod(os.path.join(out, f"part-{len(shards)}"), 0o644)
        shards.append(list(buf))
        buf, size = {}, 0

    for name, t in named:
        t = t.to("cpu", dtype).contiguous()
        if buf and size + t.nbytes > max_shard_bytes:
            flush()
        buf[to_llava_key(name)] = t
        size += t.nbytes
        total += t.nbytes
    weight_map: dict[str, str] = {}
    flush()
    for i, keys in enumerate(shards):
        final = shard_name(i, len(shards))
        os.replace(os.path.join(out, f"part-{i}"), os.path.join(out, final))
        weight_map.update(dict.fromkeys(keys, final))
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


# ---------------------------------------------------------------- measurement


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure(save: Callable[[str], None], out: str) -> dict:
    """Every rank: run save(out) from a barrier; rank 0's seconds and peak extra resident memory (MB)."""
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        os.sync()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _status_kb("VmRSS")
    dist.barrier()
    t0 = time.perf_counter()
    save(out)
    seconds = time.perf_counter() - t0
    row = {}
    if dist.get_rank() == 0:
        row = {"seconds": round(seconds, 3), "peak_extra_mb": round((_status_kb("VmHWM") - base) / 1024)}
    dist.barrier()
    return row


def _build(a) -> tuple[nn.Module, tuple[nn.Module, nn.Module] | None]:
    """The sharded model (fp32 masters) and, on rank 0, unsharded LlamaForCausalLM copies for save_pretrained: the
    weights in bf16, and in fp32."""
    config = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = nn.Module()
    model.llm = LlamaForCausalLM(config)
    references = None
    if dist.get_rank() == 0:
        references = copy.deepcopy(model.llm).to(DTYPE), copy.deepcopy(model.llm)
    for layer in model.llm.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, references


def _variants(a, model, references) -> list[tuple[str, int | None, Callable[[str], None]]]:
    shard_bytes = a.shard_mb * 10**6  # save_pretrained's "200MB" is 200 * 10**6 bytes

    def with_index(save):
        def run(out):
            index = save(out)
            if dist.get_rank() == 0:
                write_json(os.path.join(out, "model.safetensors.index.json"), index)

        return run

    def pretrained(out):
        if dist.get_rank() == 0:
            references[0].save_pretrained(out, max_shard_size=f"{a.shard_mb}MB")

    def pretrained_from_fp32(out):  # what a one-process save of fp32 masters pays: the cast, then the write
        if dist.get_rank() == 0:
            state = {k: v.to(DTYPE) for k, v in references[1].state_dict().items()}
            references[1].save_pretrained(out, state_dict=state, max_shard_size=f"{a.shard_mb}MB")

    return [("old", None, with_index(lambda out: old_save_shards(model, out, DTYPE, shard_bytes))),
            *(("new", b, with_index(lambda out, b=b: save_shards(model, out, DTYPE, shard_bytes, b * 2**20)))
              for b in a.buckets),
            ("save_pretrained", None, pretrained),
            ("save_pretrained from fp32", None, pretrained_from_fp32)]  # fmt: skip


def _table(rows: list[dict]) -> str:
    ref = {r["repeat"]: r["seconds"] for r in rows if r["what"] == "save_pretrained"}
    lines = ["| save (2 gloo ranks, bf16 shards) | bucket | time (s, median) | x save_pretrained (median of pairs) | "
             "rank 0 peak extra memory (MB, median) |", "|---|---|---|---|---|"]  # fmt: skip
    for what in dict.fromkeys((r["what"], r["bucket_mib"]) for r in rows):
        mine = [r for r in rows if (r["what"], r["bucket_mib"]) == what]
        ratio = statistics.median(r["seconds"] / ref[r["repeat"]] for r in mine)
        bucket = f"{what[1]} MiB" if what[1] else "-"
        lines.append(f"| {what[0]} | {bucket} | {statistics.median(r['seconds'] for r in mine):.2f} | {ratio:.2f} | "
                     f"{statistics.median(r['peak_extra_mb'] for r in mine):.0f} |")  # fmt: skip
    return "\n".join(lines)


def worker(rank: int, world: int, a) -> None:
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    hf_logging.disable_progress_bar()  # save_pretrained's
    dist.init_process_group("gloo", init_method=f"file://{a.out}/init", rank=rank, world_size=world)
    model, references = _build(a)
    if rank == 0:
        n = sum(p.numel() for p in references[1].parameters())
        print(f"# {n / 1e6:.0f}M parameters, {n * DTYPE.itemsize / 1e9:.2f} GB in bf16, max_shard_size {a.shard_mb}MB")
    variants = _variants(a, model, references)
    rows = []
    for repeat in range(-1, a.repeats):  # -1: a warm-up round (first-touch costs), not reported
        for what, bucket, save in variants:
            row = _measure(save, os.path.join(a.out, f"{what}-{bucket}"))
            if rank == 0 and repeat >= 0:
                rows.append({"what": what, "bucket_mib": bucket, "repeat": repeat, **row})
                print(json.dumps(rows[-1]), flush=True)
    if rank == 0:
        old = os.path.join(a.out, "old-None")
        for b in a.buckets:
            new = os.path.join(a.out, f"new-{b}")
            names = sorted(os.listdir(old))
            same = names == sorted(os.listdir(new))
            same = same and all(filecmp.cmp(os.path.join(old, n), os.path.join(new, n), shallow=False) for n in names)
            print(f"# new ({b} MiB buckets) files byte-identical to old's: {same} ({len(os.listdir(old)) - 1} shards)")
        print("\n" + _table(rows))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--buckets", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 256])
    p.add_argument("--shard_mb", type=int, default=200, help="max_shard_size in MB (10**6 bytes)")
    p.add_argument("--out", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    a = p.parse_args()
    scratch = a.out is None
    a.out = a.out or tempfile.mkdtemp(prefix="final_save-")
    os.makedirs(a.out, exist_ok=True)
    if os.path.exists(os.path.join(a.out, "init")):
        os.remove(os.path.join(a.out, "init"))  # a file:// rendezvous left by an earlier run
    try:
        mp.spawn(worker, args=(2, a), nprocs=2, join=True)
    finally:
        if scratch:
            shutil.rmtree(a.out, ignore_errors=True)


if __name__ == "__main__":
    main()
