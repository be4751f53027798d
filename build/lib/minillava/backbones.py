"""The language-model families minillava trains, one row each: everything that differs between them lives here (no
torch.distributed). The model itself is always transformers' own class for the config (AutoModelForCausalLM): biases,
grouped-query attention, tied embeddings, q/k norms, rope scaling and sliding windows come from the config, never a
copy of the modelling code. What every family shares, and minillava relies on: `model.layers` of decoder layers with
`self_attn` and `mlp`, `model.rotary_emb`, `model.norm`, `model.embed_tokens`, and an `lm_head` without a bias.

LLaVA-NeXT (llava/model/language_model/llava_{llama,mistral,qwen}.py) registers one LLaVA class per family; its
config's model_type is the family's LLaVA name below.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LLMFamily:
    model_type: str  # the LLM config's model_type
    llava_model_type: str  # the model_type of a LLaVA-format folder of this family (LLaVA-NeXT's where it has one)
    llava_class: str  # its architectures entry: LLaVA-NeXT's class
    examples: str  # for error messages and the README
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3)


LLM_FAMILIES = {
    f.model_type: f
    for f in (
        LLMFamily("llama", "llava_llama", "LlavaLlamaForCausalLM", "Llama-2, Vicuna-v1.5, Llama-3.x"),
        LLMFamily("mistral", "llava_mistral", "LlavaMistralForCausalLM", "Mistral-7B"),
        LLMFamily("qwen2", "llava_qwen", "LlavaQwenForCausalLM", "Qwen2, Qwen2.5"),
        # LLaVA-NeXT has no Qwen3 class (its "qwen" name match builds Qwen2's, without q/k norms): a type of our own
        LLMFamily("qwen3", "llava_qwen3", "LlavaQwen3ForCausalLM", "Qwen3", qk_norm=True),
    )
}


def llava_folder_llm_type(conf: dict) -> str | None:
    """The LLM model_type of a LLaVA-format folder's config.json (None: not one): its model_type, or for LLaVA's
    plain "llava" (LLaVA-1.5, and lmms-lab's released LLaVA-NeXT configs) the architectures entry."""
    by_llava = {f.llava_model_type: t for t, f in LLM_FAMILIES.items()}
    if conf.get("model_type") in by_llava:
        return by_llava[conf["model_type"]]
    if conf.get("model_type") == "llava":
        by_class = {f.llava_class: t for t, f in LLM_FAMILIES.items()}
        return by_class.get((conf.get("architectures") or ["LlavaLlamaForCausalLM"])[0], "llama")
    return None


@dataclass(frozen=True)
class TowerFamily:
    """A vision tower family: how LLaVA reads it (llava/model/multimodal_encoder/{clip,siglip}_encoder.py)."""

    model_type: str  # the vision config's (a whole CLIPModel / SiglipModel folder: clip / siglip, its vision half)
    cls_token: bool  # the first position is a CLS token (--mm_vision_select_feature patch drops it)
    # LLaVA-NeXT's SigLipVisionTower deletes the last encoder layer and reads the output of the one before it (before
    # post_layernorm), every patch, whatever --mm_vision_select_layer / --mm_vision_select_feature say; we build the
    # tower without that layer (and without the pooling head it replaces by Identity), as its checkpoints hold it.
    drop_last_layer: bool
    processor: str  # transformers' PIL-backed image processor (LLaVA's exact pixels)


TOWER_FAMILIES = {
    "clip_vision_model": TowerFamily("clip_vision_model", True, False, "CLIPImageProcessorPil"),
    "siglip_vision_model": TowerFamily("siglip_vision_model", False, True, "SiglipImageProcessorPil"),
}
TOWER_TYPES = {"clip": "clip_vision_model", "clip_vision_model": "clip_vision_model", "siglip": "siglip_vision_model",
               "siglip_vision_model": "siglip_vision_model", "siglip2_vision_model": "siglip_vision_model"}  # fmt: skip


def supported_llms() -> str:
    return ", ".join(f"{t} ({f.examples})" for t, f in LLM_FAMILIES.items())


def llm_family(config, where: str) -> LLMFamily:
    """The family of an LLM config; ValueError in one line naming the supported types otherwise (before any weight
    is read)."""
    # the config class's type: a LLaVA folder read by LlamaConfig.from_pretrained keeps "llava_llama" on the instance
    model_type = getattr(type(config), "model_type", None) or getattr(config, "model_type", None)
    if model_type not in LLM_FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not a supported language model; supported: "
                         f"{supported_llms()}")  # fmt: skip
    return LLM_FAMILIES[model_type]


