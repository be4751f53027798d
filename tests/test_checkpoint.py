"""Checkpoints and resume. Multi-rank runs go through `torchrun --standalone --nproc_per_node 2 train.py` in a
subprocess (2 gloo ranks) so they can be SIGKILLed; API-level checks run in-process on one rank."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import build_llava_from_pretrained, flags, losses, write_llava_dataset
from dist import run_distributed
from safetensors.torch import load_file

import train
from minillava import distributed as D
from minillava.atomic import MARKER, complete_checkpoints
from minillava.checkpoint import CRASH_HOOK, Checkpointer
from minillava.config import parse_args
from minillava.data import DataCollator, LazySupervisedDataset, load_image_processor, load_tokenizer
from minillava.formats import load_mm_projector, read_settings, run_configs, to_llava_key
from minillava.gather import full_tensors
from minillava.model import build_llava_from_config
from minillava.optim import build_optimizer
from minillava.preemption import HOLD_HOOK
from minillava.resume import find_checkpoint, resume
from minillava.sampler import DistributedModalityLengthSampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2 = dict(max_steps=8, save_steps=2, save_total_limit=10)  # 16 samples / 4 per step: 2 epochs, saves 2,4,6,8
STAGE1 = dict(max_steps=6, save_steps=2, save_total_limit=2, dataloader_num_workers=1)  # 12 samples: 3 steps/epoch


@pytest.fixture(scope="module")
def data(assets):
    """test_train's assets plus a stage-2 dataset of image, multi-turn and text-only samples. (assets["data"] is not
    one: conftest.write_llava_dataset names its JSON after the last image, so the pretrain call overwrites it.)"""
    mixed, _ = write_llava_dataset(str(assets["root"] / "mixed"), n_image=12, n_text=4)
    with open(mixed) as f:  # same images as assets["images"]; only the JSON is used
        assert len(json.load(f)) == 16
    return {**assets, "data": mixed}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _launch(argv, log, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=log, stderr=subprocess.STDOUT)


def torchrun(argv, out, expect_ok=True, **env) -> str:
    """Run 2 ranks to completion; returns the log."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"log-{time.monotonic_ns()}.txt")
    with open(path, "w") as log:
        code = _launch(argv, log, **env).wait(timeout=300)
    with open(path) as f:
        text = f.read()
    assert (code == 0) == expect_ok, text[-4000:]
    return text


def final_weights(out):
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    return {k: v for name in files for k, v in load_file(os.path.join(out, name)).items()}


def assert_same_run(out, ref):
    assert losses(out) == losses(ref)  # steps 1..N, bit-identical
    a, b = final_weights(out), final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _main(rank, world, argv):
    train.main(argv)


# The uninterrupted reference runs, on 2 gloo ranks as torchrun's would be (bit for bit: the same ranks, data and
# reductions), without a launcher's start-up: the interrupted runs compared with them go through torchrun.
@pytest.fixture(scope="module")
def stage2_ref(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("s2ref"))
    run_distributed(_main, out, flags(data, out, **STAGE2))
    return out


@pytest.fixture(scope="module")
def stage1_ref(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("s1ref"))
    run_distributed(_main, out, flags(data, out, stage=1, **STAGE1))
    return out


