"""LLaVA-1.5 conversation templates, chunked image tokenization and label masking (llava/conversation.py,
llava/mm_utils.py tokenizer_image_token, llava/train/train.py preprocess_*), and the --version table, which also
names LLaVA-NeXT's turn-by-turn templates (their labelling scheme: minillava/chat_turns.py).
Pure: strings and int lists in, int lists out; no torch, no I/O."""

from dataclasses import dataclass
from typing import Any, Protocol

from minillava.chat_turns import LLAMA3_SYSTEM, inference_prompt, preprocess_turns
from minillava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX


class Tokenizer(Protocol):
    """The slice of a HF tokenizer this module uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any: ...


@dataclass(frozen=True)
class Template:
    """A LLaVA conversation template. Its style is the SeparatorStyle: "two" (TWO), "plain" (PLAIN), "mpt" (MPT) and
    "llama_2" (LLAMA_2) are labelled from the answers' boundaries here; "qwen" and "llama3" are LLaVA-NeXT's
    turn-by-turn templates (chat_turns.py), whose system is the inference prompt's."""

    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None
    style: str


_SYSTEM = (  # conv_vicuna_v1 says "user", conv_llava_v1 says "human"
    "A chat between a curious {0} and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the {0}'s questions."
)
_V1 = Template(_SYSTEM.format("user"), ("USER", "ASSISTANT"), " ", "</s>", "two")  # conversation.py L242
_PLAIN = Template("", ("", ""), "\n", None, "plain")  # conv_llava_plain, conversation.py L291
_QWEN = Template("You are a helpful assistant.", ("user", "assistant"), "<|im_end|>", None, "qwen")
_CHATML_DIRECT = Template("<|im_start|>system\nAnswer the questions.",
                          ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>", None, "mpt")
TURN_STYLES = ("qwen", "llama3")
TEMPLATES: dict[str, Template] = {
    "plain": _PLAIN,
    "v0_plain": _PLAIN,
    "v1": _V1,
    "vicuna_v1": _V1,
    "llava_v1": Template(_SYSTEM.format("human"), ("USER", "ASSISTANT"), " ", "</s>", "two"),  # L325
    # LLaVA-NeXT's conversation.py: conv_qwen (L443), conv_qwen_2_5 (L454), conv_llava_llama_3 (L386)
    "qwen_1_5": _QWEN,
    "qwen_2": _QWEN,
    "qwen_2_5": Template("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                         ("user", "assistant"), "<|im_end|>", None, "qwen"),
    "llava_llama_3": Template(LLAMA3_SYSTEM, ("user", "assistant"), "<|eot_id|>", None, "llama3"),
    "chatml_direct": _CHATML_DIRECT,  # conv_chatml_direct L554 (llava-v1.6-34b's Yi format)
    "mistral_direct": _CHATML_DIRECT,  # conv_mistral_direct L543: the same template
    "mistral_instruct": Template("", ("USER", "ASSISTANT"), "", "</s>", "llama_2"),  # conv_mistral_instruct L399
}
KNOWN_VERSIONS: tuple[str, ...] = tuple(TEMPLATES)
_ROLES = ("human", "gpt")


def get_template(version: str) -> Template:
    """The template for a --version key; unlike LLaVA (which falls back to vicuna_v1) unknown keys are an error."""
    if version not in TEMPLATES:
        raise ValueError(f"--version {version!r} is not supported; known versions: {', '.join(KNOWN_VERSIONS)}")
    return TEMPLATES[version]


class TokenizationMismatch(ValueError):
    """Token boundaries of the prompt's pieces do not line up with its full tokenization; carries the full ids."""

    def __init__(self, message: str, input_ids: list[int]) -> None:
        super().__init__(message)
        self.input_ids = input_ids


def tokenizer_image_token(prompt: str, tokenizer: Tokenizer) -> list[int]:
    """Tokenize each "<image>"-separated chunk on its own, keep one leading BOS, put -200 between chunks.

    mm_utils.py L185-204: every chunk gets SentencePiece's word prefix, so tokenizing in one piece gives other ids."""
    texts = prompt.split(DEFAULT_IMAGE_TOKEN)
    # LLaVA's slow tokenizer always adds the '▁' word prefix (" A" -> '▁', '▁A'); transformers 5's Llama tokenizer
    # skips it when the text starts with a space (" A" -> '▁A', as "A"). Such a tokenizer gets the space back.
    if any(t.startswith(" ") for t in texts) and tokenizer(" a").input_ids == tokenizer("a").input_ids:
        texts = [" " + t if t.startswith(" ") else t for t in texts]
    chunks = [list(tokenizer(t).input_ids) for t in texts]
    bos = tokenizer.bos_token_id
    has_bos = bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos
    ids = [bos] if has_bos else []
    for k, chunk in enumerate(chunks):
        ids.extend(([IMAGE_TOKEN_INDEX] if k else []) + (chunk[1:] if has_bos and chunk[:1] == [bos] else chunk))
    return ids


def preprocess_multimodal(conversations: list[dict]) -> list[dict]:
    """Move "<image>" to the front of every turn that has one ("<image>\\n" + rest), train.py L308-329; no mutation."""
    out = []
    for turn in conversations:
        value = turn["value"]
        if DEFAULT_IMAGE_TOKEN in value:
            value = (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
        out.append({**turn, "value": value})
    return out


def check_conversations(conversations: Any, version: str, has_image: bool) -> list[dict]:
    """Turns minus a leading gpt turn (train.py L423); ValueError where LLaVA asserts, crashes or trains wrong."""
    template = get_template(version)
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list of turns")
    for j, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {j} must be {{'from': 'human'|'gpt', 'value': str}}, got {str(turn)[:80]!r}")
        if not turn["value"]:  # Conversation.get_prompt renders it as a bare "ROLE:" with no separator
            raise ValueError(f"turn {j} ({turn['from']}) has an empty value")
    # train.py L423 (LLaVA-NeXT: preprocess_llama_2, _mpt, _qwen, _llama3 likewise); plain keeps the 2-turn rule
    leading_gpt_dropped = template.style != "plain"
    turns = conversations[1:] if conversations[0]["from"] == "gpt" and leading_gpt_dropped else conversations
    for j, turn in enumerate(turns):
        if turn["from"] != _ROLES[j % 2]:
            raise ValueError(f"turns must alternate human/gpt starting with human; turn {j} is {turn['from']!r}")
    if not turns or turns[-1]["from"] != "gpt":  # LLaVA masks the whole sample for an unanswered last turn
        raise ValueError("the conversation must end with a gpt turn")
    n_images = sum(t["value"].count(DEFAULT_IMAGE_TOKEN) for t in turns)
    plain_ok = len(turns) == 2 and DEFAULT_IMAGE_TOKEN in turns[0]["value"]  # train.py L593-594 asserts
    if template.style == "plain" and not plain_ok:
        raise ValueError("the plain template needs exactly one human turn with <image> and one gpt caption")
    if has_image and n_images != 1:
        # 0: the model would consume the image without placing it (LLaVA trains text-only, silently);
        # >1: the model would splice other samples' images. LLaVA-1.5 data has exactly one.
        raise ValueError(f"a sample with an 'image' needs exactly one {DEFAULT_IMAGE_TOKEN} token, found {n_images}")
    if not has_image and n_images:
        raise ValueError(f"{n_images} {DEFAULT_IMAGE_TOKEN} token(s) but the sample has no 'image' key")
    return turns


def _turn(t: Template, j: int, msg: str) -> tuple[str, str]:
    """Turn j as Conversation.get_prompt renders it: (unsupervised part, supervised part); user turns are all
    unsupervised. The supervised part is what LLaVA's preprocess_* length arithmetic intends to label."""
    if t.style == "two":  # role + ": " + msg + (" " | "</s>"): the answer's span starts at the space ('▁The')
        return (f"{t.roles[0]}: {msg}{t.sep}", "") if j % 2 == 0 else (f"{t.roles[1]}:", f" {msg}{t.sep2}")
    if t.style == "mpt":  # role (with its "<|im_start|>...\n") + msg + "<|im_end|>"
        return (f"{t.roles[0]}{msg}{t.sep}", "") if j % 2 == 0 else (t.roles[1], f"{msg}{t.sep}")
    if t.style == "llama_2":  # "[INST] " + <<SYS>> block (first turn) + msg + " [/INST]", then " " + msg + " </s>"
        system = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n" if t.system and j == 0 else ""
        return (f"{t.sep if j else ''}[INST] {system}{msg} [/INST]", "") if j % 2 == 0 else ("", f" {msg} {t.sep2}")
    raise ValueError(f"template style {t.style!r} is not rendered here")


def _render(template: Template, turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The training prompt and the character spans of its supervised parts."""
    if template.style == "plain":
        # preprocess_plain (L588-607): the instruction is dropped; "<image>" + caption + "\n", caption supervised.
        text = DEFAULT_IMAGE_TOKEN + turns[1]["value"] + template.sep
        return text, [(len(DEFAULT_IMAGE_TOKEN), len(text))]
    # get_prompt: the system and its separator first (LLAMA_2 puts its system inside the first [INST] instead)
    text, spans = ("" if template.style == "llama_2" else template.system + template.sep), []
    for j, turn in enumerate(turns):
        head, supervised = _turn(template, j, turn["value"])
        text += head
        if supervised:
            spans.append((len(text), len(text) + len(supervised)))
            text += supervised
    return text, spans


def _labels(
    text: str, spans: list[tuple[int, int]], tok: Tokenizer, restart: str | None
) -> tuple[list[int], list[int]]:
    """Labels from token boundaries, not LLaVA's length arithmetic (train.py L456-490).

    A span boundary's token index is the length of the tokenized prefix before it, which must be a prefix of the full
    ids (checked: never a silent shift). Spans end with `restart`, a special token ("</s>") where tokenization starts
    afresh, so later prefixes start at the previous span's end, led by `restart` for context (non-legacy Llama:
    "USER", not '▁USER', after </s>). That keeps the cost linear in the number of turns."""
    ids = tokenizer_image_token(text, tok)
    lead = len(tokenizer_image_token(restart, tok)) if restart else 0
    anchor_char = anchor_tok = 0  # where the previous span ended, in characters and in tokens

    def boundary(pos: int) -> int:
        if pos == len(text):
            return len(ids)
        if anchor_char == 0:
            piece = tokenizer_image_token(text[:pos], tok)
        else:
            piece = tokenizer_image_token(restart + text[anchor_char:pos], tok)[lead:]
        if ids[anchor_tok : anchor_tok + len(piece)] != piece:
            msg = f"tokenization mismatch: the prompt up to {text[max(0, pos - 40) : pos]!r} is not a token prefix"
            raise TokenizationMismatch(msg + " of the full prompt, so labels cannot be placed", ids)
        return anchor_tok + len(piece)

    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        a, b = boundary(start), boundary(end)
        labels[a:b] = [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t for t in ids[a:b]]
        if restart:
            anchor_char, anchor_tok = end, b
    return ids, labels


def preprocess(
    conversations: list[dict], tokenizer: Tokenizer, version: str, has_image: bool
) -> tuple[list[int], list[int]]:
    """Validate, render and tokenize one record's turns -> (input_ids, labels), untruncated (as LLaVA's image path).

    plain: [BOS, -200, caption..., "\\n"] with BOS and image masked, no EOS. v1: only the assistant answers, each with
    its closing </s>, are supervised; chatml_direct and mistral_instruct likewise (each answer with its <|im_end|>,
    or " answer </s>"). qwen_* and llava_llama_3: chat_turns.preprocess_turns. Raises ValueError
    (TokenizationMismatch if pieces do not line up)."""
    template = get_template(version)
    turns = check_conversations(conversations, version, has_image)
    if has_image:
        turns = preprocess_multimodal(turns)
    if template.style in TURN_STYLES:  # LLaVA-NeXT's turn-by-turn labelling (chat_turns.py)
        return preprocess_turns(turns, tokenizer, template.style)
    text, spans = _render(template, turns)
    restart = template.sep if template.style == "mpt" else template.sep2  # the special token closing each answer
    return _labels(text, spans, tokenizer, restart)


def build_inference_prompt(question: str, version: str, has_image: bool, tokenizer: Tokenizer | None = None) -> str:
    """The prompt a trained model sees at inference (LLaVA's eval: "<image>\\n" + question, open ASSISTANT turn);
    plain gives "<image>" alone: stage 1 trains on "<image>" + caption, without the instruction. llava_llama_3 is
    rendered by the tokenizer's own chat template (pass it)."""
    template = get_template(version)
    if template.style == "plain":
        if not has_image:
            raise ValueError("the plain template only captions images: has_image must be True")
        return DEFAULT_IMAGE_TOKEN
    user = DEFAULT_IMAGE_TOKEN + "\n" + question if has_image else question
    if template.style in TURN_STYLES:
        return inference_prompt(template.style, template.system, user, tokenizer)
    text, _ = _render(template, [{"from": "human", "value": user}])  # get_prompt with an open assistant turn
    return text + _turn(template, 1, "")[0]
