"""A byte-level BPE tokenizer trained on the synthetic world's text, saved as a Hugging Face
``PreTrainedTokenizerFast`` folder (``AutoTokenizer.from_pretrained`` loads it).

Byte-level like GPT-2/Qwen2 (any text encodes, nothing is unknown); the world's words come out as
single tokens (" red", " circle", " ASSISTANT"). Special tokens: ``<|endoftext|>`` (end of a reply,
also padding) and ``<image>`` (the image placeholder the multimodal processor expands).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"
IMAGE_TOKEN = "<image>"
SPECIAL = (EOS, IMAGE_TOKEN)
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# The `bunny` chat template (Bunny's conv_bunny: SEP " " after a user turn, EOS after a reply).
CHAT_TEMPLATE = (
    "{{ '" + SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train the BPE model on ``texts``; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap(tok, *, model_max_length: int, padding_side: str = "right", with_attention_mask: bool = True):
    """The ``tokenizers`` object as a transformers fast tokenizer with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=model_max_length,
        padding_side=padding_side,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    if not with_attention_mask:
        fast.model_input_names = ["input_ids"]
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save(tok, out_dir: str | Path, **kw) -> Path:
    out = Path(out_dir)
    wrap(tok, **kw).save_pretrained(out)
    return out