@pytest.mark.dist
def test_stage1_resume_is_exact_and_rotation_keeps_newest(data, stage1_ref, tmp_path):
    """Checkpoint-4 (mid-epoch) + resume with a DataLoader worker == the uninterrupted run; limit 2 keeps 4 and 6."""
    assert [s for s, _ in complete_checkpoints(stage1_ref)] == [4, 6]
    assert sorted(n for n in os.listdir(stage1_ref) if n.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]
    ckpt = os.path.join(stage1_ref, "checkpoint-4")
    assert {"mm_projector.bin", "config.json", MARKER}.issubset(os.listdir(ckpt))
    out = str(tmp_path / "resumed")
    shutil.copytree(ckpt, os.path.join(out, "checkpoint-4"))
    shutil.copy(os.path.join(stage1_ref, "metrics.jsonl"), out)  # steps 5, 6 are dropped on resume, then re-logged
    log = torchrun(flags(data, out, stage=1, resume_from_checkpoint="auto", **STAGE1), out)
    assert "resumed from" in log and "step 4, epoch 1, micro-batch 1" in log
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
    assert losses(out) == losses(stage1_ref)
    a, b = (torch.load(os.path.join(d, "mm_projector.bin"), weights_only=True) for d in (out, stage1_ref))
    assert sorted(a) == [f"model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc). torchrun starts each rank in a session of its own, so killing
    torchrun's process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"  # exited (a zombie until reaped)
    except OSError:
        return True


def _run_until_killed(argv, out, marker_of: int) -> str:
    """Start 2 ranks, SIGKILL torchrun and both ranks once checkpoint-<marker_of> is complete; returns the log."""
    path = os.path.join(out, f"killed-{marker_of}.txt")
    with open(path, "w") as log:
        proc = _launch(argv, log)
        deadline = time.monotonic() + 240
        while not os.path.isfile(os.path.join(out, f"checkpoint-{marker_of}", MARKER)):
            assert proc.poll() is None and time.monotonic() < deadline, f"run ended before checkpoint-{marker_of}"
            time.sleep(0.02)
        tree = _process_tree(proc.pid)
        for pid in tree:  # kill -9 mid-run: steps and saves after this checkpoint are underway
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        assert len(tree) >= 3, f"expected torchrun and 2 ranks, found {tree}"
        while not all(map(_gone, tree)):
            assert time.monotonic() < deadline, "killed ranks did not exit"
            time.sleep(0.02)
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json")), "the run finished before the kill"
    with open(path) as f:
        return f.read()


@pytest.mark.dist
def test_kill_during_save_then_kill_9_resume_exactly(data, stage2_ref, tmp_path):
    """One 8-step stage-2 run, interrupted twice (one chain: each launch costs ~20 s of imports on 2 CPU cores):
    (a) both ranks die inside save 4, after its state is written but before COMPLETE (the CRASH_HOOK test hook):
        checkpoint-2 stays the newest complete checkpoint;
    (b) auto-resume takes checkpoint-2; that run is SIGKILLed (torchrun and both ranks) once checkpoint-4 is done;
    (c) auto-resume again to the end: losses of steps 1..8 and the final weights equal the uninterrupted run's."""
    out = str(tmp_path / "o")
    argv = flags(data, out, **STAGE2)
    torchrun(argv, out, expect_ok=False, **{CRASH_HOOK: "4"})
    assert [s for s, _ in complete_checkpoints(out)] == [2]
    (partial,) = [n for n in os.listdir(out) if n.startswith("checkpoint-4")]
    assert ".tmp-" in partial and not os.path.exists(os.path.join(out, partial, MARKER))
    argv += ["--resume_from_checkpoint", "auto"]
    assert "resumed from " + os.path.join(out, "checkpoint-2") in _run_until_killed(argv, out, marker_of=4)
    assert not os.path.exists(os.path.join(out, partial))  # the next save cleared the leftover
    torchrun(argv, out)
    assert_same_run(out, stage2_ref)



def _wait_for(proc, what, ready, deadline):
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, f"run ended before {what}"
        time.sleep(0.02)


@pytest.mark.dist
def test_sigterm_and_a_dead_agent_stop_with_a_checkpoint_then_resume_exactly(data, stage2_ref, tmp_path):
    """Preemption under torchrun, one chain of the same 8-step stage-2 run (saves every 2 steps):
    (a) SIGTERM to torchrun once checkpoint-2 is complete (what SLURM / Kubernetes send), the ranks held before step
        3 until it lands (HOLD_HOOK: however loaded the machine, no later step is reached first): torchrun forwards
        it, both ranks finish step 3, write checkpoint-3 and exit 143 with the resume command;
    (b) auto-resume from k, and torchrun SIGKILLed alone as the run starts (its ranks live on in their own
        sessions; they used to train to the end with no agent): the ranks notice, save checkpoint-j and exit;
    (c) auto-resume to the end: losses of steps 1..8 and the final weights equal the uninterrupted run's."""
    out = str(tmp_path / "o")
    argv = flags(data, out, **STAGE2)
    os.makedirs(out)
    with open(os.path.join(out, "sigterm.txt"), "w") as log:
        proc = _launch(argv, log, **{HOLD_HOOK: "3"})
        deadline = time.monotonic() + 240
        _wait_for(proc, "checkpoint-2", lambda: os.path.isfile(os.path.join(out, "checkpoint-2", MARKER)), deadline)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) != 0
    with open(os.path.join(out, "sigterm.txt")) as f:
        text = f.read()
    steps = [s for s, _ in complete_checkpoints(out)]
    assert steps == [2, 3], (steps, text[-3000:])
    k = 3
    assert f"stopped after step {k} of 8 (SIGTERM): saved {os.path.join(out, f'checkpoint-{k}')}; to continue" in text
    argv += ["--resume_from_checkpoint", "auto"]
    with open(os.path.join(out, "agent.txt"), "w") as log:
        proc = _launch(argv, log)
        deadline = time.monotonic() + 240

        def started():
            with open(os.path.join(out, "agent.txt")) as f:
                return "LLaVA's finetune.sh with" in f.read()  # rank 0 printed the config: the loop is ahead

        _wait_for(proc, "start-up", started, deadline)
        ranks = [pid for pid in _process_tree(proc.pid) if pid != proc.pid]
        proc.kill()
        proc.wait()
        assert len(ranks) >= 2, ranks
        while not all(map(_gone, ranks)):
            assert time.monotonic() < deadline, "the ranks went on without their agent"
            time.sleep(0.05)
    with open(os.path.join(out, "agent.txt")) as f:
        text = f.read()
    j = [s for s, _ in complete_checkpoints(out)][-1]
    assert k < j < 8 and "the torchrun agent (pid" in text and f"stopped after step {j} of 8" in text, text[-3000:]
    torchrun(argv, out)
    assert_same_run(out, stage2_ref)


