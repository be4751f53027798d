"""LLaVA-NeXT's second labelling scheme: turn-by-turn chat templates (llava/train/train.py preprocess_qwen,
preprocess_llama3 in LLaVA-VL/LLaVA-NeXT). Each turn is rendered and tokenized on its own and appended; system and
user turns are masked, assistant turns labelled whole (their header included), and then a fixed list of structural
tokens is labelled wherever it occurs, in user and system turns too. LLaVA-1.5's scheme (labels from the answers'
boundaries) is minillava/conversation.py's. Pure: strings and int lists in, int lists out; no torch, no I/O.

Where LLaVA-NeXT's code cannot run as written on today's tokenizers we keep its rule, not its mechanics:
- preprocess_qwen unpacks `tokenizer.additional_special_tokens_ids` into exactly (im_start, im_end), which fails
  for Qwen2.5 and Qwen3 tokenizers (more special tokens) and for transformers 5 (the attribute is gone); we look the
  two tokens up by name. It hard-codes 198 as "\\n" (Qwen's id): we take the tokenizer's own single "\\n" token.
- both add "<image>" to a copy of the tokenizer as a special token so that it stays one piece; we tokenize the text
  around each "<image>" on its own and put -200 between, which gives the same ids (a special token splits the text).
"""

from collections.abc import Callable
from typing import Any

from minillava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX

QWEN_TRAIN_SYSTEM = "You are a helpful assistant."  # preprocess_qwen's own, whatever the --version's template says
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)  # conv_llava_llama_3 (conversation.py L386) and preprocess_llama3's default
QWEN_UNMASK = ("<|im_start|>", "<|im_end|>")  # plus "\n": preprocess_qwen's unmask_tokens_idx [198, im_start, im_end]
# preprocess_llama3 also lists "\n\n", which convert_tokens_to_ids gives None for in a byte-level vocabulary: "\n\n"
# stays masked outside assistant turns. We keep that (it is what LLaVA-NeXT trains).
LLAMA3_UNMASK = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
ROLES = {"human": "user", "gpt": "assistant"}


def _ids(text: str, tokenizer: Any) -> list[int]:
    """Tokens of a rendered turn, no special tokens added; each "<image>" becomes IMAGE_TOKEN_INDEX."""
    out: list[int] = []
    for k, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        out += ([IMAGE_TOKEN_INDEX] if k else []) + list(tokenizer(chunk, add_special_tokens=False).input_ids)
    return out


def _token_id(tokenizer: Any, token: str) -> int:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"the tokenizer has no {token!r} token (the template needs it)")
    return ids[0]


def _without_bos(text: str, tokenizer: Any) -> str:
    """A rendered chat template without its leading {{ bos_token }}."""
    bos = tokenizer.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text


def qwen_turn(role: str, content: str) -> str:
    """preprocess_qwen's chat template: <|im_start|>{role}\\n{content}<|im_end|>\\n (no trim, no default system)."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def llama3_turn(tokenizer: Any) -> Callable[[str, str], str]:
    """preprocess_llama3's turns: the tokenizer's own chat template, each turn without its leading BOS (the
    template's {{ bos_token }}); Llama-3.1/3.2 templates add their dated system block to every turn, as there."""

    def render(role: str, content: str) -> str:
        return _without_bos(tokenizer.apply_chat_template([{"role": role, "content": content}], tokenize=False),
                            tokenizer)  # fmt: skip

    return render


def preprocess_turns(turns: list[dict], tokenizer: Any, style: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of validated LLaVA turns ({"from": human|gpt, "value": ...}) under `style` qwen or llama3.

    qwen: the system turn "You are a helpful assistant." then each turn; labelled: assistant turns whole, and
    <|im_start|>, <|im_end|> and "\\n" everywhere; no BOS. llama3: BOS + the llava_llama_3 system turn then each
    turn, by the tokenizer's chat template; labelled: assistant turns whole, and BOS, <|start_header_id|>,
    <|end_header_id|> and <|eot_id|> everywhere."""
    if style == "qwen":
        render, system = qwen_turn, QWEN_TRAIN_SYSTEM
        unmask = {_token_id(tokenizer, t) for t in QWEN_UNMASK} | {_token_id(tokenizer, "\n")}
        ids = _ids(render("system", system), tokenizer)
    elif style == "llama3":
        render, system = llama3_turn(tokenizer), LLAMA3_SYSTEM
        unmask = {_token_id(tokenizer, t) for t in LLAMA3_UNMASK}
        ids = [tokenizer.bos_token_id, *_ids(render("system", system), tokenizer)]
    else:
        raise ValueError(f"unknown turn style {style!r}")
    labels = [IGNORE_INDEX] * len(ids)
    for turn in turns:
        role = ROLES[turn["from"]]
        piece = _ids(render(role, turn["value"]), tokenizer)
        ids += piece
        labels += [t if role == "assistant" and t != IMAGE_TOKEN_INDEX else IGNORE_INDEX for t in piece]
    labels = [t if t in unmask else label for t, label in zip(ids, labels, strict=True)]
    return ids, labels


def inference_prompt(style: str, system: str, user: str, tokenizer: Any | None = None) -> str:
    """The prompt up to the open assistant turn (the template's generation slot)."""
    if style == "qwen":
        return qwen_turn("system", system) + qwen_turn("user", user) + "<|im_start|>assistant\n"
    if tokenizer is None:
        raise ValueError("the llava_llama_3 prompt is rendered by the tokenizer's chat template: pass the tokenizer")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _without_bos(text, tokenizer)  # the tokenizer adds BOS itself
