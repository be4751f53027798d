"""LoRA finetuning as LLaVA's scripts/v1_5/finetune_lora.sh runs it (--lora_enable True): the trainable set and
parameter groups, the LLaVA/peft output layout, the merge into a stage-2 folder, exact resume, and FSDP2 on 2 ranks."""

import json
import os
import shlex

import pytest
import torch
from conftest import flags, losses, make_tiny_llava, mm_projector_state_dict, trainer_parts
from dist import run_distributed

import train
from minillava import distributed as D
from minillava.config import parse_args
from minillava.gather import full_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_SH = os.path.join(ROOT, "configs", "llava_v15_7b_lora.sh")


def script_flags(path: str) -> list[str]:
    with open(path) as f:
        lines = [ln.strip().removesuffix("\\") for ln in f.read().splitlines()]
    return [tok for ln in lines if ln.startswith("--") for tok in shlex.split(ln)]


@pytest.fixture(scope="module")
def adapter(assets, tmp_path_factory):
    """A stage-1 mm_projector.bin for the tiny models (what --stage 1 writes), for stage 2 to start from."""
    path = str(tmp_path_factory.mktemp("stage1") / "mm_projector.bin")
    torch.save(mm_projector_state_dict(make_tiny_llava()), path)
    return path


DROP = ("--init_projector", "--learning_rate")  # the script's lr (2e-4, projector 2e-5) stays


def lora_argv(assets, out, adapter, **over):
    """finetune_lora.sh's flag list, then the tiny run's paths and sizes (later flags win)."""
    tiny = {k: v for k, v in zip(*[iter(flags(assets, out, **over))] * 2, strict=True) if k not in DROP}
    tiny |= {"--pretrain_mm_mlp_adapter": adapter, "--report_to": "none", "--dataloader_num_workers": "0"}
    tiny.pop("--stage")
    return script_flags(LORA_SH) + [tok for kv in tiny.items() for tok in kv]


@pytest.fixture(scope="module")
def lora_run(assets, adapter, tmp_path_factory):
    """finetune_lora.sh on the tiny models, 3 steps (bf16, checkpointing, zero3), a checkpoint at step 2."""
    out = str(tmp_path_factory.mktemp("lora") / "out")
    argv = lora_argv(assets, out, adapter, bf16="True", save_steps="2", lora_r="8", lora_alpha="16")
    train.main(argv)
    return {"out": out, "argv": argv}


def test_finetune_lora_script_parses_as_llava(assets, tmp_path):
    t = parse_args(script_flags(LORA_SH)).train
    assert (t.lora_enable, t.lora_r, t.lora_alpha, t.lora_dropout, t.lora_bias) == (True, 128, 256, 0.05, "none")
    assert (t.learning_rate, t.mm_projector_lr, t.reshard_after_forward, t.gradient_checkpointing) == (
        2e-4, 2e-5, True, True)  # fmt: skip
    with open(LORA_SH) as a, open(os.path.join(ROOT, "configs", "llava_v15_7b_stage2.sh")) as b:
        ours, stage2 = a.read().splitlines(), b.read().splitlines()
    # finetune_lora.sh is finetune.sh plus one flag line, another output_dir and lr 2e-4
    assert [x for x in ours if x not in stage2] == [
        "    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \\",
        "    --output_dir ./checkpoints/llava-v1.5-7b-lora \\",
        "    --learning_rate 2e-4 \\",
    ]


@pytest.mark.parametrize("bits", ["4", "8"])
def test_qlora_bits_are_refused(bits):
    with pytest.raises(ValueError, match=rf"--bits '{bits}': QLoRA .* not supported"):
        parse_args([*script_flags(LORA_SH), "--bits", bits])


def test_only_adapters_and_projector_train(assets, adapter, tmp_path):
    """LLaVA's trainable set (adapters on q/k/v/o/gate/up/down of every block, the projector; never lm_head,
    embeddings, norms or the tower) and create_optimizer's groups (projector at mm_projector_lr); after two steps
    exactly those tensors changed, the frozen base is bf16 and the adapters' masters fp32."""
    cfg = parse_args(lora_argv(assets, str(tmp_path / "o"), adapter, bf16="True", lora_r="4", warmup_ratio="0"))
    info = D.init_distributed()
    try:
        model, optimizer, scheduler, stream = trainer_parts(cfg, info, 2)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        expected = {f"llm.model.layers.{i}.{'self_attn' if x[0] in 'qkvo' else 'mlp'}.{x}.lora_{ab}.weight"
                    for i in range(2) for x in linears for ab in "AB"}  # fmt: skip
        projector = {f"mm_projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
        assert trainable == expected | projector
        assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in model.parameters())
        groups = {g["name"]: (len(g["params"]), g["lr"]) for g in optimizer.param_groups}
        assert groups == {"decay": (28, 2e-4), "projector_decay": (2, 2e-5), "projector_no_decay": (2, 2e-5)}
        before = {k: v.clone() for k, v in full_tensors(model)}
        for _ in range(2):
            train.train_step(model, [next(stream)[1]], optimizer, scheduler, cfg)
        after = dict(full_tensors(model))
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        # lora_A moves only once lora_B is non-zero (step 2); every lora_B and the projector move at step 1
        assert changed == expected | projector
    finally:
        D.cleanup(info)


def test_finetune_lora_runs_and_writes_llavas_layout(lora_run):
    out = lora_run["out"]
    assert all(x == x and x < 100 for x in losses(out)) and len(losses(out)) == 3
    names = set(os.listdir(out))
    assert {"config.json", "adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin"} <= names
    with open(os.path.join(out, "config.json")) as f:
        conf = json.load(f)
    assert conf["model_type"] == "llava_llama" and conf["mm_projector_type"] == "mlp2x_gelu"
    assert conf["mm_projector_lr"] == 2e-5
    non_lora = torch.load(os.path.join(out, "non_lora_trainables.bin"), weights_only=True)
    assert sorted(non_lora) == [
        f"base_model.model.model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")
    ]


