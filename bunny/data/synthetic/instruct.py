"""Instruction data like Bunny-695K, as LLaVA JSON conversations.

Image conversations (one ``<image>`` in the first human turn): short answers ("... Answer the
question using a single word or phrase."), yes/no questions, multiple choice with option letters
(sometimes with a hint), multi-turn question series, detailed descriptions and short captions.
Text-only conversations keep the LLM's text skills: arithmetic in words, repeating and reversing
words, and translating object names with a tiny French lexicon.

``conversation(kind, scene, rng)`` is also used by the LM's text pre-training
(bunny.backbones.language), with the scene's description in place of ``<image>``.
"""

from __future__ import annotations

import numpy as np

from bunny.data.synthetic.questions import (
    FRENCH,
    HINTS,
    LETTERS,
    NO,
    SHORT_FAMILIES,
    SHORT_SUFFIX,
    YES,
    YN_FAMILIES,
    ask,
    choices_for,
    french_name,
    mc_text,
)
from bunny.data.synthetic.scenes import COLOR_NAMES, NUMBER_WORDS, SHAPES, Scene, caption, description

IMAGE = "<image>"
# how yes/no questions end: VQA-style, MME's own phrasing, and MME as LLaVA-1.5 asks it (both)
YN_SUFFIXES = (SHORT_SUFFIX, " Please answer yes or no.", " Please answer yes or no." + SHORT_SUFFIX)

# Kinds of image conversation and their share of the image part.
IMAGE_KINDS = {"short": 0.34, "yesno": 0.2, "mc": 0.16, "multi": 0.18, "describe": 0.07, "caption": 0.05}
# Families used for short answers / multiple choice, with weights.
SHORT_WEIGHTS = {
    "color": 3, "shape": 3, "size": 1, "position": 2.5, "count": 2, "count_attr": 1.5,
    "background": 1, "what_at": 1.5, "corners": 0.7, "side": 1.5,
}
YN_WEIGHTS = {
    "exists": 3, "exists_attr": 1, "count_yn": 1, "relation": 1.5, "at": 1.5, "color_yn": 1.5,
    "shape_yn": 1, "size_yn": 0.7, "background_yn": 0.7, "identity": 1, "caption_yn": 0.6,
    "count_attr_yn": 0.7, "corners_yn": 0.5, "plus_yn": 0.5, "greater_yn": 0.5, "french_yn": 0.4,
}
assert set(SHORT_WEIGHTS) == set(SHORT_FAMILIES) and set(YN_WEIGHTS) == set(YN_FAMILIES)
DESCRIBE_PROMPTS = ("Describe the image in detail.", "What is in this image? Describe every object.",
                    "Give a detailed description of the picture.")
CAPTION_PROMPTS = ("Write a short caption for the image.", "Caption this picture briefly.")


def pick_weighted(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """One key of ``weights``, drawn with probability proportional to its weight."""
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _turn(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def _short(scene, rng):
    for _ in range(10):
        qa = ask(pick_weighted(rng, SHORT_WEIGHTS), scene, rng)
        if qa is not None:
            return qa.question + SHORT_SUFFIX, qa.answer
    raise RuntimeError("no question applies")  # count always applies; unreachable


def _yesno(scene, rng):
    for _ in range(10):
        qa = ask(pick_weighted(rng, YN_WEIGHTS), scene, rng)
        if qa is not None:
            return qa.question + YN_SUFFIXES[int(rng.integers(len(YN_SUFFIXES)))], qa.answer
    raise RuntimeError("no question applies")


def _mc(scene, rng):
    for _ in range(10):
        qa = ask(pick_weighted(rng, SHORT_WEIGHTS), scene, rng)
        if qa is not None and len(qa.space) >= 2:
            n = int(rng.integers(2, 5))
            opts, k = choices_for(qa, rng, n)
            if rng.random() < 0.25:  # MMMU's layout: "(A) red" options, "<image 1>" in the question
                return mc_text(f"<image 1> {qa.question}", opts, style="paren"), LETTERS[k]
            hint = HINTS[int(rng.integers(len(HINTS)))] if rng.random() < 0.25 else None
            if hint and rng.random() < 0.5:
                hint = "Context: " + hint
            return mc_text(qa.question, opts, hint), LETTERS[k]
    raise RuntimeError("no question applies")


def conversation(kind: str, scene: Scene, rng: np.random.Generator, image: str = IMAGE,
                 max_turns: int = 4) -> list[dict]:
    """One conversation of ``kind`` about ``scene``; the first human turn starts with ``image``
    followed by a newline (the image placeholder, or a text stand-in). ``multi`` has 2..``max_turns``
    question/answer turns."""
    if kind == "short":
        turns = [_short(scene, rng)]
    elif kind == "yesno":
        turns = [_yesno(scene, rng)]
    elif kind == "mc":
        turns = [_mc(scene, rng)]
    elif kind == "multi":
        n = int(rng.integers(2, max(2, max_turns) + 1))
        turns = [(_short if rng.random() < 0.65 else _yesno)(scene, rng) for _ in range(n)]
    elif kind == "describe":
        turns = [(DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))], description(scene))]
    elif kind == "caption":
        turns = [(CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))], caption(scene, rng))]
    else:
        raise ValueError(f"unknown conversation kind {kind!r}; known: {', '.join(IMAGE_KINDS)}")
    conv: list[dict] = []
    for i, (q, a) in enumerate(turns):
        conv += _turn(f"{image}\n{q}" if i == 0 else q, a)
    return conv


