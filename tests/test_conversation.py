"""Templates, chunked image tokenization and label masking (minillava/conversation.py) against LLaVA-1.5:
golden ids/labels on the fixture tokenizer, and parity with a transcription of LLaVA's own preprocess_v1 arithmetic."""

import json
import random
from types import SimpleNamespace

import pytest
from conftest import COLOURS, SHAPES, SYSTEM, WORDS

from minillava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from minillava.conversation import (
    KNOWN_VERSIONS,
    TokenizationMismatch,
    _render,
    build_inference_prompt,
    check_conversations,
    get_template,
    preprocess,
    preprocess_multimodal,
    tokenizer_image_token,
)


def H(v):
    return {"from": "human", "value": v}


def G(v):
    return {"from": "gpt", "value": v}


def supervised_runs(labels):
    """[(start, end)] of the maximal runs of supervised positions."""
    runs, start = [], None
    for i, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def masked(ids, runs):
    """The labels that supervise exactly `runs` of `ids`."""
    keep = {i for a, b in runs for i in range(a, b)}
    return [t if i in keep else IGNORE_INDEX for i, t in enumerate(ids)]


class CharTokenizer:
    """nanochat-style fake satisfying the Tokenizer protocol: one id per character, "</s>" special, BOS=1.
    With merge_colon=True it fuses ": " into one token, so a prefix ending in ":" no longer lines up."""

    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 1, 2, 0, 0

    def __init__(self, merge_colon=False):
        self.merge_colon = merge_colon

    def __call__(self, text, add_special_tokens=True):
        ids, i = ([1] if add_special_tokens else []), 0
        while i < len(text):
            if text.startswith("</s>", i):
                ids, i = [*ids, 2], i + 4
            elif self.merge_colon and text.startswith(": ", i):
                ids, i = [*ids, 3], i + 2
            else:
                ids, i = [*ids, ord(text[i]) + 10], i + 1
        return SimpleNamespace(input_ids=ids)


# ---------------------------------------------------------------- templates


def test_known_versions_and_unknown_version_error():
    assert {"plain", "v1", "vicuna_v1", "llava_v1"} <= set(KNOWN_VERSIONS)
    assert get_template("v1") is get_template("vicuna_v1")
    with pytest.raises(ValueError, match=r"'v2'.*plain.*v1.*vicuna_v1"):
        get_template("v2")
    with pytest.raises(ValueError, match="known versions"):
        preprocess([H("hi"), G("yo")], CharTokenizer(), "llama_2", False)


def test_v1_render_matches_llava_get_prompt():
    # conv_vicuna_v1.get_prompt(): "<SYS> USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"
    turns = [H("<image>\nQ1?"), G("A1."), H("Q2?"), G("A2.")]
    text, spans = _render(get_template("v1"), turns)
    assert text == SYSTEM + " USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"
    assert [text[a:b] for a, b in spans] == [" A1.</s>", " A2.</s>"]
    llava = _render(get_template("llava_v1"), turns)[0]
    assert llava.startswith("A chat between a curious human and") and "the human's questions. USER:" in llava


def test_plain_render_drops_instruction():
    text, spans = _render(get_template("plain"), [H("<image>\nDescribe it."), G("A red circle.")])
    assert text == "<image>A red circle.\n"
    assert [text[a:b] for a, b in spans] == ["A red circle.\n"]


def test_build_inference_prompt():
    assert build_inference_prompt("What is it?", "v1", True) == SYSTEM + " USER: <image>\nWhat is it? ASSISTANT:"
    assert build_inference_prompt("Hi", "vicuna_v1", False) == SYSTEM + " USER: Hi ASSISTANT:"
    assert build_inference_prompt("ignored", "plain", True) == "<image>"
    with pytest.raises(ValueError, match="plain"):
        build_inference_prompt("Hi", "plain", False)


# ---------------------------------------------------------------- tokenizer_image_token


