"""The experiment that decided how the demo's LM learns to look things up in the image slots.

One question family (default: the colour of a named object among 1-4), batch 32, the demo LM's
architecture and optimiser, greedy exact match on 128 held-out questions every 50 steps, and the
attention mass that the supervised heads put where they should. Three ways to train:

- ``none``: the LM loss alone (what the earlier demo did): plateaus near 0.6;
- ``answer``: also supervise the last layer's head 0, at the position that predicts the reply, to
  attend to the slots holding the reply: it learns "attend to the objects" and plateaus too, its
  attention spread evenly over every object (its query never gathered the question's words);
- ``two-hop`` (the demo's ``lookup_loss``): each fact word of the question attends to the slots that
  have that fact (first layer), and the reply position attends to those words (last layer).

    .venv/bin/python scripts/lm_lookup_experiment.py --supervision two-hop --steps 400

docs/demo.md records the figures it printed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bunny.backbones import corpus
from bunny.backbones.language import (
    LMSettings,
    SlotCoder,
    build_model,
    lookup_loss,
    lr_at,
    render_bunny,
    slot_words,
)
from bunny.backbones.tokenizer import train_tokenizer, wrap
from bunny.data.synthetic.instruct import IMAGE
from bunny.data.synthetic.questions import SHORT_SUFFIX, ask
from bunny.data.synthetic.scenes import sample_scene


def answer_targets(coder: SlotCoder, ids: list[int], labels: list[int], scene) -> list[tuple[int, int, int, list[int]]]:
    """The ``answer`` variant: the reply position -> the slots whose words contain the reply."""
    first = ids.index(coder.image_id)
    start = next(i for i, lab in enumerate(labels) if lab != -100)
    reply = set(coder.tok.decode([t for t in ids[start:] if t != coder.tok.eos_token_id]).lower().split())
    cells = [set(w) for w in slot_words(scene, coder.side)]
    slots = [first + k for k, c in enumerate(cells) if reply and reply <= c]
    return [(-1, 0, start - 1, slots)] if 0 < len(slots) < len(cells) else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="color")
    p.add_argument("--supervision", choices=("none", "answer", "two-hop"), default="two-hop")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tok = wrap(train_tokenizer(corpus(3000, 0), 1024), model_max_length=512)
    s = LMSettings(steps=a.steps, batch_size=32)
    model = build_model(tok, s)
    model.set_attn_implementation("eager")
    coder = SlotCoder(tok, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=s.weight_decay)

    def batch(rng: np.random.Generator, n: int):
        rows, targets = [], []
        while len(rows) < n:
            scene = sample_scene(rng)
            qa = ask(a.family, scene, rng)
            if qa is None:
                continue
            conv = [{"from": "human", "value": f"{IMAGE}\n{qa.question}{SHORT_SUFFIX}"}, {"from": "gpt", "value": qa.answer}]
            row = coder.encode(render_bunny(conv), scene)
            rows.append(row)
            targets.append(answer_targets(coder, row[0], row[1], scene) if a.supervision == "answer"
                           else coder.lookup_targets(row[0], row[1], scene))
        return (*coder.collate(rows), targets)

    rng, t0 = np.random.default_rng(0), time.perf_counter()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        ids, att, lab, slots, targets = batch(rng, 32)
        out = model(inputs_embeds=coder.embed(model, ids, slots), attention_mask=att, labels=lab, output_attentions=True)
        aux = lookup_loss(out.attentions, targets) if a.supervision != "none" else None
        (out.loss + (aux if aux is not None else 0)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            model.eval()
            with torch.no_grad():
                ids, att, lab, slots, targets = batch(np.random.default_rng(99), 128)
                o = model(inputs_embeds=coder.embed(model, ids, slots), attention_mask=att, output_attentions=True)
                pred, tgt = o.logits[:, :-1].argmax(-1), lab[:, 1:]
                acc = float(((pred == tgt) | (tgt == -100)).all(1).float().mean())
                held = lookup_loss(o.attentions, targets)
            model.train()
            print(json.dumps({"step": step + 1, "exact_match": round(acc, 3),
                              "supervised_attention_loss": None if held is None else round(float(held), 3),
                              "seconds": round(time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    main()
