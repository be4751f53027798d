"""Interop with transformers' LlavaForConditionalGeneration (llava-hf, convert_llava_weights_to_hf.py), both directions.

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
from torch import Tensor, nn
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
from minillava.model import build_projector
from minillava.weights import pretrained_state_dict, read_mm_projector, read_weights

IMAGE_TOKEN, PAD_TOKEN, VOCAB_MULTIPLE = "<image>", "<pad>", 64  # convert_llava_weights_to_hf.py: 32000 + 2 -> 32064
_DROP = (".inv_freq", ".position_ids")  # non-persistent today; old checkpoints carry them
_STRATEGY = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> vision_feature_select_strategy
# First match wins. HF: the on-disk layout of transformers <= 4.51 and 5.x (language_model.model.*, vision_tower.*),
# the in-memory one of >= 4.52 (model.language_model.*, lm_head.*); hub folders add CLIP's vision_model. level.
_HF_RULES = ((r"(model\.language_model|language_model\.model)\.", "llm.model."),
             (r"(language_model\.)?lm_head\.", "llm.lm_head."),
             (r"(model\.)?vision_tower\.(vision_model\.)?", "vision_tower."),
             (r"(model\.)?multi_modal_projector\.linear_1\.", "mm_projector.0."),
             (r"(model\.)?multi_modal_projector\.linear_2\.", "mm_projector.2."))  # fmt: skip
_LLAVA_RULES = ((r"model\.mm_projector\.", "mm_projector."),  # the inverse of weights.to_llava_key
                (r"model\.vision_tower\.vision_tower\.(vision_model\.)?", "vision_tower."),
                (r"model\.", "llm.model."), (r"lm_head\.", "llm.lm_head."))  # fmt: skip
# Our names -> LlavaForConditionalGeneration's in-memory names (its save_pretrained picks the on-disk layout).
_TO_HF = {"llm.model.": "model.language_model.", "llm.lm_head.": "lm_head.", "vision_tower.": "model.vision_tower.",
          "mm_projector.0.": "model.multi_modal_projector.linear_1.",
          "mm_projector.2.": "model.multi_modal_projector.linear_2."}  # fmt: skip
_EMBEDDINGS = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")


@dataclass(kw_only=True)
class LlavaSettings:
    """The model knobs a checkpoint was trained with (LLaVA's mm_* config fields)."""

    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    model_max_length: int = 2048
    vision_tower: str | None = None  # LLaVA format: the CLIP folder; llava-hf folders carry their vision config


def _config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def checkpoint_kind(path: str) -> str | None:
    """ "llava-hf" (LlavaForConditionalGeneration), "llava" (LLaVA / minillava stage 2) or None (anything else)."""
    conf = _config(path) if os.path.isfile(os.path.join(path, "config.json")) else {}
    if conf.get("model_type") == "llava" and "text_config" in conf:
        return "llava-hf"
    return "llava" if conf.get("model_type") in ("llava", "llava_llama") and "mm_hidden_size" in conf else None


def _check_kind(path: str) -> str:
    if (kind := checkpoint_kind(path)) is None:
        raise ValueError(f"{path!r}: not a llava-hf or LLaVA-format stage-2 folder (config.json model_type)")
    return kind


def read_settings(path: str) -> LlavaSettings:
    """A stage-2 folder's LlavaSettings: LLaVA's mm_* fields, or a llava-hf config plus its processor's do_pad."""
    conf, get = _config(path), _config(path).get
    if _check_kind(path) == "llava":
        return LlavaSettings(
            mm_projector_type=get("mm_projector_type", "linear"),  # LLaVA's getattr default (builder.py)
            mm_vision_select_layer=get("mm_vision_select_layer", -2),
            mm_vision_select_feature=get("mm_vision_select_feature", "patch"),
            image_aspect_ratio=get("image_aspect_ratio", "square"),
            model_max_length=get("tokenizer_model_max_length", 2048),
            vision_tower=get("mm_vision_tower"),
        )
    layer, strategy = get("vision_feature_layer", -2), get("vision_feature_select_strategy", "default")
    text, bias = conf["text_config"].get("model_type", "llama"), get("multimodal_projector_bias", True)
    if not isinstance(layer, int) or get("projector_hidden_act", "gelu") != "gelu" or text != "llama" or not bias:
        raise ValueError(f"{path!r}: only Llama + one int vision_feature_layer + biased gelu MLP maps to LLaVA-1.5")
    return LlavaSettings(
        mm_vision_select_layer=layer,
        mm_vision_select_feature={v: k for k, v in _STRATEGY.items()}[strategy],
        image_aspect_ratio="pad" if LlavaImageProcessorPil.from_pretrained(path).do_pad else "square",
    )


def _rename(state: dict[str, Tensor], rules: tuple, path: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        new = next((re.sub(f"^{pat}", rep, key) for pat, rep in rules if re.match(pat, key)), None)
        if new is None:
            raise ValueError(f"{path!r}: unexpected weight {key!r} (only LLaVA-1.5 / llava-hf keys are mapped)")
        if not key.endswith(_DROP):
            out[new] = value
    return out


def _llm_config(conf: dict) -> LlamaConfig:
    """LlamaConfig from a LLaVA config.json: LLaVA's mm_* fields and model_type llava_llama are dropped."""
    known = LlamaConfig().to_dict().keys() - {"model_type", "architectures", "transformers_version"}
    return LlamaConfig(**{k: v for k, v in conf.items() if k in known | {"rope_theta", "rope_scaling"}})


def _clip_state(folder: str) -> dict[str, Tensor]:
    """CLIP vision weights of a folder keyed vision_tower.* (as weights.pretrained_state_dict, without the LLM)."""
    clip = read_weights(folder, "--vision_tower")
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in clip) else ""  # openai CLIPModel folders
    keep = [k for k in clip if k.startswith(prefix) and not k.endswith(_DROP)]
    return {f"vision_tower.{k.removeprefix(prefix)}": clip[k] for k in keep}


def _clip_folder(path: str, vision_tower: str | None) -> str:
    clip = vision_tower or _config(path).get("mm_vision_tower")
    if not clip or not os.path.isdir(clip):
        raise ValueError(f"{path!r}: its vision tower {clip!r} is not a local folder; pass --vision_tower CLIP_DIR")
    return clip


def llava_checkpoint_configs(path: str, vision_tower: str | None = None) -> tuple[LlamaConfig, CLIPVisionConfig]:
    """(llm_config, vision_config) of a llava-hf or LLaVA folder without reading weights (every rank builds the meta
    model from these). LLaVA format: CLIP's config from `vision_tower`, else the config's mm_vision_tower folder.
    llava-hf: vocab_size is the original one (image_token_index, the first row the converter appended)."""
    kind, conf = _check_kind(path), _config(path)
    if kind == "llava":
        return _llm_config(conf), CLIPVisionConfig.from_pretrained(_clip_folder(path, vision_tower))
    read_settings(path)  # validates the vision feature settings
    llm_config = _llm_config(conf["text_config"])
    llm_config.vocab_size = min(llm_config.vocab_size, conf.get("image_token_index", 32000))
    if (llm_config.pad_token_id or 0) >= llm_config.vocab_size:  # <pad> was one of the appended rows
        llm_config.pad_token_id = None
    return llm_config, CLIPVisionConfig(**conf["vision_config"])


def load_llava_checkpoint_state(
    path: str, vision_tower: str | None = None
) -> tuple[LlamaConfig, CLIPVisionConfig, dict[str, Tensor]]:
    """(llm_config, vision_config, state keyed llm.* / vision_tower.* / mm_projector.*) of a llava-hf or LLaVA folder.

    llava-hf: the rows the converter appended (<image>, <pad>, padding to a multiple of 64) are dropped, so the LLM
    has its original vocabulary (minillava splices images at id -200 and never looks those rows up). LLaVA format:
    CLIP's weights are the checkpoint's copy (model.vision_tower.*), else those of the CLIP folder."""
    llm_config, vision_config = llava_checkpoint_configs(path, vision_tower)
    if checkpoint_kind(path) == "llava-hf":
        state = _rename(read_weights(path, "checkpoint"), _HF_RULES, path)
        return llm_config, vision_config, state | {k: state[k][: llm_config.vocab_size] for k in _EMBEDDINGS}
    state = _rename(read_weights(path, "checkpoint"), _LLAVA_RULES, path)
    if not any(k.startswith("vision_tower.") for k in state):
        state.update(_clip_state(_clip_folder(path, vision_tower)))
    return llm_config, vision_config, state


def sample_new_rows(weight: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n float64 rows drawn from N(mu, 1e-5 * Sigma) of `weight`'s rows, as convert_llava_weights_to_hf.py does.

    Sigma is the population covariance (divided by the row count), as there; sampling uses a Cholesky factor (a
    symmetric square root when Sigma is singular) and a seeded generator, so an export is reproducible. Deviation:
    the reference draws lm_head's rows from the input embeddings' statistics too; each matrix uses its own here
    (as transformers' resize_token_embeddings(mean_resizing=True)), since the two have different scales."""
    w = weight.double()
    centred = w - (mu := w.mean(0))
    cov = 1e-5 * (centred.T @ centred) / w.shape[0]  # (D, D)
    factor, info = torch.linalg.cholesky_ex(cov)
    if info:
        evals, evecs = torch.linalg.eigh(cov)
        factor = evecs * evals.clamp(min=0).sqrt()
    return mu + torch.randn(n, w.shape[1], generator=generator, dtype=torch.float64) @ factor.T  # (n, D)


def chat_template(version: str) -> str:
    """Jinja for `version`'s prompt (conversation.py get_prompt, style TWO), images first as preprocess_multimodal:
    system + " USER: <image> \\n... ASSISTANT: answer</s>USER: ... ASSISTANT:".

    The space in "<image> \\n" is deliberate: LLaVA tokenizes the text after an image on its own, so SentencePiece
    puts its word prefix there (tokenizer_image_token). A fast tokenizer splitting at the special <image> adds none;
    the space restores it, so chat template + processor give exactly the ids LLaVA trained and evaluated on."""
    t = get_template(version)
    if t.style != "two":
        raise ValueError(f"--version {version!r}: only conversation templates (v1, llava_v1) have a chat template")
    texts = "(c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' '))"
    return (
        f"{{%- set ns = namespace(system={t.system!r}) -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set c = messages[0]['content'] -%}"
        f"{{%- set ns.system = c if c is string else {texts} -%}}{{%- endif -%}}{{{{- ns.system + {t.sep!r} -}}}}"
        "{%- for m in messages if m['role'] != 'system' -%}{%- set c = m['content'] -%}"
        f"{{{{- ({t.roles[0]!r} if m['role'] == 'user' else {t.roles[1]!r}) + ': ' -}}}}{{%- if c is not string -%}}"
        "{%- for i in c if i['type'] == 'image' -%}{{- '<image> \\n' -}}{%- endfor -%}{%- endif -%}"
        f"{{{{- c if c is string else {texts} -}}}}{{{{- {t.sep!r} if m['role'] == 'user' else {t.sep2!r} -}}}}"
        f"{{%- endfor -%}}{{%- if add_generation_prompt -%}}{{{{- {t.roles[1] + ':'!r} -}}}}{{%- endif -%}}"
    )


def hf_config(llm: LlamaConfig, vision: CLIPVisionConfig, s: LlavaSettings, vocab: int, image_id: int) -> LlavaConfig:
    """The LlavaConfig of an export: gelu MLP projector, vision_feature_layer = mm_vision_select_layer."""
    if s.mm_projector_type != "mlp2x_gelu":
        raise ValueError(
            f"mm_projector_type {s.mm_projector_type!r}: LlavaForConditionalGeneration has mlp2x_gelu only"
        )
    return LlavaConfig(
        text_config=LlamaConfig.from_dict({**llm.to_dict(), "vocab_size": vocab}),  # pad_token_id: the LLM's (0)
        vision_config=vision,
        image_token_index=image_id,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2 + (s.mm_vision_select_feature == "cls_patch"),
        projector_hidden_act="gelu",  # exact erf GELU, as LLaVA's nn.GELU() (multimodal_projector/builder.py)
        vision_feature_layer=s.mm_vision_select_layer,
        vision_feature_select_strategy=_STRATEGY[s.mm_vision_select_feature],
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        pad_token_id=image_id + 1,  # <pad>, added right after <image>
    )


def build_hf_model(config: LlavaConfig, state: dict[str, Tensor]) -> LlavaForConditionalGeneration:
    """LlavaForConditionalGeneration holding `state` (our names), loaded strictly; built on meta, so nothing is
    initialised twice (a 7B export never holds a random copy)."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    prefix = {name: next(o for o in _TO_HF if name.startswith(o)) for name in state}
    model.load_state_dict({_TO_HF[o] + k[len(o) :]: state[k] for k, o in prefix.items()}, strict=True, assign=True)
    lm, emb = model.model.language_model, model.model.vision_tower.embeddings  # non-persistent buffers: recompute
    lm.rotary_emb = type(lm.rotary_emb)(config=config.text_config)
    emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand(1, -1), persistent=False)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    return model.eval()


def add_llava_tokens(tokenizer: Any) -> int:
    """Add <image> (special, unnormalised) then <pad>, as the converter does; the <image> id (32000 for Vicuna)."""
    tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert tokenizer.pad_token_id == image_id + 1, "a tokenizer that had <pad> but not <image>"
    return image_id


def _source(checkpoint: str | None, llm: str | None, adapter: str | None, clip: str | None) -> tuple:
    """(settings, llm_config, vision_config, state, CLIP folder, tokenizer folder) of either export source."""
    if checkpoint:
        if checkpoint_kind(checkpoint) != "llava":
            raise ValueError(f"--checkpoint {checkpoint!r}: not a LLaVA-format stage-2 folder (model_type llava_llama)")
        s = read_settings(checkpoint)
        return s, *load_llava_checkpoint_state(checkpoint, clip), clip or s.vision_tower, checkpoint
    if not (llm and adapter and clip):
        raise ValueError("give --checkpoint, or all of --model_name_or_path, --pretrain_mm_mlp_adapter, --vision_tower")
    stage1 = os.path.dirname(os.path.abspath(adapter))  # a stage-1 output_dir has LLaVA's config.json next to it
    s = read_settings(stage1) if checkpoint_kind(stage1) == "llava" else LlavaSettings()
    llm_config, vision_config = LlamaConfig.from_pretrained(llm), CLIPVisionConfig.from_pretrained(clip)
    holder = nn.Module()
    holder.mm_projector = build_projector(s.mm_projector_type, vision_config.hidden_size, llm_config.hidden_size)
    state = pretrained_state_dict(llm, clip) | read_mm_projector(holder, adapter)
    return s, llm_config, vision_config, state, clip, llm


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
    """Write `output` as a llava-hf folder: weights (dtype None: the checkpoint's), config, generation config,
    tokenizer (+<image>, <pad>), LlavaProcessor (the CLIP folder's preprocessing, do_pad = image_aspect_ratio pad,
    v1 chat template). AutoProcessor.from_pretrained(output, backend="pil") preprocesses exactly as training did;
    the default torchvision backend differs slightly (data.load_image_processor)."""
    s, llm_config, vision_config, state, clip, tok_dir = _source(
        checkpoint, model_name_or_path, pretrain_mm_mlp_adapter, vision_tower
    )
    dtype = dtype or state[_EMBEDDINGS[0]].dtype
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_id = add_llava_tokens(tokenizer)
    old = llm_config.vocab_size
    vocab = -(-max(old, len(tokenizer)) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE  # 32000 + 2 -> 32064, as llava-hf
    generator = torch.Generator().manual_seed(seed)
    for k in _EMBEDDINGS:
        state[k] = torch.cat([state[k].to(dtype), sample_new_rows(state[k], vocab - old, generator).to(dtype)])
    config = hf_config(llm_config, vision_config, s, vocab, image_id)
    config.text_config.dtype = config.vision_config.dtype = dtype  # save_pretrained sets only the top-level one
    model = build_hf_model(config, {k: v.to(dtype) for k, v in state.items()})
    if os.path.isfile(os.path.join(tok_dir, "generation_config.json")):  # the LLM's (bos, eos, sampling defaults)
        model.generation_config = GenerationConfig.from_pretrained(tok_dir)
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(output)
    LlavaProcessor(
        image_processor=LlavaImageProcessorPil.from_pretrained(clip, do_pad=s.image_aspect_ratio == "pad"),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS: "default" drops it again, so <image> -> image_seq_length ids
        chat_template=chat_template(version),
    ).save_pretrained(output)


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
    kw = vars(p.parse_args(argv))
    kw["dtype"] = None if kw["dtype"] == "auto" else getattr(torch, kw["dtype"])
    output = kw.pop("output")
    export_llava_hf(output, **kw)
    print(f"wrote {os.path.abspath(output)}")


if __name__ == "__main__":
    main(sys.argv[1:])