@pytest.mark.dist
def test_two_nodes_equal_one_node(data, stage2_ref, tmp_path):
    """Two torchrun agents on this machine as two "nodes" (--nnodes 2 --nproc_per_node 1, c10d rendezvous on
    127.0.0.1), as the README's multi-node command runs them: the same losses and final weights as one node with 2
    processes (the reference run), since the ranks, the sampler's shards and the reductions are the same."""
    import socket

    out = str(tmp_path / "o")
    os.makedirs(out)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", *rendezvous,
           "train.py", *flags(data, out, **STAGE2)]  # fmt: skip
    logs = [open(os.path.join(out, f"node{i}.txt"), "w") for i in range(2)]  # noqa: SIM115
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT) for log in logs]
    codes = [node.wait(timeout=300) for node in nodes]
    for log in logs:
        log.close()
    with open(os.path.join(out, "node0.txt")) as f0, open(os.path.join(out, "node1.txt")) as f1:
        assert codes == [0, 0], f0.read()[-3000:] + f1.read()[-3000:]
    assert_same_run(out, stage2_ref)

# LLaVA key prefix -> ours, the longest "model." prefixes first (the inverse of to_llava_key).
FROM_LLAVA = (
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.mm_projector.", "mm_projector."),
    ("lm_head.", "llm.lm_head."),
    ("model.", "llm.model."),
)


def _llava_to_ours(key: str) -> str:
    for theirs, ours in FROM_LLAVA:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    raise AssertionError(f"{key} is not a LLaVA key")


def _batch(data, cfg):
    tok = load_tokenizer(data["llm"], cfg.train.model_max_length)
    ds = LazySupervisedDataset(
        data["data"], tok, load_image_processor(data["clip"]), image_folder=data["images"], version="v1",
        image_aspect_ratio=cfg.data.image_aspect_ratio, model_max_length=cfg.train.model_max_length,
    )  # fmt: skip
    collate = DataCollator(pad_token_id=tok.pad_token_id, model_max_length=cfg.train.model_max_length)
    return collate([ds[i] for i in (1, 13)])  # a two-turn image sample and a text-only one


