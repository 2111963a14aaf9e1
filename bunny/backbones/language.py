"""A small causal LM trained from scratch on the world's text, saved as a Hugging Face folder in the
microsoft/phi-2 layout (``PhiForCausalLM``; ``AutoModelForCausalLM.from_pretrained`` loads it, the
tokenizer and generation config beside), so the recipe takes it through the `phi-2` LLM family and
the `bunny` chat template, as it would take Phi-2.

What it must learn (the issue's measured warning): a frozen from-scratch LM that never learned to
answer about a scene in its context cannot be taught to answer from image tokens either. So it trains
on the instruction data's own conversations in the `bunny` chat template (``bunny.data.templates``),
with ``<image>`` expanded to the slots the MLLM will fill: one per vision patch, each the sum of the
embeddings of its cell's words (``slot_words``: object size/color/shape, background, place)::

    <system> USER: [9 slots]\nWhat color is the circle?\nAnswer the question using a single word or
    phrase. ASSISTANT: red<|endoftext|>USER: Where is ...? ASSISTANT: top left<|endoftext|>

plus text-only conversations (arithmetic, repeating, reversing, translating) and `plain` pairs
(slots, then a caption), like stage 1. Only replies (and their end token) carry loss, as in stage 2;
plain pairs carry loss on the caption. Stage 1 then only has to teach the projector to write those
slot vectors from the patch tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bunny.data.synthetic.instruct import IMAGE, conversation, pick_weighted, text_conversation
from bunny.data.synthetic.scenes import Scene, caption, position_name, sample_scene
from bunny.data.templates import IGNORE_INDEX

# Single-turn kinds of image conversation and their weights (the rest is multi-turn, `multi_share`).
# Multiple choice is weighted up: with 7.5% of the conversations the LM (ideal slots) picked the right
# letter 0.37 of the time; the other skills saturate with far fewer examples (docs/demo.md).
EVERY_SLOT = "*"  # the fact of a word every image slot has (``"background"``)
CHOICE_HOP = (-1, 0)  # (layer, head) of the multiple-choice hop: the reply position -> the right option
SINGLE_KINDS = {"short": 0.2, "yesno": 0.2, "mc": 0.45, "describe": 0.1, "caption": 0.05}


@dataclass
class LMSettings:
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 512
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    turns: int = 6  # at most this many question/answer turns per image (more answers per sequence)
    bf16: bool | None = False  # bfloat16 autocast; None: when the CPU has bf16 units. False: measured to learn
    # the image-slot reading far slower at this width (and no faster), see docs/demo.md
    text_share: float = 0.1
    plain_share: float = 0.1
    embed_init_std: float = 0.2  # 10x Phi's 0.02: measured to start reading the image slot ~2x sooner
    multi_share: float = 0.7  # image conversations with several question/answer turns
    probe_questions: int = 300  # held-out questions of the final probe
    lookup_aux: float = 1.0  # weight of the lookup-supervision loss (0: off), see lookup_loss
    lookup_balance: bool = True  # each hop kind weighs the same in lookup_loss (multiple choice 0.42 -> 0.56)
    background_lookup: bool = True  # background names are fact words and "background" reads every slot
    option_span: bool = True  # an option's last word also reads its whole text ("top left", not just "left")
    readout_weight: float = 0.0  # weight of readout_loss (0: off): the multiple-choice hop's head must name the letter
    seed: int = 0


# --------------------------------------------------------------------------------------- corpus
def render_bunny(conv: list[dict]) -> list[tuple[str, bool]]:
    """A LLaVA conversation in the `bunny` chat template as (text, carries_loss) pieces:
    ``SYSTEM USER: q ASSISTANT: a<eos>USER: q2 ASSISTANT: a2<eos>`` (Bunny's conv_bunny), from the
    project's template itself, so the LM sees exactly the text stage 2 and evaluation will show it."""
    from bunny.data.templates import TEMPLATES

    return [(seg.text, seg.learned) for seg in TEMPLATES.get("bunny").segments(conv)]


def slot_words(scene: Scene, side: int) -> list[list[str]]:
    """What each image token will carry, in the vision tower's patch order (row by row): the words of
    the object in that patch's cell (size, color, shape; none for an empty cell), the background,
    and the cell's place ("top", "left", ...). ``side`` patches per image side tile the grid."""
    words = []
    for r in range(side):
        for c in range(side):
            row, col = r * scene.grid // side, c * scene.grid // side
            o = scene.at(row, col)
            w = [o.size, o.color, o.shape] if o is not None else []
            words.append(w + [scene.background] + position_name(row, col, scene.grid).split())
    return words


def lm_example(rng: np.random.Generator, s: LMSettings) -> tuple[list[tuple[str, bool]], Scene | None]:
    """One training conversation (as template pieces) and the scene its image slot shows."""
    r = rng.random()
    if r < s.text_share:
        return render_bunny(text_conversation(rng)), None
    scene = sample_scene(rng)
    if r < s.text_share + s.plain_share:
        # stage 1's `plain` template: the image, then its caption and a newline (caption learned)
        return [(IMAGE, False), (caption(scene, rng) + "\n", True)], scene
    kind = "multi" if rng.random() < s.multi_share else pick_weighted(rng, SINGLE_KINDS)
    conv = conversation(kind, scene, rng, max_turns=s.turns)
    return render_bunny(conv), scene


def encode_pieces(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """input ids and labels (IGNORE_INDEX where no loss), built piece by piece (``<image>`` stays one id)."""
    ids, labels = [], []
    for text, loss in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if loss else [IGNORE_INDEX] * len(t)
    return ids, labels


class SlotCoder:
    """Turns ``(pieces, scene)`` into model inputs: the text's token ids with ``<image>`` expanded to
    ``side**2`` slot positions, and for each slot the token ids of its words (``slot_words``)."""

    def __init__(self, tok, side: int, background: bool = False, option_span: bool = False):
        self.tok, self.side = tok, side
        self.background, self.option_span = background, option_span
        self.image_id = tok.convert_tokens_to_ids(IMAGE)
        self._word_ids: dict[str, list[int]] = {}
        self._pieces: dict[int, str] = {}

    def word_ids(self, word: str) -> list[int]:
        if word not in self._word_ids:
            self._word_ids[word] = self.tok(" " + word, add_special_tokens=False)["input_ids"]
        return self._word_ids[word]

    def encode(self, pieces, scene) -> tuple[list[int], list[int], list[list[int]]]:
        ids, labels = encode_pieces(self.tok, pieces)
        n = self.side * self.side
        out_ids, out_labels = [], []
        for i, lab in zip(ids, labels):
            if i == self.image_id:
                out_ids += [i] * n
                out_labels += [IGNORE_INDEX] * n
            else:
                out_ids.append(i)
                out_labels.append(lab)
        slots = []
        if scene is not None and self.image_id in ids:
            slots = [[t for w in words for t in self.word_ids(w)] for words in slot_words(scene, self.side)]
        return out_ids, out_labels, slots

    def fact_words(self) -> dict[int, str]:
        """Token id -> the fact it names, for the words a question names facts with (colours, shapes
        and their plurals, sizes, places; with ``background``, also the background names and the word
        "background", whose fact every slot has)."""
        if not hasattr(self, "_facts"):
            from bunny.data.synthetic.scenes import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, SIZES

            words = {w: w for w in (*COLOR_NAMES, *SHAPES, *SIZES, "top", "bottom", "left", "right", "center")}
            words.update({w + "s": w for w in SHAPES})
            if self.background:
                words.update({w: w for w in BACKGROUND_NAMES})
                words["background"] = EVERY_SLOT
            self._facts = {ids[0]: fact for w, fact in words.items() if len(ids := self.word_ids(w)) == 1}
        return self._facts

    def piece(self, token_id: int) -> str:
        if token_id not in self._pieces:
            self._pieces[token_id] = self.tok.decode([token_id])
        return self._pieces[token_id]

    def options(self, ids: list[int], start: int, end: int) -> dict[str, tuple[int, int]]:
        """Multiple-choice options between ``start`` and ``end``: letter -> (position of the letter,
        position of the last token of its text, which alone has seen all of it), for the ``A. red``
        and ``(A) red`` layouts."""
        out = {}
        for p in range(max(start, 1), end - 2):
            letter = self.piece(ids[p])
            if len(letter) == 1 and letter in "ABCDEFGH" and self.piece(ids[p + 1]) in (".", ")") \
                    and self.piece(ids[p - 1]) in ("\n", "("):
                last = p + 2
                while last + 1 < end and "\n" not in self.piece(ids[last + 1]):
                    last += 1
                out[letter] = (p, last)
        return out

    def lookup_targets(self, ids: list[int], labels: list[int], scene) -> list[tuple[int, int, int, list[int]]]:
        """What :func:`lookup_loss` supervises, as ``(layer, head, query position, key positions)``:

        - layer 0, head 0: each fact word of a question -> the image slots whose cell has that fact
          (``"circle"`` -> the circles' slots);
        - layer 0, head 1: the last word of a multiple-choice option -> its letter;
        - layer 0, head 2 (``option_span``), options of several words: that last word -> every word of
          the option, so "top left" and "bottom left" differ where the answer is matched;
        - layer 1, head 0: the position that predicts a reply -> the question's fact words (the
          options' words left out);
        - last layer, head 0, multiple choice only: that position -> the last word of the right option.
        """
        if scene is None or self.image_id not in ids:
            return []
        cells = [set(w) for w in slot_words(scene, self.side)]
        first = ids.index(self.image_id)
        facts = self.fact_words()
        out: list[tuple[int, int, int, list[int]]] = []
        seg, i, n = first + len(cells), 0, len(ids)
        while i < n:
            if labels[i] == IGNORE_INDEX or (i and labels[i - 1] != IGNORE_INDEX):
                i += 1
                continue
            j = i
            while j < n and labels[j] != IGNORE_INDEX:
                j += 1
            opts = self.options(ids, seg, i)
            question_end = min((lp for lp, _ in opts.values()), default=i)
            for p in range(seg, i):
                if ids[p] in facts:
                    slots = [first + k for k, c in enumerate(cells) if facts[ids[p]] in c or facts[ids[p]] == EVERY_SLOT]
                    if slots:
                        out.append((0, 0, p, slots))
            for letter_pos, text_pos in opts.values():
                out.append((0, 1, text_pos, [letter_pos]))
                if self.option_span and text_pos > letter_pos + 2:
                    out.append((0, 2, text_pos, list(range(letter_pos + 2, text_pos + 1))))
            words = [p for p in range(seg, question_end) if ids[p] in facts]
            if words:
                out.append((1, 0, i - 1, words))
            reply = self.tok.decode([t for t in ids[i:j] if t != self.tok.eos_token_id]).strip()
            if reply in opts:
                out.append((*CHOICE_HOP, i - 1, [opts[reply][1]]))
            seg = i = j
        return out

    def collate(self, rows):
        """Right-padded ``(ids, attention, labels, slot_ids)``; rows are never cut (``batches`` keeps
        them within ``max_positions``), so every slot position gets its vector."""
        pad = self.tok.pad_token_id
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        slot_rows = []
        for i, (a, b, slots) in enumerate(rows):
            ids[i, : len(a)] = torch.tensor(a)
            lab[i, : len(b)] = torch.tensor(b)
            att[i, : len(a)] = 1
            if slots:
                slot_rows.append(slots)
        k = max((len(w) for slots in slot_rows for w in slots), default=1)
        slot_ids = torch.full((len(slot_rows), self.side * self.side, k), -1, dtype=torch.long)
        for i, slots in enumerate(slot_rows):
            for j, w in enumerate(slots):
                slot_ids[i, j, : len(w)] = torch.tensor(w)
        return ids, att, lab, slot_ids

    def embed(self, model, ids: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings with every image slot holding the sum of its words' embeddings."""
        table = model.get_input_embeddings()
        emb = table(ids)
        if slot_ids.numel():
            vec = (table(slot_ids.clamp(min=0)) * (slot_ids >= 0).unsqueeze(-1)).sum(2)
            mask = (ids == self.image_id).unsqueeze(-1)
            emb = emb.masked_scatter(mask, vec.to(emb.dtype))
        return emb


def batches(coder: SlotCoder, rng: np.random.Generator, s: LMSettings, n_batches: int):
    """``(ids, attention, labels, slot_ids, lookup targets per row)`` batches of fresh examples."""
    for _ in range(n_batches):
        rows, targets = [], []
        while len(rows) < s.batch_size:
            pieces, scene = lm_example(rng, s)
            row = coder.encode(pieces, scene)
            if len(row[0]) <= s.max_positions:  # never cut into an image slot
                rows.append(row)
                targets.append(coder.lookup_targets(row[0], row[1], scene) if s.lookup_aux else [])
        yield (*coder.collate(rows), targets)


def lookup_loss(attentions, targets, balance: bool = False) -> torch.Tensor | None:
    """Supervise the hops of a question about the image (the demo's measured wall: a from-scratch LM
    does not find question-dependent lookup in the image slots by itself within a CPU's steps; with
    only the answer position supervised to attend to the right slot it still plateaus near 0.6,
    because its query must first gather the question's words: docs/demo.md).

    First layer: each fact word of a question attends to the image slots that have that fact (a word
    matching itself, learned at once), and each option's last word to its letter. Second layer: the
    position that predicts the reply attends to the question's fact words, where the first layer
    left what the slots hold. Last layer, multiple choice: that position attends to the right option's
    last word, where its letter was left. ``-log`` of the attention mass on the targets
    (``SlotCoder.lookup_targets``), averaged. The reply itself is never a target: this teaches where to
    look, not what to answer.

    ``balance``: average each hop kind (layer, head) first, then the kinds. A plain mean is dominated by
    the many easy fact-word hops (several per question, learned at once), while the one that decides a
    multiple-choice answer (the reply -> the right option) occurs once per such question; measured on
    held-out multiple choice with ideal slots: right letter 0.42 -> 0.56, that hop's attention mass
    0.60 -> 0.67 (docs/demo.md)."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for b, rows in enumerate(targets):
        for layer, head, q, keys in rows:
            term = -torch.log(attentions[layer][b, head, q, keys].sum() + 1e-6)
            groups.setdefault((layer, head) if balance else (0, 0), []).append(term)
    if not groups:
        return None
    return torch.stack([torch.stack(terms).mean() for terms in groups.values()]).mean()


class HeadReadout:
    """The multiple-choice readout supervision (``LMSettings.readout_weight``).

    Measured (docs/demo.md, "Balancing the hops"): lookup supervision teaches the last layer's head 0
    at a multiple-choice reply to attend to the right option's last word (attention mass 0.73), yet
    forcing that attention onto the right option moves the right letter only 0.545 -> 0.57: the LM does
    not read the letter through the head. Here that head's output alone (its slice of the attention
    output, through the output projection, the final norm and the output layer) must name the reply's
    letter, so the value path from the option to the letter is trained too.

    Phi's layout: the heads' concatenated outputs enter ``self_attn.dense``; a forward pre-hook keeps them.
    """

    def __init__(self, model) -> None:
        cfg = model.config
        self.model, self.inputs = model, None
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        layer, self.head = CHOICE_HOP
        self.dense = model.model.layers[layer].self_attn.dense
        self.dense.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self.inputs = args[0]

    def loss(self, labels: torch.Tensor, targets: list) -> torch.Tensor | None:
        """Cross-entropy of the head's lone logits against the token after each multiple-choice reply
        position (the last-layer hops of ``SlotCoder.lookup_targets``); None when the batch has none."""
        where = [(b, q) for b, rows in enumerate(targets) for layer, head, q, _ in rows if (layer, head) == CHOICE_HOP]
        if not where or self.inputs is None:
            return None
        rows, cols = torch.tensor([b for b, _ in where]), torch.tensor([q for _, q in where])
        lo, hi = self.head * self.head_dim, (self.head + 1) * self.head_dim
        alone = self.inputs[rows, cols, lo:hi] @ self.dense.weight[:, lo:hi].T
        logits = self.model.lm_head(self.model.model.final_layernorm(alone))
        return torch.nn.functional.cross_entropy(logits.float(), labels[rows, cols + 1])


# ---------------------------------------------------------------------------------------- model
def build_model(tok, s: LMSettings):
    """Phi-2's architecture (parallel attention/MLP, partial rotary, LayerNorm), scaled down."""
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=s.max_positions,
        partial_rotary_factor=0.5,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(s.seed)
    model = PhiForCausalLM(cfg)
    if s.lookup_aux:  # attention weights are needed for lookup_loss
        model.set_attn_implementation("eager")
    with torch.no_grad():  # tied: the output layer shares it
        model.get_input_embeddings().weight.normal_(0.0, s.embed_init_std)
    return model


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX): there autocast is faster;
    elsewhere it is emulated and slower, so float32 stays."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def lr_at(step: int, s: LMSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    p = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def probe(model, coder: SlotCoder, rng: np.random.Generator, n: int = 300) -> dict[str, float]:
    """Exact-match accuracy of greedy replies to held-out questions about the scene in the image slot,
    per question family (teacher-forced argmax over the whole reply and its end token, which equals
    greedy decoding)."""
    from bunny.data.synthetic.questions import SHORT_FAMILIES, SHORT_SUFFIX, ask

    model.eval()
    fams = list(SHORT_FAMILIES) + ["exists", "relation", "color_yn", "count_yn"]
    right: dict[str, list[int]] = {f: [] for f in fams}
    for i in range(n):
        fam = fams[i % len(fams)]
        scene = sample_scene(rng)
        qa = ask(fam, scene, rng)
        if qa is None:
            continue
        suffix = SHORT_SUFFIX if fam in SHORT_FAMILIES or rng.random() < 0.5 else " Please answer yes or no."
        conv = [{"from": "human", "value": f"{IMAGE}\n{qa.question}{suffix}"}, {"from": "gpt", "value": qa.answer}]
        ids, att, lab, slots = coder.collate([coder.encode(render_bunny(conv), scene)])
        logits = model(inputs_embeds=coder.embed(model, ids, slots), attention_mask=att).logits[0, :-1]
        tgt = lab[0, 1:]
        m = tgt != IGNORE_INDEX
        right[fam].append(int((logits[m].argmax(-1) == tgt[m]).all()))
    model.train()
    acc = {f: float(np.mean(v)) for f, v in right.items() if v}
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc


def train_language(tok, out_dir: str | Path | None, s: LMSettings, side: int = 3, log=print,
                   stop_after: int | None = None) -> dict:
    """Train the LM, save it (with ``tok``) to ``out_dir``; returns measured figures. ``side``: image
    tokens per side of the vision tower the LM will be paired with (its slot has ``side**2``).
    ``stop_after``: stop after that many steps and return only the fingerprint (``bunny backbones
    --check``), saving nothing."""
    from bunny.backbones.ship import FINGERPRINT_STEP, fingerprint

    model = build_model(tok, s)
    if s.lookup_aux and s.option_span and s.heads < 3:
        raise ValueError(f"lm.option_span supervises attention head 2 of the first layer; lm.heads is {s.heads}: "
                         "use lm.heads >= 3 or lm.option_span: false")
    if s.readout_weight and not s.lookup_aux:
        raise ValueError("lm.readout_weight supervises the multiple-choice hop that lookup supervision finds; "
                         "it needs lm.lookup_aux > 0")
    coder = SlotCoder(tok, side, background=s.background_lookup, option_span=s.option_span)
    readout = HeadReadout(model) if s.readout_weight else None
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.98))
    rng = np.random.default_rng(s.seed)
    use_bf16 = cpu_has_bf16() if s.bf16 is None else s.bf16
    t0 = time.perf_counter()
    losses, fp = [], {}
    model.train()
    for step, (ids, att, lab, slots, targets) in enumerate(batches(coder, rng, s, s.steps)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            out = model(inputs_embeds=coder.embed(model, ids, slots), attention_mask=att, labels=lab,
                        output_attentions=bool(s.lookup_aux))
        loss = out.loss
        aux = lookup_loss(out.attentions, targets, s.lookup_balance) if s.lookup_aux else None
        total = loss if aux is None else loss + s.lookup_aux * aux
        extra = readout.loss(lab, targets) if readout is not None else None
        if extra is not None:
            total = total + s.readout_weight * extra
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step + 1 == FINGERPRINT_STEP:
            fp = fingerprint(model)
        if stop_after is not None and step + 1 >= stop_after:
            return {"fingerprint": fingerprint(model)}
        if log and (step % 50 == 0 or step == s.steps - 1):
            aux_text = f" lookup {aux.item():.3f}" if aux is not None else ""
            aux_text += f" readout {extra.item():.3f}" if extra is not None else ""
            log(f"  lm step {step:4d}/{s.steps} loss {loss.item():.3f}{aux_text} ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    acc = probe(model, coder, np.random.default_rng(s.seed + 10_000), n=s.probe_questions)
    out = Path(out_dir)
    model.set_attn_implementation("sdpa")  # the supervision needed eager attention; users get the default
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {
        "params": n_params,
        "seconds": round(seconds, 1),
        "loss_first": round(float(np.mean(losses[:10])), 4),
        "loss_last": round(float(np.mean(losses[-10:])), 4),
        "losses": [round(x, 4) for x in losses],
        "probe": {k: round(v, 3) for k, v in acc.items()},
        "bf16": use_bf16,
        "fingerprint": fp,
        "settings": asdict(s),
    }
