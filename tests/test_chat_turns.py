"""LLaVA-NeXT's turn-by-turn templates (minillava/chat_turns.py): input ids and labels equal preprocess_qwen's and
preprocess_llama3's on LLaVA-NeXT's worked example (`<image>\\nWhat is shown?` / `A cat.` / `What color is it?` /
`Black.`), tokenized by tiny byte-level tokenizers with each family's special tokens, regex and chat template. L: the
piece is labelled with its own ids; m: masked."""

import pytest
from family_tokenizers import llama3_tokenizer, qwen2_tokenizer

from minillava.chat_turns import LLAMA3_SYSTEM
from minillava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from minillava.conversation import build_inference_prompt, preprocess

TURNS = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat."},
         {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "Black."}]  # fmt: skip

QWEN = """
<|im_start|>L system m \\n L You are a helpful assistant. m <|im_end|>L \\n L
<|im_start|>L user m \\n L <image> m \\n L What is shown? m <|im_end|>L \\n L
<|im_start|>L assistant L \\n L A cat. L <|im_end|>L \\n L
<|im_start|>L user m \\n L What color is it? m <|im_end|>L \\n L
<|im_start|>L assistant L \\n L Black. L <|im_end|>L \\n L
"""
LLAMA3 = """
<|begin_of_text|>L <|start_header_id|>L system m <|end_header_id|>L \\n\\n m {SYS} m <|eot_id|>L
<|start_header_id|>L user m <|end_header_id|>L \\n\\n m <image> m \\nWhat is shown? m <|eot_id|>L
<|start_header_id|>L assistant L <|end_header_id|>L \\n\\n L A cat. L <|eot_id|>L
<|start_header_id|>L user m <|end_header_id|>L \\n\\n m What color is it? m <|eot_id|>L
<|start_header_id|>L assistant L <|end_header_id|>L \\n\\n L Black. L <|eot_id|>L
"""


def _golden(spec: str, tokenizer) -> tuple[list[int], list[int]]:
    """The ids and labels the worked example's pieces give, each piece tokenized on its own."""
    import re

    ids, labels = [], []
    for line in spec.strip().splitlines():
        for piece, flag in re.findall(r"(.+?)(?: |(?<=>))(L|m)(?: |$)", line.replace("{SYS}", LLAMA3_SYSTEM)):
            text = piece.replace("\\n", "\n")
            got = [IMAGE_TOKEN_INDEX] if text == "<image>" else tokenizer(text, add_special_tokens=False).input_ids
            ids += got
            labels += got if flag == "L" else [IGNORE_INDEX] * len(got)
    return ids, labels


@pytest.mark.parametrize(("version", "spec", "make"), [("qwen_1_5", QWEN, qwen2_tokenizer),
                                                       ("qwen_2", QWEN, qwen2_tokenizer),
                                                       ("qwen_2_5", QWEN, qwen2_tokenizer),
                                                       ("llava_llama_3", LLAMA3, llama3_tokenizer)])  # fmt: skip
def test_worked_example(version, spec, make):
    tokenizer = make()
    ids, labels = preprocess(TURNS, tokenizer, version, has_image=True)
    assert (ids, labels) == _golden(spec, tokenizer)


def test_leading_gpt_turn_is_dropped_and_text_only_samples_work():
    tok = qwen2_tokenizer()
    text_only = [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A cat."}]
    assert preprocess([{"from": "gpt", "value": "Hi."}, *text_only], tok, "qwen_2", False) == preprocess(
        text_only, tok, "qwen_2", False
    )
    ids, labels = preprocess(text_only, tok, "qwen_2", False)
    assert IMAGE_TOKEN_INDEX not in ids and labels[-1] == ids[-1]  # the closing "\n" is learnt


def test_inference_prompts_open_the_assistant_turn():
    assert build_inference_prompt("Q?", "qwen_2_5", True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt = build_inference_prompt("Q?", "llava_llama_3", True, llama3_tokenizer())
    assert prompt == (f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYSTEM}<|eot_id|><|start_header_id|>"
                      "user<|end_header_id|>\n\n<image>\nQ?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