def test_tokenizer_image_token_golden(tokenizer):
    ids = tokenizer_image_token("USER: <image>\nWhat", tokenizer)
    assert ids == [1, 451, 498, 474, IMAGE_TOKEN_INDEX, 474, 13, 90, 435]
    # Each chunk got its own word-prefix '▁' (474) and no BOS of its own; tokenizing in one piece differs.
    assert tokenizer.convert_ids_to_tokens(ids[5:7]) == ["▁", "<0x0A>"]
    assert tokenizer_image_token("<image>", tokenizer) == [1, IMAGE_TOKEN_INDEX]
    assert tokenizer_image_token("a<image>b<image>c", tokenizer).count(IMAGE_TOKEN_INDEX) == 2
    assert tokenizer_image_token("a<image>b<image>c", tokenizer).count(1) == 1
    assert tokenizer_image_token("The shape is red.", tokenizer) == tokenizer("The shape is red.").input_ids


def test_preprocess_multimodal_moves_image_to_front():
    turns = [H("What is this?\n<image>"), G("A cat."), H("  <image> and?  ")]
    out = preprocess_multimodal(turns)
    assert [t["value"] for t in out] == ["<image>\nWhat is this?", "A cat.", "<image>\nand?"]
    assert turns[0]["value"] == "What is this?\n<image>"  # records are not mutated
    assert preprocess_multimodal([H("<image>")])[0]["value"] == "<image>"  # the trailing "\n" is stripped again
    assert preprocess_multimodal(out) == out  # idempotent


# ---------------------------------------------------------------- golden ids + labels on the fixture tokenizer

# "<s> A chat between ... the user's questions." then "▁USER" ":" (30 + 2 tokens), shared by every v1 prompt.
SYS_IDS = [1, 271, 454, 461, 259, 462, 364, 303, 289, 467, 468, 368, 490, 446, 368, 458, 463, 502, 465, 502, 303]
SYS_IDS += [459, 460, 442, 294, 364, 510, 480, 466, 490, 451, 498]


def test_golden_plain(tokenizer):
    ids, labels = preprocess(
        [H("Render a clear and concise summary of the photo.\n<image>"), G("A red circle on a white background.")],
        tokenizer,
        "plain",
        True,
    )
    # BOS, image, "▁A ▁red ▁circle ▁on ▁a ▁white ▁background . \n"; the instruction is gone.
    assert ids == [1, IMAGE_TOKEN_INDEX, 271, 323, 315, 274, 259, 346, 283, 490, 13]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]  # caption + "\n" supervised, no EOS appended
    assert tokenizer.decode(ids[2:]) == "A red circle on a white background.\n"


def test_golden_v1_single_turn_image(tokenizer):
    ids, labels = preprocess(
        [H("<image>\nWhat is the colour of the shape?"), G("The shape is red.")], tokenizer, "v1", True
    )
    # "▁" <image> "▁ \n What ▁is ▁the ▁colour ▁of ▁the ▁shape ?" "▁ASSISTANT :" | "▁The ▁shape ▁is ▁red . </s>"
    q = [474, IMAGE_TOKEN_INDEX, 474, 13, 90, 435, 404, 294, 387, 383, 294, 381, 509, 367, 498]
    answer = [446, 381, 404, 323, 490, 2]
    assert ids == SYS_IDS + q + answer
    assert labels == masked(ids, [(47, 53)])
    assert tokenizer.convert_ids_to_tokens(ids[47]) == "▁The"  # the answer's first token carries the space
    assert tokenizer.decode(ids[47:53]) == "The shape is red.</s>"


def test_golden_v1_multi_turn_image_not_first(tokenizer):
    turns = [H("What shape is it?\n<image>"), G("A circle."), H("What colour?"), G("It is blue.")]
    ids, labels = preprocess(turns, tokenizer, "v1", True)
    q1 = [474, IMAGE_TOKEN_INDEX, 474, 13, 90, 435, 381, 404, 406, 509, 367, 498]  # <image> moved to the front
    a1 = [271, 315, 490, 2]  # "▁A ▁circle . </s>"
    q2 = [361, 498, 474, 90, 435, 387, 509, 367, 498]  # "USER" without '▁' after </s> (legacy=False)
    a2 = [474, 504, 481, 404, 340, 490, 2]  # "▁ I t ▁is ▁blue . </s>": no '▁It' piece, the '▁' is the answer's
    assert ids == SYS_IDS + q1 + a1 + q2 + a2
    assert supervised_runs(labels) == [(44, 48), (57, 64)]
    assert labels == masked(ids, [(44, 48), (57, 64)])
    assert [tokenizer.decode(ids[a:b]) for a, b in supervised_runs(labels)] == ["A circle.</s>", "It is blue.</s>"]
    assert tokenizer.convert_ids_to_tokens(ids[48]) == "USER"


