"""The memory estimate's per-token term (minillava/memory.py saved_bytes_per_token) equals what autograd really
saves in one decoder layer (saved-tensor hooks, counted by storage, parameters excluded), for trained and frozen
layers, MHA and GQA, fp32 and bf16 (whose RMSNorms keep fp32 copies), every LLM family (Qwen2's biases, Qwen3's q/k
norms, a head_dim that is not hidden / heads) and LoRA adapters. The whole estimate against traces of the real
step: tests/test_plan.py."""

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

from minillava.attention import register_padded_sdpa
from minillava.lora import add_lora
from minillava.memory import saved_bytes_per_token


def _measured_per_token(cfg, trained: bool, dtype: torch.dtype, T: int = 48, lora=None) -> float:
    llm = AutoModelForCausalLM.from_config(cfg, attn_implementation=register_padded_sdpa(), dtype=dtype)
    layer = llm.model.layers[0].requires_grad_(trained)
    if lora is not None:  # adapters (r, dropout) on the frozen layer's Linears, as --lora_enable (trained, in dtype)
        add_lora(layer, lora[0], 2 * lora[0], lora[1])
        layer.to(dtype)
    own = {t.untyped_storage().data_ptr() for t in [*llm.parameters(), *llm.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    x = torch.randn(1, T, cfg.hidden_size, requires_grad=True, dtype=dtype)
    pos = torch.arange(T)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_embeddings=llm.model.rotary_emb(x, pos), position_ids=pos)
    return sum(seen.values()) / T  # bytes per token


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("trained", [True, False])
@pytest.mark.parametrize(("hidden", "inter", "heads", "kv"), [(32, 64, 4, 4), (64, 256, 4, 2), (128, 344, 8, 8)])
def test_saved_bytes_per_token_match_autograd(trained, bf16, hidden, inter, heads, kv):
    cfg = tiny_llama_config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                            num_key_value_heads=kv)  # fmt: skip
    measured = _measured_per_token(cfg, trained, torch.bfloat16 if bf16 else torch.float32)
    assert measured == saved_bytes_per_token(cfg, trained, bf16)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize(("hidden", "inter", "heads", "kv"), [(32, 64, 4, 4), (64, 256, 4, 2)])
def test_lora_saved_bytes_per_token_match_autograd(bf16, dropout, hidden, inter, heads, kv):
    cfg = tiny_llama_config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                            num_key_value_heads=kv)  # fmt: skip
    dtype = torch.bfloat16 if bf16 else torch.float32
    measured = _measured_per_token(cfg, False, dtype, lora=(8, dropout))
    assert measured == saved_bytes_per_token(cfg, False, bf16, lora_r=8, lora_dropout=dropout)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("trained", [True, False])
@pytest.mark.parametrize("family", [MistralConfig, Qwen2Config, Qwen3Config])
@pytest.mark.parametrize(("hidden", "heads", "kv", "head_dim"), [(32, 4, 4, 8), (64, 4, 2, 32)])
def test_families_saved_bytes_per_token_match_autograd(family, trained, bf16, hidden, heads, kv, head_dim):
    cfg = family(vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                 num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)  # fmt: skip
    measured = _measured_per_token(cfg, trained, torch.bfloat16 if bf16 else torch.float32)
    assert measured == saved_bytes_per_token(cfg, trained, bf16)
