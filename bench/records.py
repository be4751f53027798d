"""Host memory of the training records at LLaVA-665K scale, ours beside LLaVA's json.load (CPU only):

    python bench/records.py [--records 665298] [--out bench_out/records]

Writes a synthetic LLaVA-format JSON of --records samples (about 2 KB each, like llava_v1_5_mix665k.json's
1.36 GB; 6% text-only), then measures, each in a fresh process:
  json.load + lengths (LLaVA's LazySupervisedDataset): load time, peak and resident memory (RSS);
  load_records, first run (builds the records cache) and second run (reads it): the same figures;
  one epoch in a forked DataLoader-like worker reading every record: the worker's private memory growth
  (the pages it stops sharing with its parent; reference counts make a json.load list's pages private).
Prints one JSON line per measurement and a markdown table (BENCHMARKS.md, "Host memory and I/O")."""

import argparse
import json
import os
import random
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("the", "a", "of", "shape", "image", "colour", "red", "blue", "picture", "left", "right", "small", "large",
         "what", "is", "there", "in", "this", "photo")


def write_dataset(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            turns = []
            for t in range(rng.choice((2, 4, 6))):
                words = " ".join(rng.choices(WORDS, k=rng.randint(20, 90)))
                turns.append({"from": "gpt" if t % 2 else "human", "value": ("<image>\n" if t == 0 else "") + words})
            record = {"id": f"{i:09d}", "conversations": turns}
            if rng.random() > 0.06:
                record["image"] = f"coco/train2017/{i:012d}.jpg"
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _private_mb(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith(" "))
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty") if k in fields) / 1024


def _epoch_growth(touch) -> float:
    """Fork a worker that reads every record once; its private memory after minus before, in MB."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        before = _private_mb(os.getpid())
        touch()
        os.write(write, json.dumps(_private_mb(os.getpid()) - before).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        growth = json.loads(f.read())
    os.waitpid(pid, 0)
    return growth


def measure(kind: str, path: str) -> dict:
    """One measurement in this (fresh) process; memory is counted from after the imports (torch alone is more)."""
    from minillava.data import load_records, word_count

    base, t0 = _rss_mb(), time.perf_counter()
    if kind == "json.load":
        with open(path) as f:
            records = json.load(f)
        lengths = [word_count(r) if "image" in r else -word_count(r) for r in records]

        def touch():
            for r in records:
                r["conversations"][0]["value"]  # what __getitem__ reads
    else:
        records = load_records(path)
        lengths = records.words

        def touch():
            for i in range(len(records)):
                records[i]["conversations"][0]["value"]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    out = {"what": kind, "records": len(records), "lengths": len(lengths), "load_s": round(seconds, 2),
           "peak_mb": round(peak), "resident_mb": round(_rss_mb() - base)}  # fmt: skip
    out["epoch_worker_growth_mb"] = round(_epoch_growth(touch), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=665298)
    p.add_argument("--out", default="bench_out/records")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    a = p.parse_args()
    path = os.path.join(a.out, "data.json")
    if a.measure:
        print(json.dumps(measure(a.measure, path)))
        return
    import subprocess

    os.makedirs(a.out, exist_ok=True)
    os.environ["MINILLAVA_CACHE"] = os.path.join(a.out, "cache")  # a fresh cache: the first run builds it
    t0 = time.perf_counter()
    write_dataset(path, a.records)
    print(f"# wrote {a.records} records, {os.path.getsize(path) / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
    rows = []
    for kind, label in (("json.load", "LLaVA: json.load + lengths"), ("records", "ours, first run (builds the cache)"),
                        ("records", "ours, later runs (cache read)")):  # fmt: skip
        line = subprocess.run([sys.executable, __file__, "--out", a.out, "--measure", kind], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]  # fmt: skip
        row = {**json.loads(line), "label": label}
        print(json.dumps(row))
        rows.append(row)
    print("\n| records | load time (s) | peak memory (MB) | resident after load (MB) | worker growth per epoch (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['load_s']} | {r['peak_mb']} | {r['resident_mb']} | {r['epoch_worker_growth_mb']} |")


if __name__ == "__main__":
    main()
