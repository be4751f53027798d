"""Interop with transformers' LlavaForConditionalGeneration (llava-hf, llava-reference.md 8.5), both directions.

    python -m minillava.export --checkpoint STAGE2_DIR --output HF_DIR [--vision_tower CLIP_DIR]
    python -m minillava.export --model_name_or_path LLM --pretrain_mm_mlp_adapter BIN --vision_tower CLIP --output DIR

Import: load_llava_checkpoint_state(path) reads a llava-hf folder or a LLaVA-format stage-2 folder (model_type
llava_llama / llava, as checkpoint.save_final writes) into our names (llm.*, vision_tower.*, mm_projector.*).
"""

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AddedToken,
    AutoTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava import LlavaImageProcessorPil

from minillava.conversation import get_template
from minillava.weights import _read_weights, pretrained_state_dict, read_mm_projector

IMAGE_TOKEN, PAD_TOKEN, VOCAB_MULTIPLE = "<image>", "<pad>", 64  # convert_llava_weights_to_hf.py: 32000 + 2 -> 32064
_DROP = (".inv_freq", ".position_ids")  # non-persistent today; old checkpoints carry them
_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}
# First match wins. HF: the on-disk layout of transformers <= 4.51 and 5.x (language_model.model.*, vision_tower.*)
# and the in-memory one of >= 4.52 (model.language_model.*, lm_head.*); hub folders add CLIP's vision_model. level.
_HF_RULES = (
    (r"(model\.language_model|language_model\.model)\.", "llm.model."),
    (r"(language_model\.)?lm_head\.", "llm.lm_head."),
    (r"(model\.)?vision_tower\.(vision_model\.)?", "vision_tower."),
    (r"(model\.)?multi_modal_projector\.linear_1\.", "mm_projector.0."),
    (r"(model\.)?multi_modal_projector\.linear_2\.", "mm_projector.2."),
)
_LLAVA_RULES = (  # the inverse of weights.to_llava_key (ref 8.2)
    (r"model\.mm_projector\.", "mm_projector."),
    (r"model\.vision_tower\.vision_tower\.(vision_model\.)?", "vision_tower."),
    (r"model\.", "llm.model."),
    (r"lm_head\.", "llm.lm_head."),
)
_TO_HF = (  # our names -> LlavaForConditionalGeneration's in-memory names (save_pretrained picks the disk layout)
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("mm_projector.2.", "model.multi_modal_projector.linear_2."),
)


@dataclass(kw_only=True)
class LlavaSettings:
    """The model knobs a checkpoint was trained with (LLaVA's mm_* config fields, ref 8.4)."""

    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    model_max_length: int = 2048
    vision_tower: str | None = None  # the CLIP folder (LLaVA format) or None (llava-hf carries its vision config)


def _config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{path!r}: cannot read config.json: {e}") from None


def checkpoint_kind(path: str) -> str | None:
    """ "llava-hf" (LlavaForConditionalGeneration), "llava" (LLaVA / minillava stage 2) or None (anything else)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    conf = _config(path)
    if conf.get("model_type") == "llava" and "text_config" in conf:
        return "llava-hf"
    if conf.get("model_type") in ("llava", "llava_llama") and "mm_hidden_size" in conf:
        return "llava"
    return None


def read_settings(path: str) -> LlavaSettings:
    """A stage-2 folder's LlavaSettings, from LLaVA's mm_* fields or from a llava-hf config + processor config."""
    conf, kind = _config(path), checkpoint_kind(path)
    if kind == "llava":
        return LlavaSettings(
            mm_projector_type=conf.get("mm_projector_type", "linear"),  # LLaVA's getattr default (builder.py)
            mm_vision_select_layer=conf.get("mm_vision_select_layer", -2),
            mm_vision_select_feature=conf.get("mm_vision_select_feature", "patch"),
            image_aspect_ratio=conf.get("image_aspect_ratio", "square"),
            model_max_length=conf.get("tokenizer_model_max_length", 2048),
            vision_tower=conf.get("mm_vision_tower"),
        )
    if kind != "llava-hf":
        raise ValueError(f"{path!r}: not a llava-hf or LLaVA-format stage-2 folder (config.json model_type)")
    layer, strategy = conf.get("vision_feature_layer", -2), conf.get("vision_feature_select_strategy", "default")
    if not isinstance(layer, int) or conf.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path!r}: only one int vision_feature_layer and a gelu projector map to LLaVA-1.5")
    do_pad = False
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        if os.path.isfile(p := os.path.join(path, name)):
            with open(p) as f:
                proc = json.load(f)
            do_pad = bool((proc.get(key, {}) if key else proc).get("do_pad", False))
            break
    return LlavaSettings(
        mm_vision_select_layer=layer,
        mm_vision_select_feature={v: k for k, v in _FEATURE_TO_STRATEGY.items()}[strategy],
        image_aspect_ratio="pad" if do_pad else "square",
    )


def _rename(state: dict[str, Tensor], rules: tuple, path: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith(_DROP):
            continue
        new = next((re.sub(f"^{pat}", rep, key) for pat, rep in rules if re.match(pat, key)), None)
        if new is None:
            raise ValueError(f"{path!r}: unexpected weight {key!r} (only LLaVA-1.5 / llava-hf keys are mapped)")
        out[new] = value
    return out


def _llm_config(conf: dict) -> LlamaConfig:
    """LlamaConfig from a LLaVA config.json: LLaVA's mm_* fields and model_type llava_llama are dropped."""
    known = (LlamaConfig().to_dict().keys() | {"rope_theta", "rope_scaling"}) - {"model_type", "architectures"}
    return LlamaConfig(**{k: v for k, v in conf.items() if k in known and k != "transformers_version"})