def tower_family(model_type: str | None, where: str) -> TowerFamily:
    """The family of a tower folder's config.json model_type; ValueError in one line naming the supported ones."""
    if model_type not in TOWER_TYPES:
        raise ValueError(f"{where}: model_type {model_type!r} is not a supported vision tower; supported: CLIP "
                         "(clip_vision_model, or a clip folder's vision half), SigLIP / SigLIP2 (siglip_vision_model, "
                         "or a siglip folder's vision half)")  # fmt: skip
    return TOWER_FAMILIES[TOWER_TYPES[model_type]]


def tower_config(folder: str, model_type: str):
    """The vision config of a tower folder (a whole CLIP / SigLIP model's vision half too), as LLaVA builds it."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    family = tower_family(model_type, folder)
    if family.model_type == "clip_vision_model":
        return CLIPVisionConfig.from_pretrained(folder)
    config = SiglipVisionConfig.from_pretrained(folder)  # as LLaVA-NeXT's tower: a layer fewer, no pooling head
    return SiglipVisionConfig.from_dict({**config.to_dict(), "num_hidden_layers": config.num_hidden_layers - 1,
                                         "vision_use_head": False})  # fmt: skip


def build_tower(config, *, attn_implementation: str, dtype: torch.dtype) -> nn.Module:
    from transformers import CLIPVisionModel, SiglipVisionModel

    family = tower_family(config.model_type, "the tower config")
    cls = CLIPVisionModel if family.model_type == "clip_vision_model" else SiglipVisionModel
    return cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)


def image_processor(folder: str, model_type: str):
    """The tower's PIL-backed image processor from its folder."""
    import transformers

    return getattr(transformers, tower_family(model_type, folder).processor).from_pretrained(folder)


def processor_size(processor) -> tuple[int, int]:
    """(height, width) of the processed images: the crop when the processor crops (CLIP), else its resize (SigLIP's
    exact 384 x 384, which has no crop_size)."""
    crop = getattr(processor, "crop_size", None)
    size = crop if crop and getattr(processor, "do_center_crop", False) else processor.size
    return size["height"], size["width"]


def build_llm(config, *, attn_implementation: str, dtype: torch.dtype) -> nn.Module:
    """transformers' causal-LM class for `config` (random weights; cheap under torch.device("meta"))."""
    from transformers import AutoModelForCausalLM

    llm_family(config, "the LLM config")
    llm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    if getattr(llm.lm_head, "bias", None) is not None:
        raise ValueError(f"{config.model_type}: an lm_head with a bias is not supported")
    return llm


def tied_embeddings(llm: nn.Module) -> bool:
    """lm_head shares the input embedding's weight (tie_word_embeddings: Qwen2-0.5B, Llama-3.2-1B)."""
    return llm.lm_head.weight is llm.get_input_embeddings().weight


def pad_token(tokenizer) -> str:
    """The token padding fills micro-batches with: LLaVA's unk (train.py L878-908) when the vocabulary has one
    (Llama-2 / Vicuna, Mistral), else the tokenizer's own pad (Qwen's <|endoftext|>), else its EOS (Llama-3). Our
    attention mask and labels come from the true lengths, so the id only fills positions nothing reads; LLaVA-NeXT's
    collator turns a missing pad into id 0 instead, which masks every real token 0 (Llama-3's "!")."""
    for token in (tokenizer.unk_token, tokenizer.pad_token, tokenizer.eos_token):
        if token is not None:
            return token
    raise ValueError("the tokenizer has no unk, pad or eos token to pad with")
