"""End-to-end trainer tests through the real main(argv): one process, and 2 gloo ranks under FSDP2."""

import json
import os

import pytest
import torch
from conftest import (
    build_image_processor,
    build_tokenizer_dir,
    tiny_clip_config,
    tiny_llama_config,
    write_llava_dataset,
)
from dist import run_distributed

import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Local HF folders as a user has them: a Vicuna-like LLM folder (weights + tokenizer), a CLIP folder (weights +
    preprocessor config), and a LLaVA-format dataset with image and text-only samples."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    root = tmp_path_factory.mktemp("assets")
    llm_dir, clip_dir = str(root / "llm"), str(root / "clip")
    build_tokenizer_dir(llm_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(llm_dir)
    CLIPVisionModel(tiny_clip_config()).save_pretrained(clip_dir)
    build_image_processor().save_pretrained(clip_dir)
    data, images = write_llava_dataset(str(root / "data"), n_image=12, n_text=4)
    pretrain, _ = write_llava_dataset(str(root / "data"), n_image=12, n_text=0, multi_turn=False, name="pretrain.json")
    return {"llm": llm_dir, "clip": clip_dir, "data": data, "pretrain": pretrain, "images": images, "root": root}


def flags(assets, out, stage=2, **over):
    base = {
        "model_name_or_path": assets["llm"],
        "vision_tower": assets["clip"],
        "data_path": assets["data"] if stage == 2 else assets["pretrain"],
        "image_folder": assets["images"],
        "output_dir": out,
        "bf16": "False",
        "per_device_train_batch_size": "2",
        "gradient_accumulation_steps": "1",
        "max_steps": "3",
        "learning_rate": "1e-3",
        "report_to": "none",
        "dataloader_num_workers": "0",
        "model_max_length": "64",
    }
    if stage == 2 and "pretrain_mm_mlp_adapter" not in over:
        base.update(init_projector="random")
    base.update({k: str(v) for k, v in over.items()})
    argv = ["--stage", str(stage)]
    for k, v in base.items():
        argv += [f"--{k}", v]
    return argv


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_stage1_then_stage2_single_process(assets, tmp_path):
    s1 = str(tmp_path / "s1")
    train.main(flags(assets, s1, stage=1, gradient_checkpointing="True"))
    proj = torch.load(os.path.join(s1, "mm_projector.bin"), weights_only=True)
    assert sorted(proj) == [f"model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")]
    with open(os.path.join(s1, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llava_llama" and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert all(map(lambda x: x == x and x < 100, losses(s1)))  # finite
    s2 = str(tmp_path / "s2")
    argv = flags(assets, s2, stage=2, pretrain_mm_mlp_adapter=os.path.join(s1, "mm_projector.bin"))
    train.main(argv)
    assert os.path.exists(os.path.join(s2, "model.safetensors.index.json"))
    assert len(losses(s2)) == 3


def _dist_main(rank, world, argv):
    train.main(argv)


@pytest.mark.dist
@pytest.mark.parametrize(
    ("reduction", "extra", "tol"),
    [
        ("llava", {}, 1e-5),
        ("global_token", {}, 1e-5),
        # bf16 compute (fp32 masters, fp32 reduction) with padding-free packing: each micro-batch is computed the
        # same way on either side, only the gradient sums differ (max difference measured on CPU: 2.4e-7).
        ("llava", {"bf16": "True", "padding_free": "True"}, 1e-5),
    ],
)
def test_two_ranks_match_one_process(assets, tmp_path, reduction, extra, tol):
    """Same global step, split over ranks vs over accumulation micro-steps: the sampler deals chunk j of each
    megabatch to rank j % W at micro-step j // W, so 1 rank x GA 2 sees exactly the 2 ranks' micro-batches."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = dict(loss_reduction=reduction, group_by_modality_length="True", **extra)
    train.main(flags(assets, one, gradient_accumulation_steps=2, **common))
    run_distributed(_dist_main, tmp_path, flags(assets, two, **common))
    torch.testing.assert_close(losses(two), losses(one), rtol=tol, atol=tol)