def test_golden_v1_text_only_multi_turn(tokenizer):
    turns = [H("Is the sky blue?"), G("Yes, it is."), H("And the grass?"), G("Green.")]
    ids, labels = preprocess(turns, tokenizer, "v1", False)
    q1 = [474, 504, 480, 294, 266, 495, 499, 340, 509, 367, 498]
    a1 = [474, 92, 277, 502, 406, 404, 490, 2]
    q2 = [361, 498, 271, 265, 294, 474, 279, 476, 354, 509, 367, 498]
    a2 = [474, 74, 344, 490, 2]
    assert ids == SYS_IDS + q1 + a1 + q2 + a2
    assert IMAGE_TOKEN_INDEX not in ids
    assert labels == masked(ids, [(43, 51), (63, 68)])
    assert [tokenizer.decode(ids[a:b]) for a, b in supervised_runs(labels)] == ["Yes, it is.</s>", "Green.</s>"]


def test_v1_leading_gpt_turn_dropped_and_llava_v1(tokenizer):
    turns = [H("Is the sky blue?"), G("Yes, it is.")]
    assert preprocess([G("Hello!"), *turns], tokenizer, "v1", False) == preprocess(turns, tokenizer, "v1", False)
    ids, labels = preprocess(turns, tokenizer, "llava_v1", False)
    assert "curious human" in tokenizer.decode(ids) and tokenizer.decode([t for t in labels if t >= 0]) == (
        "Yes, it is.</s>"
    )


def test_image_in_answer_is_never_a_label(tokenizer):
    ids, labels = preprocess([H("Draw it."), G("Here: <image>")], tokenizer, "v1", True)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and IMAGE_TOKEN_INDEX not in labels
    assert tokenizer.decode([t for t in labels if t >= 0]).endswith("Here:</s>")


def test_protocol_fake_tokenizer_and_mismatch_detection():
    turns = [H("Q?"), G("Ans."), H("Q2?"), G("B.")]
    ids, labels = preprocess(turns, CharTokenizer(), "v1", False)
    decode = lambda xs: "".join("</s>" if t == 2 else chr(t - 10) for t in xs)  # noqa: E731
    assert [decode(ids[a:b]) for a, b in supervised_runs(labels)] == [" Ans.</s>", " B.</s>"]
    # ": " fuses into one token, so the boundary after "ASSISTANT:" falls inside a token: refuse, don't shift.
    with pytest.raises(TokenizationMismatch, match="tokenization mismatch") as err:
        preprocess(turns, CharTokenizer(merge_colon=True), "v1", False)
    assert err.value.input_ids == CharTokenizer(merge_colon=True)(_render(get_template("v1"), turns)[0]).input_ids


# ---------------------------------------------------------------- malformed conversations


@pytest.mark.parametrize(
    ("turns", "version", "has_image", "match"),
    [
        ("not a list", "v1", False, "non-empty list"),
        ([], "v1", False, "non-empty list"),
        ([{"value": "hi"}, G("yo")], "v1", False, "turn 0 must be"),
        ([{"from": "user", "value": "hi"}, G("yo")], "v1", False, "turn 0 must be"),
        ([H("hi"), {"from": "gpt", "value": 3}], "v1", False, "turn 1 must be"),
        ([H("hi"), G("")], "v1", False, "turn 1 .gpt. has an empty value"),
        ([H("hi"), H("again"), G("yo")], "v1", False, "alternate"),
        ([H("hi"), G("yo"), G("yo again")], "v1", False, "alternate"),
        ([H("hi"), G("yo"), H("unanswered")], "v1", False, "end with a gpt turn"),
        ([H("hi"), G("yo")], "v1", True, "exactly one <image> token, found 0"),
        ([H("<image> hi <image>"), G("yo")], "v1", True, "exactly one <image> token, found 2"),
        ([H("<image>\nhi"), G("yo")], "v1", False, "no 'image' key"),
        ([H("<image>\nhi"), G("yo"), H("more"), G("yes")], "plain", True, "plain template"),
        ([H("hi"), G("<image> yo")], "plain", True, "plain template"),
        ([G("yo"), H("<image>")], "plain", True, "plain template|alternate"),
    ],
)
def test_bad_conversations(turns, version, has_image, match):
    with pytest.raises(ValueError, match=match):
        check_conversations(turns, version, has_image)
    with pytest.raises(ValueError, match=match):
        preprocess(turns, CharTokenizer(), version, has_image)