def _logits(model, batch):
    """Logits at the real positions. Padded query rows carry no loss, and HF's SDPA mask (the reference model) and
    minillava's (the reloaded one, attention.padded_sdpa_forward) fill them differently."""
    with torch.no_grad():
        embeds, _, mask, pos = model.embed_inputs(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        return model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[mask]


@pytest.mark.dist
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load(no_dist=True) says so
def test_stage2_folder_reloads_with_the_trained_logits(data, stage2_ref):
    """The HF folder, read back with LLaVA's key names and config.json only, gives the logits of the trained model
    (pretrained frozen weights + the trainable params of the final sharded checkpoint, resharded 2 ranks -> 1)."""
    cfg = parse_args(flags(data, stage2_ref, **STAGE2))
    with open(os.path.join(stage2_ref, "config.json")) as f:
        conf = json.load(f)
    assert conf["model_type"] == "llava_llama" and conf["dtype"] == "float32" and conf["mm_hidden_size"] == 32
    from transformers import CLIPVisionConfig, LlamaConfig

    settings = read_settings(stage2_ref)  # LLaVA's mm_* fields of config.json
    reloaded = build_llava_from_config(
        LlamaConfig.from_pretrained(stage2_ref), CLIPVisionConfig.from_pretrained(conf["mm_vision_tower"]), settings
    )
    state = final_weights(stage2_ref)
    assert all(k.startswith(("model.", "lm_head.")) for k in state)
    assert {to_llava_key(k) for k in reloaded.state_dict()} == set(state)  # LLaVA names, nothing missing or extra
    reloaded.load_state_dict({_llava_to_ours(k): v for k, v in state.items()}, strict=True)
    trained = build_llava_from_pretrained(data["llm"], data["clip"], mm_projector_type="mlp2x_gelu",
                                          mm_vision_select_layer=-2, model_max_length=64)  # fmt: skip
    sd = {k: v for k, v in trained.state_dict().items() if not k.startswith("vision_tower.")}
    dcp.load({"model": sd}, checkpoint_id=os.path.join(stage2_ref, "checkpoint-8"), no_dist=True)
    trained.load_state_dict(sd, strict=False)
    batch = _batch(data, cfg)
    assert torch.equal(_logits(reloaded, batch), _logits(trained, batch))
    assert {"tokenizer.model", "tokenizer_config.json", "generation_config.json"}.issubset(os.listdir(stage2_ref))


def test_mm_projector_bin_loads_fresh_and_as_pretrain_adapter(data, stage1_ref, tmp_path):
    path = os.path.join(stage1_ref, "mm_projector.bin")
    saved = torch.load(path, weights_only=True)
    fresh = build_llava_from_pretrained(data["llm"], data["clip"], mm_projector_type="mlp2x_gelu")
    load_mm_projector(fresh, path)
    assert all(torch.equal(fresh.mm_projector.state_dict()[k.split("mm_projector.")[1]], v) for k, v in saved.items())
    cfg = parse_args(flags(data, str(tmp_path / "o"), pretrain_mm_mlp_adapter=path))
    info = D.init_distributed()
    try:
        model, _ = train.build_model(cfg, info, run_configs(cfg))  # the --pretrain_mm_mlp_adapter path, sharded
        full = {k: v.full_tensor() for k, v in model.mm_projector.state_dict().items()}
    finally:
        D.cleanup(info)
    assert all(torch.equal(full[k.split("mm_projector.")[1]], v) for k, v in saved.items())


def test_refuses_changed_global_batch_or_dataset(data, stage2_ref, tmp_path):
    out = str(tmp_path / "o")
    shutil.copytree(os.path.join(stage2_ref, "checkpoint-8"), os.path.join(out, "checkpoint-8"))
    incomplete = os.path.join(out, "checkpoint-10")
    shutil.copytree(os.path.join(out, "checkpoint-8"), incomplete, ignore=shutil.ignore_patterns(MARKER))
    with pytest.raises(ValueError, match="checkpoint-10: not a complete checkpoint"):
        train.main(flags(data, out, resume_from_checkpoint=incomplete, **STAGE2))
    with pytest.raises(ValueError, match=r"was 2 x 1 x 2 = 4, now 1 x 1 x 2 = 2"):  # 1 rank instead of 2
        train.main(flags(data, out, resume_from_checkpoint="auto", **STAGE2))
    with pytest.raises(ValueError, match=r"the dataset had 16 samples, now 12"):  # 1 rank x GA 2: same batch
        train.main(flags(data, out, resume_from_checkpoint="auto", gradient_accumulation_steps=2,
                         data_path=data["pretrain"], **STAGE2))  # fmt: skip


def test_find_checkpoint_takes_only_complete_ones(tmp_path):
    out = str(tmp_path)
    assert find_checkpoint("auto", out) is None and find_checkpoint(None, out) is None
    for step, done in ((2, True), (4, True), (6, False)):
        os.makedirs(os.path.join(out, f"checkpoint-{step}"))
        if done:
            open(os.path.join(out, f"checkpoint-{step}", MARKER), "w").close()
    os.makedirs(os.path.join(out, "checkpoint-8.tmp-abc"))
    open(os.path.join(out, "checkpoint-8.tmp-abc", MARKER), "w").close()  # killed between marker and rename
    assert complete_checkpoints(out) == [(2, os.path.join(out, "checkpoint-2")), (4, os.path.join(out, "checkpoint-4"))]
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_checkpoint(os.path.join(out, "checkpoint-6"), out)
    # (find_checkpoint also checks the files of a complete one: test_checkpoint_faults.py)


def _step(model, optimizer, scheduler, batch, drop=None):
    loss_sum, n = model(**model.layout(batch))
    (loss_sum / n).backward()
    if drop:  # as if this param had not been used yet: no gradient, so AdamW creates no state for it
        dict(model.named_parameters())[drop].grad = None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _build(cfg, info):
    """The model, optimizer, scheduler and Checkpointer of a 3-step run on 16 samples, as train.main makes them."""
    model, _ = train.build_model(cfg, info, run_configs(cfg))
    optimizer, scheduler = build_optimizer(model, cfg.train, 3)
    sampler = DistributedModalityLengthSampler([1] * 16, 2, 1, 0)
    return model, optimizer, scheduler, Checkpointer(cfg, model, optimizer, scheduler, sampler, 16, None)


def test_resume_when_some_params_have_no_optimizer_state(data, tmp_path):
    """checkpoint-0: saved before any optimizer step; checkpoint-1: one param never had a gradient. Both resume to
    the same weights as the uninterrupted run (no placeholder AdamW state, whose step count would differ)."""
    out, unused = str(tmp_path / "o"), "mm_projector.2.bias"
    cfg = parse_args(flags(data, out, max_steps=3, save_total_limit=5))
    info = D.init_distributed()
    try:
        batch = _batch(data, cfg)
        model, optimizer, scheduler, ckpt = _build(cfg, info)
        ckpt.save(0)
        assert not optimizer.state  # saving did not create (step-count-changing) state
        _step(model, optimizer, scheduler, batch, drop=unused)
        ckpt.save(1)
        _step(model, optimizer, scheduler, batch)
        ckpt.wait()  # checkpoint-1 was written in the background while that step changed the weights
        expected = {k: v.clone() for k, v in full_tensors(model)}
        for start in (0, 1):
            cfg.train.resume_from_checkpoint = os.path.join(out, f"checkpoint-{start}")
            model, optimizer, scheduler, ckpt = _build(cfg, info)
            assert resume(ckpt) == start
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            has_state = {n for n, p in model.named_parameters() if p in optimizer.state}
            assert has_state == (set() if start == 0 else trainable - {unused})
            for s in range(start, 2):
                _step(model, optimizer, scheduler, batch, drop=unused if s == 0 else None)
            for k, v in full_tensors(model):
                assert torch.equal(v, expected[k]), k
    finally:
        D.cleanup(info)


@pytest.mark.parametrize("background", [True, False])
def test_a_save_is_written_while_training_goes_on(data, tmp_path, monkeypatch, background):
    """--async_save (default): save() returns with the write still held back (DCP's write_data waits on a gate), a
    step changes the weights, and the checkpoint, published once the write ends, resumes to the weights at the
    save, not the later ones: the state was copied to host memory at save(). --async_save False: published at once."""
    out = str(tmp_path / "o")
    cfg = parse_args(flags(data, out, max_steps=3, async_save=background))
    gate, write_data = threading.Event(), dcp.FileSystemWriter.write_data
    if background:
        monkeypatch.setattr(dcp.FileSystemWriter, "write_data", lambda *a, **k: gate.wait(60) and write_data(*a, **k))
    info = D.init_distributed(background=background)
    try:
        batch = _batch(data, cfg)
        model, optimizer, scheduler, ckpt = _build(cfg, info)
        _step(model, optimizer, scheduler, batch)
        saved = {k: v.clone() for k, v in full_tensors(model)}
        path = ckpt.save(1)
        assert os.path.isfile(os.path.join(path, MARKER)) != background
        _step(model, optimizer, scheduler, batch)
        assert any(not torch.equal(v, saved[k]) for k, v in full_tensors(model))
        gate.set()
        ckpt.wait()
        ckpt.close()
        assert complete_checkpoints(out) == [(1, path)]
        cfg.train.resume_from_checkpoint = path
        model, optimizer, scheduler, ckpt = _build(cfg, info)
        assert resume(ckpt) == 1
        for k, v in full_tensors(model):
            assert torch.equal(v, saved[k]), k
    finally:
        D.cleanup(info)


def test_async_saves_at_every_step_then_resume_from_the_last_is_exact(data, tmp_path):
    """--async_save (the default) with a checkpoint after every step of a 4-step run: the host buffers are staged
    after step 1 and restaged by each of the four saves (torch 2.11 and 2.12's DefaultStager failed the second stage),
    every checkpoint is published, and a run resumed from checkpoint-3 trains step 4 to the same loss and weights."""
    out = str(tmp_path / "o")
    argv = flags(data, out, max_steps=4, save_steps=1, save_total_limit=10)
    train.main(argv)
    assert [s for s, _ in complete_checkpoints(out)] == [1, 2, 3, 4]
    first, weights = losses(out), final_weights(out)
    train.main([*argv, "--resume_from_checkpoint", os.path.join(out, "checkpoint-3")])
    assert losses(out) == first and len(first) == 4
    resumed = final_weights(out)
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)


