"""LLM families (minillava/backbones.py): Llama, Mistral, Qwen2 (biases, tied embeddings) and Qwen3 (q/k norms) are
built through transformers' own classes, give the loss transformers gives, load tied into FSDP2, and an unsupported
model type stops at start-up in one line. Each family end to end: tests/test_families.py."""

import os
import shutil

import pytest
import torch
from conftest import FAMILIES, flags, tiny_clip_config, tiny_family_config
from transformers import AutoModelForCausalLM

from minillava.backbones import LLM_FAMILIES, pad_token, tied_embeddings
from minillava.config import parse_args
from minillava.formats import run_configs
from minillava.metrics import FlopModel
from minillava.model import LlavaSettings, build_llava_from_config


def test_the_table_covers_the_tested_families():
    assert set(LLM_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_equals_transformers(family):
    """Text-only: our chunked loss over the layout equals the family's own CausalLM loss with the same labels."""
    torch.manual_seed(0)
    model = build_llava_from_config(tiny_family_config(family), tiny_clip_config(), LlavaSettings(), loss_chunk_size=5)
    assert tied_embeddings(model.llm) == (family in ("qwen2", "qwen3"))
    ids = torch.randint(3, 512, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    raw = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones(2, 12, dtype=torch.bool),
           "pixel_values": torch.zeros(2, 3, 28, 28)}  # fmt: skip
    loss_sum, n = model(**model.layout(raw, padding_free=False))
    ref = model.llm(input_ids=ids, labels=labels).loss
    assert n == 2 * 8 and (loss_sum / n).item() == pytest.approx(ref.item(), rel=1e-5)
    flops = FlopModel.from_model(model)  # a tied lm_head is still a matmul
    body = sum(p.numel() for p in model.llm.model.layers.parameters()) + 32
    assert flops.llm_matmul == body + 512 * 32


def _family_folder(assets, root, family: str) -> str:
    """A local LLM folder of the family: its config and random weights (tied: no lm_head on disk) beside the test
    tokenizer's files."""
    folder = os.path.join(root, family)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_family_config(family)).save_pretrained(folder)
    for name in os.listdir(assets["llm"]):
        if "token" in name or name.endswith(".model"):
            shutil.copy(os.path.join(assets["llm"], name), folder)
    return folder


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tied_family_loads_and_trains_under_fsdp(assets, tmp_path, family):
    """A tied family's folder (no lm_head.weight on disk) loads strictly into the FSDP2 model, trains, and lm_head
    stays the embedding. (Qwen's own templates and byte-level tokenizers come with their --version.)"""
    from safetensors.torch import load_file

    from minillava import distributed as D
    from minillava.gather import full_tensors
    from minillava.optim import build_optimizer
    from minillava.step import build_model, train_step

    folder = _family_folder(assets, str(tmp_path), family)
    disk = load_file(os.path.join(folder, "model.safetensors"))
    assert "lm_head.weight" not in disk
    cfg = parse_args(flags(assets, str(tmp_path / "out"), model_name_or_path=folder))
    info = D.init_distributed()
    try:
        model, _ = build_model(cfg, info, run_configs(cfg))
        loaded = dict(full_tensors(model))
        assert torch.equal(loaded["llm.model.embed_tokens.weight"], disk["model.embed_tokens.weight"])
        assert torch.equal(loaded["llm.lm_head.weight"], disk["model.embed_tokens.weight"])
        optimizer, scheduler = build_optimizer(model, cfg.train, 2)
        ids = torch.randint(3, 512, (2, 20))
        ids[:, 1] = -200  # an image placeholder each
        raw = {"input_ids": ids, "labels": ids.where(torch.arange(20) > 2, -100),
               "attention_mask": torch.ones(2, 20, dtype=torch.bool), "pixel_values": torch.zeros(2, 3, 28, 28)}
        losses = [train_step(model, [model.layout(raw)], optimizer, scheduler, cfg)["loss"] for _ in range(2)]
        assert all(0 < x < 10 for x in losses)
        after = dict(full_tensors(model))
        assert torch.equal(after["llm.lm_head.weight"], after["llm.model.embed_tokens.weight"])
        assert not torch.equal(after["llm.lm_head.weight"], disk["model.embed_tokens.weight"])  # it trained
    finally:
        D.cleanup(info)


def test_unsupported_types_stop_at_start_up_in_one_line(assets, tmp_path):
    from transformers import BertConfig, GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    BertConfig(num_hidden_layers=1).save_pretrained(tmp_path / "bert")
    argv = lambda llm, tower: ["--stage", "2", "--model_name_or_path", str(llm), "--vision_tower", str(tower),  # noqa: E731
                               "--data_path", "d", "--image_folder", "i", "--output_dir", "o"]  # fmt: skip
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not a supported language model; supported: llama "):
        run_configs(parse_args(argv(tmp_path / "gpt2", assets["clip"])))
    with pytest.raises(ValueError, match=r"--vision_tower .*bert: model_type 'bert' is not a supported vision tower"):
        run_configs(parse_args(argv(assets["llm"], tmp_path / "bert")))


class _Tok:
    def __init__(self, unk=None, pad=None, eos=None):
        self.unk_token, self.pad_token, self.eos_token = unk, pad, eos


def test_pad_token_is_unk_else_the_families_own():
    assert pad_token(_Tok(unk="<unk>", pad="<pad>", eos="</s>")) == "<unk>"  # LLaVA (Vicuna, Mistral)
    assert pad_token(_Tok(pad="<|endoftext|>", eos="<|im_end|>")) == "<|endoftext|>"  # Qwen2
    assert pad_token(_Tok(eos="<|eot_id|>")) == "<|eot_id|>"  # Llama-3: never id 0 ("!")
    with pytest.raises(ValueError, match="no unk, pad or eos"):
        pad_token(_Tok())