# ---------------------------------------------------------------- golden parity with LLaVA's own arithmetic


def llava_prompt_v1(turns, system=SYSTEM):
    """Conversation.get_prompt for SeparatorStyle.TWO (conversation.py L32-107), transcribed."""
    ret = system + " "
    for j, t in enumerate(turns):
        ret += ("USER", "ASSISTANT")[j % 2] + ": " + t["value"] + (" ", "</s>")[j % 2]
    return ret


def llava_preprocess_v1(turns, tokenizer, has_image, legacy, model_max_length=2048):
    """train.py preprocess_v1 (L414-497, current main), transcribed: round lengths by re-tokenizing pieces, the
    "-2" for BOS and the lone '▁' of the trailing space, and the non-legacy "-1" for rounds after the first
    (IS_TOKENIZER_GREATER_THAN_0_14 is True for tokenizers 0.15). Returns (ids, labels, mismatch)."""
    if has_image:
        turns = preprocess_multimodal(turns)
    prompt = llava_prompt_v1(turns)
    tok = (lambda s: tokenizer_image_token(s, tokenizer)) if has_image else (lambda s: tokenizer(s).input_ids)
    return llava_round_arithmetic(prompt, prompt.split("</s>"), " ASSISTANT: ", tok, minus=2,
                                  correction=0 if legacy else -1, model_max_length=model_max_length)  # fmt: skip


def llava_round_arithmetic(prompt, rounds, sep, tok, minus, correction, model_max_length=2048):
    """The masking loop LLaVA's preprocess_v1 / _llama_2 / _mpt share, transcribed: BOS masked (cur_len starts at 1);
    per round, mask len(tok(instruction + sep)) - minus tokens and advance by len(tok(round)), both + `correction` for
    rounds after the first; a count that does not end at the prompt's length masks the whole sample. Returns
    (ids, labels, mismatch)."""
    ids = tok(prompt)
    target, total_len, cur_len = list(ids), len(ids), 1
    target[0] = IGNORE_INDEX
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len, instruction_len = len(tok(rou)), len(tok(parts[0])) - minus
        if i != 0:
            round_len, instruction_len = round_len + correction, instruction_len + correction
        for k in range(cur_len, min(cur_len + instruction_len, total_len)):
            target[k] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(0, total_len - cur_len)
    mismatch = cur_len < model_max_length and cur_len != total_len
    return ids, ([IGNORE_INDEX] * total_len if mismatch else target), mismatch


def random_conversations(n, seed=0):
    """LLaVA-shaped samples: 1-4 rounds, with and without an image, <image> first or last in its human turn."""
    r = random.Random(seed)
    words = WORDS + COLOURS + SHAPES + ["It", "Yes,", "No.", "2", "10", "42", "\n", "(a)", "don't"]
    out = []
    for _ in range(n):
        turns = []
        for _ in range(r.randint(1, 4)):
            turns.append(H(" ".join(r.choice(words) for _ in range(r.randint(1, 12))) + r.choice("?.")))
            turns.append(G(r.choice(["", "The ", "A "]) + " ".join(r.choice(words) for _ in range(r.randint(1, 15)))))
        has_image = r.random() < 0.7
        if has_image:  # mostly in the first turn, as in LLaVA's data; sometimes in a later one
            j = r.choice([0, 0, 0, r.randrange(0, len(turns), 2)])
            turns[j]["value"] = r.choice(["<image>\n" + turns[j]["value"], turns[j]["value"] + "\n<image>"])
        out.append((turns, has_image))
    return out