# ------------------------------------------------------------------------------------ text only
def _words(rng: np.random.Generator, n: int) -> list[str]:
    vocab = list(COLOR_NAMES) + list(SHAPES) + ["small", "large", "top", "left", "right", "bottom", "center"]
    return [vocab[int(i)] for i in rng.integers(len(vocab), size=n)]


def text_conversation(rng: np.random.Generator) -> list[dict]:
    """A pure-text conversation: arithmetic, repeating/reversing words, or translating names."""
    kind = int(rng.integers(5))
    if kind == 0:
        a, b = (int(x) for x in rng.integers(0, 6, size=2))
        q, ans = f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a + b]
    elif kind == 1:
        a = int(rng.integers(1, 11))
        b = int(rng.integers(0, a + 1))
        q, ans = f"What is {NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a - b]
    elif kind == 2:
        w = _words(rng, int(rng.integers(2, 6)))
        q, ans = f"Repeat these words: {' '.join(w)}", " ".join(w)
    elif kind == 3:
        w = _words(rng, int(rng.integers(2, 5)))
        q, ans = f"Write these words in reverse order: {' '.join(w)}", " ".join(reversed(w))
    else:
        color, shape = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))], SHAPES[int(rng.integers(len(SHAPES)))]
        if rng.random() < 0.5:
            q, ans = f"Translate to English: {french_name(color, shape)}", f"{color} {shape}"
        else:
            q, ans = f"Translate to French: {color} {shape}", french_name(color, shape)
    if rng.random() < 0.3 and kind < 2:
        q += SHORT_SUFFIX
    return _turn(q, ans)


def build_instruct(
    scenes: list[tuple[str, Scene]], n_text: int, rng: np.random.Generator,
    kinds_share: dict[str, float] | None = None, max_turns: int = 4,
) -> list[dict]:
    """LLaVA samples: one conversation per (image path, scene), plus ``n_text`` text-only ones,
    shuffled together. ``kinds_share`` weighs the kinds of image conversation (default
    ``IMAGE_KINDS``); ``max_turns`` bounds the multi-turn ones."""
    shares = IMAGE_KINDS if kinds_share is None else kinds_share
    unknown = set(shares) - set(IMAGE_KINDS)
    if unknown:
        raise ValueError(f"unknown conversation kind(s) {sorted(unknown)}; known: {', '.join(IMAGE_KINDS)}")
    kinds = [k for k in IMAGE_KINDS if shares.get(k, 0) > 0]
    p = np.array([shares[k] for k in kinds], dtype=float)
    samples = []
    for i, (path, scene) in enumerate(scenes):
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        samples.append({"id": f"inst-{i:06d}", "image": path,
                        "conversations": conversation(kind, scene, rng, max_turns=max_turns), "kind": kind})
    for i in range(n_text):
        samples.append({"id": f"text-{i:06d}", "conversations": text_conversation(rng), "kind": "text"})
    order = rng.permutation(len(samples))
    return [samples[i] for i in order]


__all__ = ["FRENCH", "IMAGE", "IMAGE_KINDS", "NO", "YES", "build_instruct", "conversation", "text_conversation"]
