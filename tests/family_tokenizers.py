"""Tiny byte-level BPE tokenizers built in-process, with each family's special tokens, pre-tokenizer regex and chat
template: Qwen2's (<|im_start|>/<|im_end|>, pad <|endoftext|>, no BOS, no unk) and Llama-3-Instruct's
(<|begin_of_text|> added as BOS, header and <|eot_id|> tokens, no pad, no unk); and a ChatML one with a BOS (Yi's)."""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# the two families' pre-tokenizer patterns (tokenizer.json of Qwen2 and Meta-Llama-3): "\n\n" is one piece
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's chat_template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (  # Qwen2-Instruct's, without tools
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
    "}}{% endif %}"
)
CORPUS = [
    "You are a helpful assistant. You are a helpful language and vision assistant.",
    "What is shown? A cat. What color is it? Black. The shape is red. A circle on a blue background.",
    "system user assistant\n\nuser\nassistant\n",
] * 20


def _bpe(pattern: str, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def qwen2_tokenizer() -> PreTrainedTokenizerFast:
    tok = _bpe(QWEN2_PATTERN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN2_TEMPLATE
    return fast


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _bpe(LLAMA3_PATTERN, specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def chatml_bos_tokenizer() -> PreTrainedTokenizerFast:
    """ChatML with a BOS, as Yi-34B-Chat's (llava-v1.6-34b's LLM, chatml_direct's template): <|startoftext|> added to
    every encoding, <|im_start|>/<|im_end|> specials, pad <unk>."""
    tok = _bpe(QWEN2_PATTERN, ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    bos = tok.token_to_id("<|startoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A", pair="<|startoftext|> $A $B",
                                                       special_tokens=[("<|startoftext|>", bos)])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<unk>")  # fmt: skip