@pytest.fixture(scope="module")
def vicuna_shaped_tokenizer(tokenizer, tmp_path_factory):
    """The fixture tokenizer without the ('▁', 'USER') merge: like Vicuna's, "USER" after </s> is one token but
    a standalone "▁USER" is two, which is exactly what LLaVA's non-legacy "-1" correction compensates for."""
    from transformers import AutoTokenizer

    spec = json.loads(tokenizer._tokenizer.to_str())
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if m != ["▁", "USER"]]
    folder = tmp_path_factory.mktemp("vicuna_shaped")
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok.convert_ids_to_tokens(tok("USER").input_ids) == ["<s>", "▁", "USER"]
    assert tok.convert_ids_to_tokens(tok("</s>USER").input_ids) == ["<s>", "</s>", "USER"]
    return tok


@pytest.fixture(scope="module")
def legacy_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, legacy=True)
    assert tok.convert_ids_to_tokens(tok("</s>USER").input_ids) == ["<s>", "</s>", "▁USER"]
    return tok


@pytest.mark.parametrize(("which", "legacy"), [("vicuna_shaped_tokenizer", False), ("legacy_tokenizer", True)])
def test_labels_equal_llava_preprocess_v1(request, which, legacy):
    tok = request.getfixturevalue(which)
    samples = random_conversations(60)
    assert sum(len(t) > 2 for t, _ in samples) > 20 and sum(not img for _, img in samples) > 10
    for turns, has_image in samples:
        ids, labels, mismatch = llava_preprocess_v1(turns, tok, has_image, legacy)
        assert not mismatch, turns
        assert preprocess(turns, tok, "v1", has_image) == (ids, labels), turns


def test_llava_arithmetic_is_vocabulary_dependent_ours_is_not(tokenizer):
    """On the fixture vocabulary (legacy=False), '▁USER' is a single token, so LLaVA's "-1" over-corrects: it masks
    every multi-turn sample as a "tokenization mismatch". Single-turn samples agree exactly, and our multi-turn
    labels still supervise exactly the answers."""
    for turns, has_image in random_conversations(30, seed=1):
        ids, labels, mismatch = llava_preprocess_v1(turns, tokenizer, has_image, legacy=False)
        ours = preprocess(turns, tokenizer, "v1", has_image)
        assert mismatch == (len(turns) > 2)
        if not mismatch:
            assert ours == (ids, labels)
        answers = [tokenizer.decode(ours[0][a:b]) for a, b in supervised_runs(ours[1])]
        assert "".join(answers) == "".join(t["value"] + "</s>" for t in turns[1::2])


def test_plain_labels_equal_llava_preprocess_plain(tokenizer):
    """preprocess_plain (L588-607): mask len(tokenizer_image_token("<image>")) tokens of "<image>" + caption + "\\n"."""
    for turns, _ in random_conversations(30, seed=2):
        turns = [H("<image>\n" + turns[0]["value"].replace("<image>", "")), turns[1]]
        ids = tokenizer_image_token("<image>" + turns[1]["value"] + "\n", tokenizer)
        n = len(tokenizer_image_token("<image>", tokenizer))
        assert preprocess(turns, tokenizer, "plain", True) == (ids, [IGNORE_INDEX] * n + ids[n:])


# ---------------------------------------------------------------- ids equal LLaVA's slow SentencePiece tokenizer


def slow_llama_ids(text, model_file, legacy):
    """transformers 4.37 LlamaTokenizer (the slow class LLaVA loads with use_fast=False), transcribed for BOS + text:
    special tokens are split off first; legacy encodes every piece with SentencePiece's dummy prefix; non-legacy
    turns the dummy prefix off, prepends '▁' to the whole text once, and encodes pieces that start with a space
    behind "<unk>" so the space survives."""
    import re

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=model_file)
    if not legacy:
        proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        text = "▁" + text.replace("▁", " ") if text else text
    specials, unk = ("<s>", "</s>", "<unk>"), len(sp.encode("<unk>", out_type=str))
    pieces = []
    for part in re.split("(<s>|</s>|<unk>)", text):
        if part in specials:
            pieces.append(part)
        elif part and not legacy and part.startswith(("▁", " ")):
            pieces += sp.encode("<unk>" + part, out_type=str)[unk:]
        elif part:
            pieces += sp.encode(part, out_type=str)
    if len(pieces) > 1 and pieces[0] == "▁" and pieces[1] in specials:
        pieces = pieces[1:]
    return [1] + [sp.piece_to_id(p) for p in pieces]