def _our_lora_model(assets, out):
    """Our LlavaModel from the base folders with the LoRA output's adapters and projector (fp32, eval)."""
    from conftest import build_llava_from_pretrained

    from minillava.formats import read_lora_output
    from minillava.lora import add_lora

    conf, adapters, non_lora = read_lora_output(out)
    model = build_llava_from_pretrained(assets["llm"], assets["clip"])
    add_lora(model.llm.model, conf["r"], conf["lora_alpha"], conf["lora_dropout"])
    missing, unexpected = model.load_state_dict(adapters | non_lora, strict=False)
    assert not unexpected and not any("lora_" in k or "mm_projector" in k for k in missing)
    return model.eval()


def _inputs(vocab=512):
    from minillava.constants import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    ids[:, 3] = IMAGE_TOKEN_INDEX
    return ids, torch.ones_like(ids, dtype=torch.bool), torch.randn(2, 3, 28, 28, generator=g)


@torch.no_grad()
def _logits(model, ids, mask, pixels):
    embeds, _, attn, pos = model.embed_inputs(ids, mask, pixels)
    return model.llm(inputs_embeds=embeds, attention_mask=attn, position_ids=pos).logits


def test_peft_loads_the_adapters_onto_the_base_llm(assets, lora_run):
    """PeftModel.from_pretrained(tiny base LlamaForCausalLM, output_dir) computes our LoRA LLM's logits; the trained
    adapters are not zero (so the check has teeth)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ours = _our_lora_model(assets, lora_run["out"])
    assert any(m.lora_B.weight.abs().sum() > 0 for m in ours.modules() if hasattr(m, "lora_B"))
    base = LlamaForCausalLM.from_pretrained(assets["llm"], dtype=torch.float32, attn_implementation="sdpa")
    peft_model = PeftModel.from_pretrained(base, lora_run["out"]).eval()
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours.llm(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
        plain = LlamaForCausalLM.from_pretrained(assets["llm"], dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)  # the adapters change the base model's logits


def test_merged_folder_equals_the_unmerged_model(assets, lora_run, tmp_path):
    """export --merge_lora writes a stage-2 folder: generate's loader reads it and its logits (images spliced) equal
    those of the unmerged LoRA model; the llava-hf export reads it too; generate on the LoRA folder itself says
    to merge first."""
    from minillava import export
    from minillava.generate import load_model

    merged = str(tmp_path / "merged")
    export.main(["--merge_lora", lora_run["out"], "--output", merged, "--dtype", "float32"])
    model, settings = load_model(merged)
    assert settings.mm_projector_type == "mlp2x_gelu"
    ids, mask, pixels = _inputs()
    unmerged = _logits(_our_lora_model(assets, lora_run["out"]), ids, mask, pixels)
    torch.testing.assert_close(_logits(model, ids, mask, pixels), unmerged, rtol=1e-5, atol=1e-5)
    export.main(["--checkpoint", merged, "--output", str(tmp_path / "hf")])
    assert os.path.isfile(tmp_path / "hf" / "config.json")
    with pytest.raises(ValueError, match="--merge_lora"):
        load_model(lora_run["out"])


def _adapters(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "adapter_model.safetensors"))


def test_resume_is_exact(assets, lora_run, tmp_path):
    """Resuming the bf16 run (lora_dropout 0.05 on: the RNG state comes back too) from its step-2 checkpoint, whose
    DCP state holds the adapters and the projector only (the frozen base is re-read), gives the uninterrupted
    run's step-3 loss and adapters bit for bit."""
    out = str(tmp_path / "resumed")
    ckpt = os.path.join(lora_run["out"], "checkpoint-2")
    argv = [*lora_run["argv"], "--output_dir", out, "--resume_from_checkpoint", ckpt]
    train.main(argv)
    assert losses(out) == losses(lora_run["out"])[2:]
    want, got = _adapters(lora_run["out"]), _adapters(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _dist_main(rank, world, argv):
    train.main(argv)


@pytest.mark.dist
def test_two_ranks_match_one_process(assets, adapter, tmp_path):
    """FSDP2 on 2 ranks (adapters sharded with their block, zero3, bf16 with fp32 adapter masters, checkpointing,
    padding-free, global_token reduction) == 1 rank with GA 2 on the same global batch. lora_dropout 0: each
    rank draws its own dropout masks, so only a dropout-free run can match across layouts."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = dict(bf16="True", padding_free="True", loss_reduction="global_token", lora_dropout="0", lora_r="4")
    train.main(lora_argv(assets, one, adapter, gradient_accumulation_steps="2", **common))
    run_distributed(_dist_main, tmp_path, lora_argv(assets, two, adapter, **common))
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=1e-5)  # measured on CPU: equal
    a, b = _adapters(one), _adapters(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the saved bf16 adapters: equal


def test_resume_with_another_lora_r_names_the_flag(lora_run, tmp_path):
    """A different --lora_r cannot load the saved adapters: one line naming the flag and the saved value (it said
    "the checkpoint is damaged", and every older checkpoint failed the same way)."""
    ckpt = os.path.join(lora_run["out"], "checkpoint-2")
    argv = [*lora_run["argv"], "--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", ckpt, "--lora_r", "4"]
    with pytest.raises(ValueError, match=r"--lora_r 4 changes the shapes of the trained weights; the checkpoint was "
                                         r"trained with --lora_r 8: pass that$"):  # fmt: skip
        train.main(argv)
