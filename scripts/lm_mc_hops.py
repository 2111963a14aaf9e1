"""Where a demo LM's multiple-choice answers go wrong: each supervised hop's attention mass, and the
right letter, on held-out multiple-choice questions with ideal image slots.

The hops are the ones ``lookup_loss`` trains (``SlotCoder.lookup_targets``): a fact word -> the slots
with that fact (layer 0 head 0), an option's last word -> its letter (layer 0 head 1), the reply
position -> the question's fact words (layer 1 head 0), the reply position -> the right option's last
word (last layer head 0); for LMs made with ``lm.background_lookup`` / ``lm.option_span`` (the default),
"background" and the background names -> every slot, and an option's last word -> its whole text
(layer 0 head 2). A hop near 1.0 is learned; the one well below it is where the answer is
lost. Also printed: the letters the LM answers (a single letter for everything means it guesses), and the right-letter rate
per kind of question (``by_question``: "rate of count"). ``--force``: also the right-letter rate when the
last layer's head 0 at the reply position is set onto the right option (``right_letter_forced``).

    .venv/bin/python scripts/lm_mc_hops.py bunny/backbones/shipped/*/lm [--questions 200] [--force]

docs/demo.md ("Balancing the hops") records the figures it printed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bunny.backbones.language import CHOICE_HOP, SlotCoder, render_bunny
from bunny.data.synthetic.instruct import conversation
from bunny.data.synthetic.scenes import sample_scene

HOPS = {(0, 0): "fact word -> its slots", (0, 1): "option -> its letter", (0, 2): "option -> its whole text",
        (1, 0): "reply -> question words", (-1, 0): "reply -> right option"}


def question_kind(text: str) -> str:
    """The first three words of the question line ("What kind of", "Where is the"): the kind a
    right-letter rate is broken down by."""
    lines = [ln for ln in text.split("\n") if "?" in ln] or [text]
    return " ".join(re.sub(r"<image[^>]*>", "", lines[0]).split()[:3])


class ForcedChoice:
    """Sets the last layer's head 0 at one query position to attend only to one key (the right option):
    does the right letter then come out? It patches the eager attention function of transformers' Phi
    module (the demo LM's architecture) for the life of the object."""

    def __init__(self, model) -> None:
        import transformers.models.phi.modeling_phi as phi

        self.phi, self.original = phi, phi.eager_attention_forward
        layer, self.head = CHOICE_HOP  # the multiple-choice hop lookup supervision trains
        self.layer = layer % model.config.num_hidden_layers
        self.at: tuple[int, int] | None = None
        phi.eager_attention_forward = self._forward

    def _forward(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = self.original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if self.at is None or module.layer_idx != self.layer:
            return out, weights
        q, k = self.at
        weights = weights.clone()
        weights[:, self.head, q] = 0
        weights[:, self.head, q, k] = 1
        values = self.phi.repeat_kv(value, module.num_key_value_groups)  # as the eager function does
        return torch.matmul(weights, values).transpose(1, 2).contiguous(), weights

    def close(self) -> None:
        self.phi.eager_attention_forward = self.original


@torch.no_grad()
def measure(lm_dir: str, questions: int, seed: int, side: int = 3, background: bool = True,
            option_span: bool = True, force: bool = False) -> dict:
    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir, attn_implementation="eager").eval()
    coder = SlotCoder(tok, side, background=background, option_span=option_span)
    rng = np.random.default_rng(seed)
    mass: dict[tuple[int, int], list[float]] = defaultdict(list)
    right, letters = [], Counter()
    kinds: dict[str, list[bool]] = defaultdict(list)
    forced_right: list[bool] = []
    forcer = ForcedChoice(model) if force else None
    for _ in range(questions):
        scene = sample_scene(rng)
        conv = conversation("mc", scene, rng)[:2]
        ids, labels, slots = coder.encode(render_bunny(conv), scene)
        targets = coder.lookup_targets(ids, labels, scene)
        input_ids, attention, label_ids, slot_ids = coder.collate([(ids, labels, slots)])
        out = model(inputs_embeds=coder.embed(model, input_ids, slot_ids), attention_mask=attention,
                    output_attentions=True)
        for layer, head, query, keys in targets:
            mass[(layer, head)].append(float(out.attentions[layer][0, head, query, keys].sum()))
        wanted = label_ids[0, 1:]
        keep = wanted != -100
        predicted = out.logits[0, :-1][keep].argmax(-1)
        right.append(bool((predicted == wanted[keep]).all()))
        kinds[question_kind(conv[0]["value"])].append(right[-1])
        letters[tok.decode(predicted[:1]).strip()] += 1
        choose = [(q, keys[0]) for layer, head, q, keys in targets if (layer, head) == CHOICE_HOP]
        if forcer is not None and choose:
            forcer.at = choose[0]
            logits = model(inputs_embeds=coder.embed(model, input_ids, slot_ids), attention_mask=attention).logits
            forcer.at = None
            forced_right.append(bool((logits[0, :-1][keep].argmax(-1) == wanted[keep]).all()))
    if forcer is not None:
        forcer.close()
    extra = {"right_letter_forced": round(float(np.mean(forced_right)), 3)} if forced_right else {}
    return {"right_letter": round(float(np.mean(right)), 3), **extra,
            "hop_mass": {HOPS[k]: round(float(np.mean(v)), 3) for k, v in mass.items()},
            "answered": dict(letters.most_common()),
            "by_question": {k: f"{np.mean(v):.2f} of {len(v)}" for k, v in
                            sorted(kinds.items(), key=lambda kv: -len(kv[1])) if len(v) >= 5}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lm", help="an LM folder made by bunny backbones (its lm/ subfolder)")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--force", action="store_true",
                   help="also the right-letter rate with the last layer's head 0 at the reply position set onto "
                        "the right option (right_letter_forced): is the letter read where the LM looks?")
    p.add_argument("--plain-hops", action="store_true",
                   help="measure only the hops of LMs made before lm.background_lookup / lm.option_span")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(measure(a.lm, a.questions, a.seed, background=not a.plain_hops, option_span=not a.plain_hops,
                             force=a.force), indent=1))


if __name__ == "__main__":
    main()
