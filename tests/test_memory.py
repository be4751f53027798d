"""The activation-checkpointing plan (minillava/memory.py): its per-token estimate of what a decoder layer saves for
the backward equals what autograd really saves (saved-tensor hooks, counted by storage, parameters excluded), for
trained and frozen layers, MHA and GQA; and auto checkpoints the fewest layers that fit."""

import pytest
import torch
from conftest import make_tiny_llava, tiny_llama_config
from transformers import LlamaForCausalLM

from minillava.attention import register_padded_sdpa
from minillava.config import parse_args
from minillava.memory import plan_checkpointing, saved_per_token


def _measured_per_token(cfg, trained: bool, T: int = 48) -> float:
    llm = LlamaForCausalLM._from_config(cfg, attn_implementation=register_padded_sdpa())
    layer = llm.model.layers[0].requires_grad_(trained)
    own = {t.untyped_storage().data_ptr() for t in [*llm.parameters(), *llm.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    x = torch.randn(1, T, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(T)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_embeddings=llm.model.rotary_emb(x, pos), position_ids=pos)
    return sum(seen.values()) / T / 4  # fp32 elements per token


@pytest.mark.parametrize("trained", [True, False])
@pytest.mark.parametrize(("hidden", "inter", "heads", "kv"), [(32, 64, 4, 4), (64, 256, 4, 2), (128, 344, 8, 8)])
def test_saved_per_token_matches_autograd(trained, hidden, inter, heads, kv):
    cfg = tiny_llama_config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                            num_key_value_heads=kv)  # fmt: skip
    measured = _measured_per_token(cfg, trained)
    assert measured == pytest.approx(saved_per_token(cfg, trained), rel=0.05)


def _train_args(mode, batch=4):
    argv = ["--stage", "2", "--model_name_or_path", "m", "--vision_tower", "v", "--data_path", "d",
            "--image_folder", "i", "--output_dir", "o", "--init_projector", "random", "--bf16", "False",
            "--per_device_train_batch_size", str(batch), "--model_max_length", "256",
            "--gradient_checkpointing", mode]  # fmt: skip
    return parse_args(argv).train


def test_auto_checkpoints_the_fewest_layers_that_fit():
    model = make_tiny_llava()
    none = plan_checkpointing(model, _train_args("False"), 1, 10**12)
    every = plan_checkpointing(model, _train_args("True"), 1, 10**12)
    assert (none.layers, every.layers) == (0, 2) and every.estimate_bytes < none.estimate_bytes
    assert plan_checkpointing(model, _train_args("auto"), 1, 10**12).layers == 0  # plenty of memory: none
    tight = int((none.estimate_bytes + every.estimate_bytes) / 2 / 0.85)  # between the two: one layer
    assert plan_checkpointing(model, _train_args("auto"), 1, tight).layers == 1
    assert plan_checkpointing(model, _train_args("auto"), 1, 1).layers == 2  # nothing fits: every layer
    assert "1 of 2 decoder layers" in plan_checkpointing(model, _train_args("auto"), 1, tight).describe()
