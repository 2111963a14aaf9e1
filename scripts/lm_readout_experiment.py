"""The demo LM's multiple-choice readout: two changes to how ``bunny backbones`` trains it, measured.

``train_language``'s loop with the shipped settings (lookup supervision, balanced hops, background and
option-span hops), and one of three losses:

- ``token``: the LM loss averaged over tokens, as shipped (the reference);
- ``reply``: the LM loss averaged per reply, then over replies, so a one-letter answer weighs as much
  as a description;
- ``readout``: ``token`` plus, at each multiple-choice reply, the last layer's head 0 alone (its output
  through the attention's output projection, read by the LM's final norm and output layer) must name the
  reply's letter: the head that the lookup supervision points at the right option then also carries
  its letter.

Saves the LM to OUT; ``scripts/lm_mc_hops.py OUT --force`` then reads its multiple choice.

    .venv/bin/python scripts/lm_readout_experiment.py 1200 /tmp/lm-readout --loss readout

docs/demo.md ("Balancing the hops") records the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from bunny.backbones import corpus
from bunny.backbones.language import SlotCoder, batches, build_model, lookup_loss, lr_at, probe
from bunny.backbones.tokenizer import train_tokenizer, wrap
from bunny.demo import DemoConfig


def per_reply_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged inside each reply (a run of supervised targets), then over replies."""
    lg, tg = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100, reduction="none")
    mask = tg != -100
    starts = mask & ~torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1)
    reply = (torch.cumsum(starts.flatten().long(), 0).view(mask.shape) * mask).flatten()
    n = int(reply.max())
    sums = torch.zeros(n + 1).index_add_(0, reply, (ce.view(mask.shape) * mask).flatten())
    counts = torch.zeros(n + 1).index_add_(0, reply, mask.flatten().float())
    return (sums[1:] / counts[1:].clamp(min=1)).mean()


class HeadReadout:
    """The last layer's head 0 output at a position, alone, as logits (Phi: ``self_attn.dense``)."""

    def __init__(self, model, head_dim: int) -> None:
        self.model, self.head_dim, self.inputs = model, head_dim, None
        self.attn = model.model.layers[-1].self_attn
        self.attn.dense.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self.inputs = args[0]

    def loss(self, labels: torch.Tensor, targets: list) -> torch.Tensor | None:
        terms = []
        d = self.head_dim
        for b, rows in enumerate(targets):
            for layer, head, q, _ in rows:
                if (layer, head) == (-1, 0):
                    alone = self.attn.dense.weight[:, :d] @ self.inputs[b, q, :d]
                    logits = self.model.lm_head(self.model.model.final_layernorm(alone))
                    terms.append(F.cross_entropy(logits[None], labels[b, q + 1][None]))
        return torch.stack(terms).mean() if terms else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("steps", type=int)
    p.add_argument("out", type=Path)
    p.add_argument("--loss", choices=("token", "reply", "readout"), default="readout")
    a = p.parse_args()
    torch.set_num_threads(1)
    s = DemoConfig().backbones
    lm = replace(s.lm, steps=a.steps)
    tok = wrap(train_tokenizer(corpus(s.tokenizer_scenes, s.seed), s.vocab_size), model_max_length=lm.max_positions)
    model = build_model(tok, lm)
    coder = SlotCoder(tok, 3, background=lm.background_lookup, option_span=lm.option_span)
    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for _, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": lm.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lm.lr, betas=(0.9, 0.98))
    readout = HeadReadout(model, lm.hidden_size // lm.heads) if a.loss == "readout" else None
    model.train()
    t0 = time.perf_counter()
    for step, (ids, att, lab, slots, targets) in enumerate(batches(coder, np.random.default_rng(lm.seed), lm, lm.steps)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lm)
        out = model(inputs_embeds=coder.embed(model, ids, slots), attention_mask=att, output_attentions=True)
        if a.loss == "reply":
            loss = per_reply_loss(out.logits, lab)
        else:
            loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), lab[:, 1:].reshape(-1),
                                   ignore_index=-100)
        total = loss + lm.lookup_aux * lookup_loss(out.attentions, targets, lm.lookup_balance)
        extra = readout.loss(lab, targets) if readout is not None else None
        if extra is not None:
            total = total + extra
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    acc = probe(model, coder, np.random.default_rng(lm.seed + 10_000), n=lm.probe_questions)
    model.set_attn_implementation("sdpa")
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(json.dumps({k: round(v, 3) for k, v in acc.items()}))


if __name__ == "__main__":
    main()