@pytest.mark.parametrize("legacy", [False, True])
def test_ids_equal_llava_slow_tokenizer(tokenizer_dir, legacy):
    """Token ids as LLaVA produced them, including the cases where transformers 5 alone would differ: an "<image>"
    chunk that starts with a space (a caption " A ...", a turn that is just "<image>")."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, legacy=legacy)
    model_file = f"{tokenizer_dir}/tokenizer.model"
    v1, plain = get_template("v1"), get_template("plain")
    prompts = [_render(plain, [H("<image>"), G(caption)])[0] for caption in (" A red circle.", "  two", "A dog.")]
    prompts.append(_render(v1, [H("<image>"), G("The shape is red."), H("And?"), G(" Blue.")])[0])
    for turns, has_image in random_conversations(40, seed=3):
        prompts.append(_render(v1, preprocess_multimodal(turns) if has_image else turns)[0])
    assert tok(" a").input_ids == tok("a").input_ids  # transformers 5 absorbs a leading space ...
    assert slow_llama_ids(" a", model_file, legacy) != slow_llama_ids("a", model_file, legacy)  # ... LLaVA's did not
    for prompt in prompts:
        expected = [1]
        for k, chunk in enumerate(prompt.split("<image>")):
            expected += [IMAGE_TOKEN_INDEX] * (k > 0) + slow_llama_ids(chunk, model_file, legacy)[1:]
        assert tokenizer_image_token(prompt, tok) == expected, prompt
    caption = tokenizer_image_token(prompts[0], tok)
    assert tok.convert_ids_to_tokens(caption[2:4]) == ["▁", "▁A"]


# ---------------------------------------------------------------- LLaVA-NeXT's separator templates

TWO_ROUNDS = [H("<image>\nQ1?"), G("A1."), H("Q2?"), G("A2.")]


def test_next_separator_templates_render_as_llava_next():
    """Conversation.get_prompt of conv_chatml_direct (MPT) and conv_mistral_instruct (LLAMA_2), LLaVA-NeXT's
    conversation.py, for the reference's two-round example; and the open assistant turn for inference."""
    chatml = ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ1?<|im_end|>"
              "<|im_start|>assistant\nA1.<|im_end|><|im_start|>user\nQ2?<|im_end|><|im_start|>assistant\nA2.<|im_end|>")
    for version in ("chatml_direct", "mistral_direct"):
        text, spans = _render(get_template(version), TWO_ROUNDS)
        assert text == chatml and [text[a:b] for a, b in spans] == ["A1.<|im_end|>", "A2.<|im_end|>"]
    assert build_inference_prompt("Q?", "chatml_direct", True) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ?<|im_end|>"
        "<|im_start|>assistant\n")
    text, spans = _render(get_template("mistral_instruct"), TWO_ROUNDS)
    assert text == "[INST] <image>\nQ1? [/INST] A1. </s>[INST] Q2? [/INST] A2. </s>"
    assert [text[a:b] for a, b in spans] == [" A1. </s>", " A2. </s>"]
    assert build_inference_prompt("Q?", "mistral_instruct", True) == "[INST] <image>\nQ? [/INST]"
    assert build_inference_prompt("Q?", "mistral_instruct", False) == "[INST] Q? [/INST]"


def next_preprocess(turns, tokenizer, has_image, version, legacy=False):
    """LLaVA-NeXT's preprocess_llama_2 (train.py L409-481) and preprocess_mpt (L804-882), transcribed: round lengths
    by re-tokenizing pieces; llama_2 subtracts 2 (BOS and the lone '▁' of "[/INST] "), mpt starts at 1 and regroups
    system + user + assistant into its first round. Returns (ids, labels, mismatch)."""
    template = get_template(version)
    turns = preprocess_multimodal(turns) if has_image else turns
    prompt = _render(template, turns)[0]
    tok = lambda s: tokenizer_image_token(s, tokenizer)  # noqa: E731 (text-only: the same ids as tokenizer(s))
    if template.style == "llama_2":
        return llava_round_arithmetic(prompt, prompt.split(template.sep2), "[/INST] ", tok, minus=2, correction=0)
    pieces = prompt.split(template.sep)
    rounds = [template.sep.join(pieces[:3])] + [template.sep.join(pieces[i : i + 2]) for i in range(3, len(pieces), 2)]
    return llava_round_arithmetic(prompt, rounds, template.sep + template.roles[1], tok, minus=1,
                                  correction=1 if legacy else 0)  # fmt: skip


