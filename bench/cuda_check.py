"""End-to-end check of the real CLI on one device: `python train.py` stage 1 then stage 2 (from stage 1's
mm_projector.bin) on the demo's tiny assets, --bf16 True, padded and then packed (--padding_free True).

    python bench/cuda_check.py --work /tmp/cuda_check      # one JSON line per run, then a verdict line

On a GPU this is the first thing to run: it exercises NCCL collectives, FSDP2 in bf16, the varlen kernel, DCP
checkpoints and the final saves exactly as a user's run does. On the CPU (the dry run of gpu_session.sh) it runs the
same commands. The verdict fails on a non-zero exit, a non-finite loss, a missing output or checkpoint (one every
2 steps), or packed and padded runs whose losses disagree while the weights are still the same ones (the first two
steps: the first runs at lr 0).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from minillava.atomic import complete_checkpoints  # noqa: E402
from minillava.demo import STAGE1_FLAGS, STAGE2_FLAGS, make_demo_assets  # noqa: E402

OUTPUTS = {1: "mm_projector.bin", 2: "model.safetensors.index.json"}
SAVE_STEPS = 2  # mid-run checkpoints, written in the background as a user's run writes them
BF16_RTOL = 3e-2  # packed (varlen kernel) vs padded (causal SDPA) in bf16, same weights


def run(work: str, stage: int, packing: bool, max_steps: int, timeout: int) -> dict:
    """One train.py run; returns its record (exit code, seconds, losses, outputs present)."""
    name = f"{'packed' if packing else 'padded'}_stage{stage}"
    out = os.path.join(work, name)
    flags = {k: v.format(out=work) for k, v in (STAGE1_FLAGS if stage == 1 else STAGE2_FLAGS).items()}
    flags.update(output_dir=out, bf16="True", padding_free=str(packing), max_steps=str(max_steps), logging_steps="1",
                 save_steps=str(SAVE_STEPS))  # fmt: skip (background DCP checkpoints, pinned staging, gloo group)
    if stage == 2:
        flags["pretrain_mm_mlp_adapter"] = os.path.join(work, name.replace("stage2", "stage1"), OUTPUTS[1])
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *(x for k, v in flags.items() for x in (f"--{k}", v))]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        rc, tail = proc.returncode, proc.stderr[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", f"no exit after {timeout} s"
    losses = []
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            losses = [json.loads(line)["loss"] for line in f]
    record = {"what": "cuda_check", "run": name, "rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    record.update(losses=losses, output=os.path.exists(os.path.join(out, OUTPUTS[stage])))
    record["checkpoints"] = [step for step, _ in complete_checkpoints(out)]
    if rc != 0:
        record["stderr_tail"] = tail
    return record


def verdict(records: list[dict], max_steps: int) -> dict:
    problems = []
    by_name = {r["run"]: r for r in records}
    for r in records:
        if r["rc"] != 0 or not r["output"] or len(r["losses"]) != max_steps:
            problems.append(f"{r['run']}: rc {r['rc']}, {len(r['losses'])} steps logged, output {r['output']}")
        elif not all(map(math.isfinite, r["losses"])):
            problems.append(f"{r['run']}: non-finite loss {r['losses']}")
        if r["checkpoints"][-1:] != [max_steps - max_steps % SAVE_STEPS]:  # the newest (the presets keep one)
            problems.append(f"{r['run']}: complete checkpoints {r['checkpoints']}, saved every {SAVE_STEPS} steps")
    for stage in (1, 2):
        padded, packed = by_name.get(f"padded_stage{stage}"), by_name.get(f"packed_stage{stage}")
        if padded and packed and padded["losses"][:2] and packed["losses"][:2]:
            for a, b in zip(padded["losses"][:2], packed["losses"][:2], strict=False):
                if abs(a - b) > BF16_RTOL * abs(a):
                    problems.append(f"stage {stage}: padded loss {a:.5f} vs packed {b:.5f} on the same weights")
    return {"what": "cuda_check_verdict", "ok": not problems, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the demo assets and the four runs' outputs")
    ap.add_argument("--max_steps", type=int, default=4)
    ap.add_argument("--n_train", type=int, default=64, help="demo training images (each stage trains on them)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per train.py run")
    args = ap.parse_args(argv)
    make_demo_assets(args.work, n_train=args.n_train, n_eval=4)
    records = []
    for packing in (False, True):
        for stage in (1, 2):
            records.append(run(args.work, stage, packing, args.max_steps, args.timeout))
            print(json.dumps(records[-1]), flush=True)
    result = verdict(records, args.max_steps)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
