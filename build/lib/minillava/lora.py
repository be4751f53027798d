"""LoRA on the LLM, as LLaVA's --lora_enable (llava/train/train.py find_all_linear_names + peft get_peft_model):
every nn.Linear of the LLM body gets an adapter (q/k/v/o/gate/up/down_proj; lm_head, the projector and the tower
never), no bias, frozen base weights.

A small LoRALinear of our own rather than peft's LoraModel, because under FSDP2 it keeps everything else as in full
finetuning: it subclasses nn.Linear and keeps the frozen weight where it was (`...q_proj.weight`), so parameter
names, the pretrained state dict, checkpoint FQNs and the FSDP2 units (fully_shard per decoder layer shards the
adapters with their block) are unchanged; peft's wrapper moves it to `base_layer.weight`, adds an adapter-name
level (`lora_A.default.weight`) and wants a materialised model, while ours is built on meta and loaded from rank 0.
peft serves the file format only: adapter_config.json (outputs.py) and, in tests, PeftModel.from_pretrained.

The math is peft's Linear: y = x W^T + b + B(A(dropout(x))) * alpha / r, A Kaiming-uniform, B zero. No
torch.distributed here.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LORA_PARTS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """An nn.Linear whose (frozen) weight and bias are the wrapped layer's own Parameters, plus lora_A (r, in) and
    lora_B (out, r)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        if base.weight.device.type != "meta":
            self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """peft's init_lora_weights=True: A Kaiming-uniform (nn.Linear's default), B zero: the adapter starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (lora * self.scaling).to(out.dtype)


def target_names(llm_body: nn.Module) -> list[str]:
    """find_all_linear_names over the LLM body (LlamaModel: lm_head is outside it): module names of its Linears."""
    return [name for name, m in llm_body.named_modules() if isinstance(m, nn.Linear)]


def add_lora(llm_body: nn.Module, r: int, alpha: float, dropout: float) -> list[str]:
    """Replace every nn.Linear of `llm_body` by a LoRALinear (meta or materialised); returns the suffixes adapted
    (peft's target_modules: q_proj, k_proj, ...)."""
    if any(isinstance(m, LoRALinear) for m in llm_body.modules()):
        raise ValueError("add_lora: the model already has LoRA adapters")
    names = target_names(llm_body)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = llm_body.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return sorted({n.rpartition(".")[2] for n in names})


def lora_targets(model: nn.Module) -> list[str]:
    """The module-name suffixes carrying adapters (peft's target_modules), e.g. [down_proj, ..., v_proj]."""
    return sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, LoRALinear)})


def is_lora_param(name: str) -> bool:
    """True for an adapter parameter name (...q_proj.lora_A.weight)."""
    return any(f".{part}." in name for part in LORA_PARTS)


def initial_lora_state(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """Fresh adapter weights for every LoRALinear of `model` (meta-built or sharded: shapes are global), on the
    CPU and seeded, keyed by parameter name: what rank 0 adds to the starting state dict."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a = torch.empty(m.lora_A.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            out[f"{name}.lora_A.weight"] = a.to(m.lora_A.weight.dtype)
            out[f"{name}.lora_B.weight"] = torch.zeros(m.lora_B.weight.shape, dtype=m.lora_B.weight.dtype)
    return out


def merge_lora(base: dict[str, Tensor], adapters: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """Base weights with every adapter folded in (peft merge_and_unload): W + (B @ A) * scaling, computed in fp32
    and returned in W's dtype. `adapters` holds X.lora_A.weight / X.lora_B.weight for base keys X.weight."""
    out = dict(base)
    prefixes = sorted({k.rsplit(".lora_", 1)[0] for k in adapters})
    for p in prefixes:
        w = base[f"{p}.weight"]
        delta = adapters[f"{p}.lora_B.weight"].float() @ adapters[f"{p}.lora_A.weight"].float()
        out[f"{p}.weight"] = (w.float() + delta * scaling).to(w.dtype)
    return out