def _clip_state(folder: str) -> dict[str, Tensor]:
    """CLIP vision weights of a folder keyed vision_tower.* (as weights.pretrained_state_dict, without the LLM)."""
    clip = _read_weights(folder, "--vision_tower")
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in clip) else ""  # openai CLIPModel folders
    return {
        f"vision_tower.{k.removeprefix(prefix)}": v
        for k, v in clip.items()
        if k.startswith(prefix) and not k.endswith(_DROP)
    }


def load_llava_checkpoint_state(
    path: str, vision_tower: str | None = None
) -> tuple[LlamaConfig, CLIPVisionConfig, dict[str, Tensor]]:
    """(llm_config, vision_config, state keyed llm.* / vision_tower.* / mm_projector.*) of a llava-hf or LLaVA folder.

    llava-hf: the rows the converter appended (<image>, <pad>, padding to a multiple of 64) are dropped, so the LLM
    has its original vocabulary (minillava splices images at id -200 and never looks those rows up). LLaVA format:
    CLIP's config comes from `vision_tower` or the config's mm_vision_tower folder; its weights from the checkpoint's
    copy (ref 8.2), else from that folder."""
    conf, kind = _config(path), checkpoint_kind(path)
    if kind == "llava-hf":
        text, vision = conf["text_config"], conf["vision_config"]
        if text.get("model_type", "llama") != "llama" or not conf.get("multimodal_projector_bias", True):
            raise ValueError(f"{path!r}: only a Llama text model with a biased projector maps to LLaVA-1.5")
        read_settings(path)  # validates the vision feature settings
        state = _rename(_read_weights(path, "--model_name_or_path"), _HF_RULES, path)
        llm_config, vocab = _llm_config(text), conf.get("image_token_index", 32000)
        if vocab < llm_config.vocab_size:
            for k in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
                state[k] = state[k][:vocab]
            llm_config.vocab_size = vocab
        if (llm_config.pad_token_id or 0) >= vocab:  # <pad> was one of the dropped rows
            llm_config.pad_token_id = None
        return llm_config, CLIPVisionConfig(**vision), state
    if kind != "llava":
        raise ValueError(f"{path!r}: not a llava-hf or LLaVA-format stage-2 folder (config.json model_type)")
    clip = vision_tower or conf.get("mm_vision_tower")
    if not clip or not os.path.isdir(clip):
        raise ValueError(f"{path!r}: its vision tower {clip!r} is not a local folder; pass --vision_tower CLIP_DIR")
    state = _rename(_read_weights(path, "--model_name_or_path"), _LLAVA_RULES, path)
    if not any(k.startswith("vision_tower.") for k in state):
        state.update(_clip_state(clip))
    return _llm_config(conf), CLIPVisionConfig.from_pretrained(clip), state


