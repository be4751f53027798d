"""A llava-hf folder: transformers' LlavaForConditionalGeneration (convert_llava_weights_to_hf.py), written by
`export --format llava-hf` for every LLM family and tower (hf_config, build_hf_model; its save_pretrained writes the
files) and read back, LLaVA-1.5's Llama + CLIP only (hf_settings, hf_configs, hf_state), to finetune or generate."""

import torch
from torch import Tensor
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava import LlavaImageProcessorPil

from minillava.backbones import tower_family
from minillava.formats.folders import llm_config_of, unexpected_key
from minillava.model import LlavaSettings

_STRATEGY = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> vision_feature_select_strategy
EMBEDDINGS = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")  # the rows a llava-hf export appends to


# Our names <-> LlavaForConditionalGeneration's in-memory names. Its from_pretrained maps every on-disk layout to
# these (transformers <= 4.51 and 5.x save_pretrained, >= 4.52's, hub folders with CLIP's vision_model. level) and
# its save_pretrained picks the on-disk one, so no llava-hf file key is spelled here.
_HF = (("llm.model.", "model.language_model."), ("llm.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
       ("mm_projector.0.", "model.multi_modal_projector.linear_1."),
       ("mm_projector.2.", "model.multi_modal_projector.linear_2."))  # fmt: skip


def to_hf_key(name: str) -> str:
    """Our parameter name -> LlavaForConditionalGeneration's (in memory)."""
    ours, theirs = next((o, t) for o, t in _HF if name.startswith(o))
    return theirs + name[len(ours) :]


def from_hf_key(key: str, path: str) -> str:
    """LlavaForConditionalGeneration's in-memory name -> ours."""
    for ours, theirs in _HF:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    raise unexpected_key(path, key)


def hf_config(llm, vision, s: LlavaSettings, vocab: int, image_id: int, pad_id: int) -> LlavaConfig:
    """The LlavaConfig of an export: the LLM's own config class (text_config.model_type llama, mistral, qwen2, qwen3),
    a gelu MLP projector, and the tower read as minillava reads it: CLIP's hidden_states[mm_vision_select_layer]
    ("default" drops the CLS); SigLIP's last layer of the tower we keep, which LLaVA-NeXT's is already one short of
    (hidden_states[-1], every patch: "full")."""
    if s.mm_projector_type != "mlp2x_gelu":
        raise ValueError(
            f"mm_projector_type {s.mm_projector_type!r}: LlavaForConditionalGeneration has mlp2x_gelu only"
        )
    family, tied = tower_family(vision.model_type, "the tower"), bool(getattr(llm, "tie_word_embeddings", False))
    text = type(llm).from_dict({**llm.to_dict(), "vocab_size": vocab})  # pad_token_id: the LLM's (Vicuna: 0)
    cls = family.cls_token and s.mm_vision_select_feature == "cls_patch"
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2 + cls,
        projector_hidden_act="gelu",  # exact erf GELU, as LLaVA's nn.GELU() (multimodal_projector/builder.py)
        vision_feature_layer=-1 if family.drop_last_layer else s.mm_vision_select_layer,
        vision_feature_select_strategy=_STRATEGY[s.mm_vision_select_feature] if family.cls_token else "full",
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,  # Qwen2-0.5B: lm_head is the embedding
        pad_token_id=pad_id,
    )


def build_hf_model(config: LlavaConfig, state: dict[str, Tensor]) -> LlavaForConditionalGeneration:
    """LlavaForConditionalGeneration holding `state` (our names), loaded strictly; built on meta, so nothing is
    initialised twice (a 7B export never holds a random copy). Its save_pretrained writes the llava-hf folder."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.load_state_dict({to_hf_key(k): v for k, v in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    lm, emb = model.model.language_model, model.model.vision_tower.embeddings  # non-persistent buffers: recompute
    lm.rotary_emb = type(lm.rotary_emb)(config=config.text_config)
    emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand(1, -1), persistent=False)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    return model.eval()


def hf_settings(path: str, conf: dict) -> LlavaSettings:
    """A llava-hf folder's LlavaSettings (read_settings): its config plus its processor's do_pad; only what maps to
    LLaVA-1.5 (Llama + CLIP, one int vision_feature_layer, a biased gelu MLP)."""
    get = conf.get
    layer, strategy = get("vision_feature_layer", -2), get("vision_feature_select_strategy", "default")
    text, bias = conf["text_config"].get("model_type", "llama"), get("multimodal_projector_bias", True)
    tower = conf["vision_config"].get("model_type", "clip_vision_model")
    if not isinstance(layer, int) or get("projector_hidden_act", "gelu") != "gelu" or not bias or \
            (text, tower) != ("llama", "clip_vision_model"):  # fmt: skip
        raise ValueError(f"{path!r}: only Llama + CLIP + one int vision_feature_layer + biased gelu MLP maps to "
                         f"LLaVA-1.5 (this one: {text} + {tower}); read other llava-hf folders with transformers")
    return LlavaSettings(
        mm_vision_select_layer=layer,
        mm_vision_select_feature={v: k for k, v in _STRATEGY.items()}[strategy],
        image_aspect_ratio="pad" if LlavaImageProcessorPil.from_pretrained(path).do_pad else "square",
    )


def hf_configs(path: str, conf: dict):
    """(llm_config, vision_config) of a llava-hf folder: vocab_size the original one (image_token_index, the first
    row the converter appended)."""
    hf_settings(path, conf)  # validates the vision feature settings
    llm_config = llm_config_of(conf["text_config"])
    llm_config.vocab_size = min(llm_config.vocab_size, conf.get("image_token_index", 32000))
    if (llm_config.pad_token_id or 0) >= llm_config.vocab_size:  # <pad> was one of the appended rows
        llm_config.pad_token_id = None
    return llm_config, CLIPVisionConfig(**conf["vision_config"])


def hf_state(path: str, vocab_size: int) -> dict[str, Tensor]:
    """A llava-hf folder's tensors keyed by our names, read by LlavaForConditionalGeneration.from_pretrained (in the
    config's dtype, dtype="auto"); every weight of the model must come from the folder and every file key be used.
    The rows the converter appended (<image>, <pad>, padding to a multiple of 64) are dropped, so the LLM has its
    original vocabulary (minillava splices images at id -200 and never looks those rows up)."""
    model, info = LlavaForConditionalGeneration.from_pretrained(
        path, dtype="auto", local_files_only=True, output_loading_info=True
    )
    if problems := {k: v for k, v in info.items() if v}:
        raise ValueError(f"{path!r}: not a LLaVA-1.5 llava-hf folder ({problems})")
    state = {from_hf_key(k, path): v for k, v in model.state_dict().items()}
    return state | {k: state[k][:vocab_size] for k in EMBEDDINGS}