def _resumed_from(checkpoint, out, argv):
    os.makedirs(out)
    shutil.copytree(checkpoint, os.path.join(out, os.path.basename(checkpoint)))
    train.main([*argv, "--output_dir", out, "--resume_from_checkpoint", "auto"])
    return losses(out)


def _dist_resume(rank, world, checkpoint, out, argv):
    if rank == 0:
        os.makedirs(out)
        shutil.copytree(checkpoint, os.path.join(out, os.path.basename(checkpoint)))
    torch.distributed.barrier()
    train.main([*argv, "--output_dir", out, "--resume_from_checkpoint", "auto"])


@pytest.mark.dist
def test_every_split_of_the_global_batch_resumes_at_the_next_unseen_sample(data, tmp_path):
    """One global batch of 4 split as 1 rank x 4, 1 x GA 2 x 2, 1 x GA 4 x 1 and 2 ranks x 2: resumed mid-epoch from
    the first one's checkpoint-3 (16 samples: 4 steps an epoch), each continues with the uninterrupted run's losses
    (global_token: the loss of a step does not depend on its split). The saved position counted micro-batches of the
    old split: GA 2 trained step 3's samples again and skipped others."""
    common = dict(max_steps=6, save_steps=3, save_total_limit=2, logging_steps=1, loss_reduction="global_token")
    ref = str(tmp_path / "ref")
    train.main(flags(data, ref, per_device_train_batch_size=4, **common))
    checkpoint, want = os.path.join(ref, "checkpoint-3"), losses(ref)[3:]
    for batch, ga in ((2, 2), (1, 4)):
        argv = [a for a in flags(data, "x", per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                                 **common) if a not in ("--output_dir", "x")]  # fmt: skip
        torch.testing.assert_close(_resumed_from(checkpoint, str(tmp_path / f"{batch}x{ga}"), argv), want,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    argv = [a for a in flags(data, "x", per_device_train_batch_size=2, **common) if a not in ("--output_dir", "x")]
    run_distributed(_dist_resume, tmp_path, checkpoint, str(tmp_path / "two"), argv)
    torch.testing.assert_close(losses(str(tmp_path / "two")), want, rtol=1e-5, atol=1e-5)


def test_a_changed_order_mid_epoch_is_refused_and_a_longer_run_takes_the_new_schedule(data, stage2_ref, tmp_path):
    """Mid-epoch (checkpoint-6: step 2 of 4 in epoch 2) a changed --seed or --group_by_modality_length would re-deal
    the epoch (samples trained twice, others never): refused, naming the flag; at an epoch boundary it is allowed.
    A finished run resumed with a longer --max_steps takes the new schedule from its first resumed step (it used the
    old schedule's end, lr 0)."""
    out = str(tmp_path / "o")
    for name in ("checkpoint-6", "checkpoint-8"):
        shutil.copytree(os.path.join(stage2_ref, name), os.path.join(out, name))
    six = os.path.join(out, "checkpoint-6")
    for flag, value, saved in (("seed", "7", "42"), ("group_by_modality_length", "False", "True")):
        with pytest.raises(ValueError, match=rf"--{flag} {value} changes the order of the epoch under way; the "
                                             rf"checkpoint was trained with --{flag} {saved}: pass that \(it may "
                                             r"change at an epoch boundary\)"):  # fmt: skip
            train.main(flags(data, out, resume_from_checkpoint=six, gradient_accumulation_steps=2, **{flag: value},
                             **STAGE2))  # fmt: skip
    longer = {**STAGE2, "max_steps": 12, "logging_steps": 1}
    train.main(flags(data, out, resume_from_checkpoint="auto", gradient_accumulation_steps=2, seed=7, **longer))
    full = str(tmp_path / "full")
    train.main(flags(data, full, gradient_accumulation_steps=2, **{**longer, "save_steps": 0}))
    def lr(path):
        with open(os.path.join(path, "metrics.jsonl")) as f:
            return {r["step"]: r["lr"] for r in map(json.loads, f)}

    assert lr(out)[9] == lr(full)[9] > 0
