"""Released Bunny checkpoints are prompted in the format they were trained with.

The expected strings are written out by hand from the original repo's ``bunny/conversation.py``
(``Conversation.get_prompt`` with ``SeparatorStyle.TWO``: ``system + sep``, then ``role + ": " +
message + seps[i % 2]`` per message, ``role + ":"`` for the open assistant turn; ``sep=" "``;
``sep2`` is ``<|endoftext|>`` in ``conv_bunny``, ``</s>`` in ``conv_minicpm``, ``<|end_of_text|>``
in ``conv_llama``), and the evaluation guide's choice of mode per release (``minicpm`` and
``llama`` for those two LLMs, ``bunny`` for every other one).
"""

from __future__ import annotations

import pytest
from test_checkpoints_original import release_folder

import bunny

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
#: tiny family -> (release model_type, the original conv mode's sep2)
RELEASES = {
    "phi-2": ("bunny-phi", "<|endoftext|>"),
    "phi-3": ("bunny-phi3", "<|endoftext|>"),
    "stablelm-2": ("bunny-stablelm", "<|endoftext|>"),
    "qwen1.5": ("bunny-qwen2", "<|endoftext|>"),
    "minicpm": ("bunny-minicpm", "</s>"),
    "llama-3": ("bunny-llama", "<|end_of_text|>"),
}
ONE_TURN = [{"role": "user", "content": "<image>\nWhat is this?"}]
TWO_TURNS = ONE_TURN + [{"role": "assistant", "content": "A red circle."},
                        {"role": "user", "content": "And its size?"}]


@pytest.mark.parametrize("family", list(RELEASES))
def test_release_loads_with_the_template_and_stop_token_it_was_trained_with(tmp_path, family):
    release_type, sep2 = RELEASES[family]
    path, _, _ = release_folder(tmp_path, family=family)
    model, processor = bunny.load_model(path)

    # exactly conv.get_prompt() of the original, for a fresh and a continued conversation
    assert processor.render(ONE_TURN) == SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"
    assert processor.render(TWO_TURNS) == (SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A red circle."
                                           + sep2 + "USER: And its size? ASSISTANT:")
    # generation stops on the sep2 token (one id of the release's tokenizer)
    tok = processor.tokenizer
    (end_id,) = tok.encode(sep2, add_special_tokens=False)
    eos = model.generation_config.eos_token_id
    assert end_id in (eos if isinstance(eos, list) else [eos]), (release_type, eos)


def test_set_chat_template_overrides_prompt_and_stop_ids(tmp_path):
    from bunny.model.finish import set_chat_template
    from bunny.registry import UnknownNameError

    path, _, _ = release_folder(tmp_path, family="llama-3")
    model, processor = bunny.load_model(path)
    set_chat_template(model, processor, "llama3")  # Meta's own format, e.g. for a re-trained model
    assert processor.render(ONE_TURN).startswith("<|start_header_id|>user<|end_header_id|>\n\n<image>")
    eot = processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    eos = model.generation_config.eos_token_id
    assert eot in (eos if isinstance(eos, list) else [eos])
    with pytest.raises(UnknownNameError, match="bunny-llama3"):
        set_chat_template(model, processor, "no-such-template")