def sample_new_rows(weight: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n float64 rows drawn from N(mu, 1e-5 * Sigma) of `weight`'s rows, as convert_llava_weights_to_hf.py does.

    Sigma is the population covariance (divided by the row count), as there; sampling uses a Cholesky factor (a
    symmetric square root when Sigma is singular) and a seeded generator, so an export is reproducible. Deviation:
    the reference draws lm_head's rows from the input embeddings' statistics too; each matrix uses its own here
    (as transformers' resize_token_embeddings(mean_resizing=True)), since the two have different scales."""
    w = weight.double()
    mu = w.mean(0)
    centred = w - mu
    cov = 1e-5 * (centred.T @ centred) / w.shape[0]  # (D, D)
    factor, info = torch.linalg.cholesky_ex(cov)
    if info:
        evals, evecs = torch.linalg.eigh(cov)
        factor = evecs * evals.clamp(min=0).sqrt()
    return mu + torch.randn(n, w.shape[1], generator=generator, dtype=torch.float64) @ factor.T  # (n, D)


def chat_template(version: str) -> str:
    """A Jinja chat template for `version`'s prompt (conversation.py get_prompt, style TWO): system +
    " USER: <image> \\n... ASSISTANT: answer</s>USER: ... ASSISTANT:", images first (as preprocess_multimodal).

    The space in "<image> \\n" is deliberate: LLaVA tokenizes the text after each image on its own, so SentencePiece
    puts its word prefix there ('<image>', '\u2581', '\\n', ...; tokenizer_image_token). A fast tokenizer splitting at the
    special <image> adds no prefix; the space gives that '\u2581' back, so chat template + processor produce exactly
    the token ids LLaVA trained and evaluated on."""
    t = get_template(version)
    if t.style != "two":
        raise ValueError(f"--version {version!r}: only conversation templates (v1, llava_v1) have a chat template")
    texts = "(c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' '))"
    content = f"{{%- set c = m['content'] -%}}{{{{- c if c is string else {texts} -}}}}"
    return (
        f"{{%- set ns = namespace(system={t.system!r}) -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set c = messages[0]['content'] -%}"
        f"{{%- set ns.system = c if c is string else {texts} -%}}{{%- endif -%}}"
        f"{{{{- ns.system + {t.sep!r} -}}}}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        f"{{{{- ({t.roles[0]!r} if m['role'] == 'user' else {t.roles[1]!r}) + ': ' -}}}}"
        "{%- if m['content'] is not string -%}"
        "{%- for c in m['content'] if c['type'] == 'image' -%}{{- '<image> \\n' -}}{%- endfor -%}{%- endif -%}"
        f"{content}{{{{- {t.sep!r} if m['role'] == 'user' else {t.sep2!r} -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {t.roles[1] + ':'!r} -}}}}{{%- endif -%}}"
    )


def hf_config(
    llm_config: LlamaConfig,
    vision_config: CLIPVisionConfig,
    s: LlavaSettings,
    *,
    vocab: int,
    image_id: int,
    pad_id: int,
) -> LlavaConfig:
    """The LlavaConfig of an export (ref 8.5): gelu MLP projector, vision_feature_layer = mm_vision_select_layer."""
    if s.mm_projector_type != "mlp2x_gelu":
        raise ValueError(
            f"mm_projector_type {s.mm_projector_type!r}: LlavaForConditionalGeneration has mlp2x_gelu only"
        )
    text = LlamaConfig.from_dict({**llm_config.to_dict(), "vocab_size": vocab})  # pad_token_id: the LLM's (0)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return LlavaConfig(
        text_config=text,
        vision_config=vision_config,
        image_token_index=image_id,
        image_seq_length=patches + (s.mm_vision_select_feature == "cls_patch"),
        projector_hidden_act="gelu",  # exact erf GELU, as LLaVA's nn.GELU() (ref 5.3)
        vision_feature_layer=s.mm_vision_select_layer,
        vision_feature_select_strategy=_FEATURE_TO_STRATEGY[s.mm_vision_select_feature],
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
    )


def build_hf_model(config: LlavaConfig, state: dict[str, Tensor]) -> LlavaForConditionalGeneration:
    """LlavaForConditionalGeneration holding `state` (our names), loaded strictly; built on meta, so nothing is
    initialised twice (a 7B export never holds a random copy)."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    hf_state = {}
    for name, value in state.items():
        ours, theirs = next((o, t) for o, t in _TO_HF if name.startswith(o))
        hf_state[theirs + name[len(ours) :]] = value
    model.load_state_dict(hf_state, strict=True, assign=True)
    # Non-persistent buffers are not in any state dict: recompute them on the CPU.
    lm, emb = model.model.language_model, model.model.vision_tower.embeddings
    lm.rotary_emb = type(lm.rotary_emb)(config=config.text_config)
    emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand(1, -1), persistent=False)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    return model.eval()


def add_llava_tokens(tokenizer: Any) -> tuple[int, int]:
    """Add <image> (special, unnormalised) and <pad> as the converter does; their ids (32000, 32001 for Vicuna)."""
    tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id


def _source(
    checkpoint: str | None, model_name_or_path: str | None, adapter: str | None, vision_tower: str | None
) -> tuple[LlavaSettings, LlamaConfig, CLIPVisionConfig, dict[str, Tensor], str, str]:
    """(settings, llm_config, vision_config, state, CLIP folder, tokenizer folder) of either export source."""
    if checkpoint:
        if checkpoint_kind(checkpoint) != "llava":
            raise ValueError(
                f"--checkpoint {checkpoint!r}: expected a LLaVA-format stage-2 folder (model_type llava_llama)"
            )
        s = read_settings(checkpoint)
        llm_config, vision_config, state = load_llava_checkpoint_state(checkpoint, vision_tower)
        return s, llm_config, vision_config, state, vision_tower or s.vision_tower, checkpoint
    if not (model_name_or_path and adapter and vision_tower):
        raise ValueError("give --checkpoint, or all of --model_name_or_path, --pretrain_mm_mlp_adapter, --vision_tower")
    from torch import nn

    from minillava.model import build_projector

    stage1 = os.path.dirname(os.path.abspath(adapter))  # a stage-1 output_dir has LLaVA's config.json next to it
    s = read_settings(stage1) if checkpoint_kind(stage1) == "llava" else LlavaSettings()
    llm_config, vision_config = (
        LlamaConfig.from_pretrained(model_name_or_path),
        CLIPVisionConfig.from_pretrained(vision_tower),
    )
    holder = nn.Module()
    holder.mm_projector = build_projector(s.mm_projector_type, vision_config.hidden_size, llm_config.hidden_size)
    state = pretrained_state_dict(model_name_or_path, vision_tower) | read_mm_projector(holder, adapter)
    return s, llm_config, vision_config, state, vision_tower, model_name_or_path


def export_llava_hf(
    output: str,
    *,
    checkpoint: str | None = None,
    model_name_or_path: str | None = None,
    pretrain_mm_mlp_adapter: str | None = None,
    vision_tower: str | None = None,
    version: str = "v1",
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> None:
    """Write `output` as a llava-hf folder: weights, config, generation config, tokenizer (+<image>, <pad>) and a
    LlavaProcessor (CLIP preprocessing from the vision tower folder, do_pad = image_aspect_ratio pad, v1 chat template).
    dtype None keeps the checkpoint's. AutoProcessor.from_pretrained(output, backend="pil") preprocesses exactly as
    training did; the default torchvision backend differs slightly (data.load_image_processor)."""
    s, llm_config, vision_config, state, clip, tok_dir = _source(
        checkpoint, model_name_or_path, pretrain_mm_mlp_adapter, vision_tower
    )
    dtype = dtype or state["llm.model.embed_tokens.weight"].dtype
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_id, pad_id = add_llava_tokens(tokenizer)
    old = llm_config.vocab_size
    vocab = -(-max(old, len(tokenizer)) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE  # 32000 + 2 -> 32064 (ref 8.5)
    generator = torch.Generator().manual_seed(seed)
    for key in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        state[key] = torch.cat([state[key].to(dtype), sample_new_rows(state[key], vocab - old, generator).to(dtype)])
    config = hf_config(llm_config, vision_config, s, vocab=vocab, image_id=image_id, pad_id=pad_id)
    model = build_hf_model(config, {k: v.to(dtype) for k, v in state.items()})
    gen = (
        GenerationConfig.from_pretrained(tok_dir)
        if os.path.isfile(os.path.join(tok_dir, "generation_config.json"))
        else model.generation_config
    )
    gen.pad_token_id = pad_id
    model.generation_config = gen
    model.save_pretrained(output)
    image_processor = LlavaImageProcessorPil.from_pretrained(clip, do_pad=s.image_aspect_ratio == "pad")
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS: "default" drops it again, so <image> -> image_seq_length tokens
        chat_template=chat_template(version),
    )
    processor.save_pretrained(output)


def main(argv: list[str] | None = None) -> None:
    """CLI: see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m minillava.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="LLaVA-format stage-2 folder (minillava's or LLaVA's)")
    p.add_argument("--model_name_or_path", help="base LLM folder (with --pretrain_mm_mlp_adapter)")
    p.add_argument("--pretrain_mm_mlp_adapter", help="stage-1 mm_projector.bin")
    p.add_argument("--vision_tower", help="CLIP folder (default: the checkpoint's mm_vision_tower)")
    p.add_argument("--output", required=True, help="llava-hf folder to write")
    p.add_argument("--version", default="v1", help="conversation template for the chat template")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed for the new <image>/<pad>/padding embedding rows")
    a = p.parse_args(argv)
    export_llava_hf(
        a.output,
        checkpoint=a.checkpoint,
        model_name_or_path=a.model_name_or_path,
        pretrain_mm_mlp_adapter=a.pretrain_mm_mlp_adapter,
        vision_tower=a.vision_tower,
        version=a.version,
        dtype=None if a.dtype == "auto" else getattr(torch, a.dtype),
        seed=a.seed,
    )
    print(f"wrote {os.path.abspath(a.output)}")


if __name__ == "__main__":
    main(sys.argv[1:])