def test_mistral_instruct_labels_equal_llava_next_preprocess_llama_2(tokenizer, legacy_tokenizer):
    """Mistral's SentencePiece vocabulary (the fixture's): with a legacy tokenizer (Mistral's fast one) LLaVA-NeXT's
    arithmetic and our boundaries give the same ids and labels. Non-legacy, "[INST]" after "</s>" loses its '▁' and
    the arithmetic (which has no correction for it, unlike preprocess_v1) masks every multi-turn sample; single-turn
    ones agree, and ours still supervise exactly each " answer </s>"."""
    for turns, has_image in random_conversations(60, seed=4):
        ids, labels, mismatch = next_preprocess(turns, legacy_tokenizer, has_image, "mistral_instruct")
        assert not mismatch, turns
        assert preprocess(turns, legacy_tokenizer, "mistral_instruct", has_image) == (ids, labels), turns
        ids, labels, mismatch = next_preprocess(turns, tokenizer, has_image, "mistral_instruct")
        ours = preprocess(turns, tokenizer, "mistral_instruct", has_image)
        assert mismatch == (len(turns) > 2)
        if not mismatch:
            assert ours == (ids, labels)
        answers = [tokenizer.decode(ours[0][a:b]) for a, b in supervised_runs(ours[1])]
        assert "".join(answers) == "".join(f"{t['value']} </s>" for t in turns[1::2])


def test_chatml_direct_labels_equal_llava_next_preprocess_mpt_with_a_bos_tokenizer():
    """With a BOS-adding ChatML tokenizer (Yi's, llava-v1.6-34b) LLaVA-NeXT's preprocess_mpt and ours agree, except
    where an answer starts with "\n": a byte-level vocabulary merges it with the header's "\n" into one token that
    is half header, half answer. LLaVA-NeXT's counts mask that token; ours cannot place the boundary and masks the
    sample, as a counted tokenization mismatch (data.py), never a shifted label."""
    from family_tokenizers import chatml_bos_tokenizer

    tok = chatml_bos_tokenizer()
    agree = 0
    for turns, has_image in random_conversations(60, seed=5):
        ids, labels, mismatch = next_preprocess(turns, tok, has_image, "chatml_direct")
        assert not mismatch and ids[0] == tok.bos_token_id, turns
        if any(t["value"].startswith("\n") for t in turns[1::2]):
            with pytest.raises(TokenizationMismatch, match=r"assistant\\n' is not a token prefix"):
                preprocess(turns, tok, "chatml_direct", has_image)
            continue
        assert preprocess(turns, tok, "chatml_direct", has_image) == (ids, labels), turns
        agree += 1
    assert agree == 57


def test_chatml_direct_with_qwen_supervises_the_answers_where_llava_next_masks_multi_turn_samples():
    """A Qwen tokenizer adds no BOS: LLaVA-NeXT's count, which starts at 1 for the BOS and lets each round's BOS stand
    in for its dropped <|im_end|>, falls one token short per later round, so every multi-turn sample is a
    "tokenization mismatch" and trains nothing. Single-turn samples agree; ours supervise exactly each answer and its
    <|im_end|> either way."""
    from family_tokenizers import qwen2_tokenizer

    tok = qwen2_tokenizer()
    samples = [(t, i) for t, i in random_conversations(30, seed=6) if not any(g["value"].startswith("\n") for g in t)]
    assert sum(len(t) == 2 for t, _ in samples) > 3 and sum(len(t) > 2 for t, _ in samples) > 10
    for turns, has_image in samples:
        ids, labels, mismatch = next_preprocess(turns, tok, has_image, "chatml_direct")
        ours_ids, ours = preprocess(turns, tok, "chatml_direct", has_image)
        assert ours_ids == ids and mismatch == (len(turns) > 2)
        if not mismatch:
            assert ours == labels
        answers = [tok.decode(ids[a:b]) for a, b in supervised_runs(ours)]
        assert answers == [t["value"] + "<|im_end|>" for t in turns[1::2]]
