"""A small SigLIP-style vision+text model trained on the synthetic world, saved as a ``SiglipModel``
folder (both towers, the tokenizer and the image processor), exactly the layout of
google/siglip-so400m-patch14-384: curation embeds with it (``get_image_features`` /
``get_text_features``) and the multimodal model takes its vision tower.

Two objectives, because the demo has seconds, not days:
- SigLIP's sigmoid image-caption loss. transformers 5 initialises ``logit_scale`` and ``logit_bias``
  to 0, and from there the loss learns nothing in a few hundred steps (measured: the issue's
  warning); the SigLIP paper's ``log(10)`` and ``-10`` make it learn at once, so we set them.
- An auxiliary attribute loss from the scene facts: linear heads read, from every patch token of the
  layer the MLLM uses (``feature_layer``, second-to-last by default), the shape, color and size of
  the object in that patch's grid cell (or "nothing"), and the background from their mean. With
  ``image_size / patch_size == grid`` one patch sees exactly one cell, so every fact the
  questions ask about is in exactly one token. The heads are dropped when saving.

And two for curation, which reads the embeddings (docs/demo.md, "Curation on the demo's world"):
- fact heads (``FactHeads``): one linear head, shared by the image and the caption embedding, reads
  every fact of the scene from each; it aligns the towers in the first steps (caption retrieval
  0.09 -> 0.40 at 250 steps);
- a copy loss: InfoNCE between each image and a crawler's re-encoded copy of it against the batch's
  other images, so copies embed closer than scenes that differ by a fact (retrieval 0.89, copies
  >= 0.99 cosine, distinct scenes <= 0.78 at the 99th percentile): what dedup's threshold needs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bunny.data.synthetic.scenes import (
    BACKGROUND_NAMES,
    COLOR_NAMES,
    SHAPES,
    SIZES,
    Scene,
    caption,
    render,
    sample_scene,
)

NOTHING = 0  # class 0 of every per-cell head: an empty cell


@dataclass
class VisionSettings:
    image_size: int = 48
    patch_size: int = 16
    grid: int = 3
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    text_hidden_size: int = 128
    text_layers: int = 2
    text_max_positions: int = 48  # captions are at most ~41 tokens
    feature_layer: int = -2  # where the attribute heads read (the MLLM's vision_feature_layer)
    steps: int = 250
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.05
    aux_weight: float = 1.0
    fact_weight: float = 1.0  # scene facts read from both towers' embeddings by one shared head (0: off)
    copy_weight: float = 1.0  # image vs its re-encoded copy against the batch's other images (0: off)
    copy_temperature: float = 0.05
    hard_negative_share: float = 0.25  # batch share that are copies of other scenes with one fact changed
    augment: bool = True  # brightness and 1 px shifts, so a re-encoded copy embeds like its original
    logit_scale_init: float = math.log(10.0)
    logit_bias_init: float = -10.0
    scale_lr_mult: float = 1.0  # learning-rate multiplier of scale and bias (50 was measured worse)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if (self.image_size // self.patch_size) % self.grid:
            raise ValueError(f"{self.image_size // self.patch_size} patches per side cannot tile a {self.grid}x{self.grid} grid")


# ------------------------------------------------------------------------------------------ model
def build_model(tok, s: VisionSettings):
    """A fresh ``SiglipModel`` with SigLIP-paper scale/bias initialisation."""
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=s.hidden_size, intermediate_size=s.intermediate_size, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, image_size=s.image_size, patch_size=s.patch_size, num_channels=3,
    )
    text = SiglipTextConfig(
        vocab_size=len(tok), hidden_size=s.text_hidden_size, intermediate_size=4 * s.text_hidden_size,
        num_hidden_layers=s.text_layers, num_attention_heads=s.heads,
        max_position_embeddings=s.text_max_positions, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, projection_size=s.hidden_size,
    )
    torch.manual_seed(s.seed)
    model = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    with torch.no_grad():
        model.logit_scale.fill_(s.logit_scale_init)
        model.logit_bias.fill_(s.logit_bias_init)
    return model


def image_processor(s: VisionSettings):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": s.image_size, "width": s.image_size},
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


class AttributeHeads(nn.Module):
    """Per-cell shape/color/size (class 0 = nothing there), the cell's place on the grid, and the
    background, read linearly: every fact a question asks about, in the token that shows it."""

    def __init__(self, dim: int, grid: int = 3):
        super().__init__()
        self.cell = nn.Linear(dim, grid * grid)
        self.shape = nn.Linear(dim, 1 + len(SHAPES))
        self.color = nn.Linear(dim, 1 + len(COLOR_NAMES))
        self.size = nn.Linear(dim, 1 + len(SIZES))
        self.background = nn.Linear(dim, len(BACKGROUND_NAMES))

    def forward(self, cells: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"shape": self.shape(cells), "color": self.color(cells), "size": self.size(cells),
                "cell": self.cell(cells), "background": self.background(cells.mean(1))}


class FactHeads(nn.Module):
    """Every fact of the scene (per cell: shape, color, size or nothing; the background) read linearly
    from a tower's *embedding*, with the same weights for the image and the caption embedding.

    Why: the sigmoid loss alone aligns the towers slowly (a few hundred steps left retrieval at 9%);
    asking both embeddings to carry the same facts along the same directions aligns them from the
    first steps, and a scene that differs by one fact then differs along a learned direction, which
    is what dedup (image-image) and the image-text band (image-caption) measure."""

    def __init__(self, dim: int, grid: int = 3):
        super().__init__()
        self.n = grid * grid
        self.sizes = {"shape": 1 + len(SHAPES), "color": 1 + len(COLOR_NAMES), "size": 1 + len(SIZES)}
        self.cells = nn.Linear(dim, self.n * sum(self.sizes.values()))
        self.background = nn.Linear(dim, len(BACKGROUND_NAMES))

    def forward(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        per_cell = self.cells(emb).view(len(emb), self.n, -1).split(list(self.sizes.values()), dim=-1)
        for name, logits in zip(self.sizes, per_cell):
            out[name] = logits
        out["background"] = self.background(emb)
        return out


def fact_loss(heads: FactHeads, emb: torch.Tensor, tgt: dict[str, torch.Tensor]) -> torch.Tensor:
    pred = heads(emb)
    return sum(F.cross_entropy(pred[k].flatten(0, -2), tgt[k].flatten()) for k in pred) / len(pred)


def cell_targets(scenes: list[Scene], grid: int) -> dict[str, torch.Tensor]:
    n = grid * grid
    shape = torch.zeros(len(scenes), n, dtype=torch.long)
    color = torch.zeros_like(shape)
    size = torch.zeros_like(shape)
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            k = o.row * grid + o.col
            shape[i, k] = 1 + SHAPES.index(o.shape)
            color[i, k] = 1 + COLOR_NAMES.index(o.color)
            size[i, k] = 1 + SIZES.index(o.size)
    bg = torch.tensor([BACKGROUND_NAMES.index(sc.background) for sc in scenes])
    cell = torch.arange(n).expand(len(scenes), n)
    return {"shape": shape, "color": color, "size": size, "cell": cell, "background": bg}


def patches_to_cells(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, P*P, C] patch tokens -> [B, grid*grid, C], averaging the patches of each cell."""
    b, n, c = tokens.shape
    side = int(round(math.sqrt(n)))
    if side == grid:
        return tokens
    x = tokens.transpose(1, 2).reshape(b, c, side, side)
    return F.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------------------- data
def batch(tok, rng: np.random.Generator, s: VisionSettings):
    """A training batch ``(pixels, input_ids, cell targets, captions)``. A share of it are hard
    negatives: a scene of the batch with one color, shape or the background changed, so the sigmoid
    loss must tell scenes apart by a single fact (what near-duplicate removal and mismatched-caption
    detection need), not only by their overall look."""
    pixels, _, ids, tgt, caps = batch_views(tok, rng, s)
    return pixels, ids, tgt, caps


def _to_pixels(img) -> np.ndarray:
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return ((a - 0.5) / 0.5).transpose(2, 0, 1)


def batch_views(tok, rng: np.random.Generator, s: VisionSettings):
    """``batch`` plus, when ``copy_weight`` is on, a re-encoded copy of every image (``copies``):
    saved as JPEG like a crawled image, then copied as a crawler's mirror would
    (``pool.near_duplicate``: 1 px shift, brightness, another JPEG quality). The copy-vs-other-image
    loss makes such copies embed closer to each other than any two scenes that differ by a fact."""
    from PIL import Image

    from bunny.data.synthetic.pool import near_duplicate
    from bunny.data.synthetic.questions import altered
    from bunny.data.synthetic.scenes import encode

    n_hard = int(s.batch_size * s.hard_negative_share / 2)
    scenes = [sample_scene(rng, s.grid) for _ in range(s.batch_size - n_hard)]
    scenes += [altered(scenes[i], rng) for i in range(n_hard)]
    arrays, copies = [], []
    for sc in scenes:
        img = render(sc, s.image_size, rng)
        if s.copy_weight:
            jpeg = encode(img, "JPEG", quality=int(rng.integers(85, 96)))
            img = Image.open(io_bytes(jpeg))
            copies.append(_to_pixels(Image.open(io_bytes(near_duplicate(jpeg, rng)))))
        a = _to_pixels(img)
        if s.augment:  # what a crawler's copy of an image looks like (pool.near_duplicate)
            a = np.roll(a, tuple(int(v) for v in rng.integers(-1, 2, size=2)), axis=(1, 2))
            a = np.clip((a + 1) * rng.uniform(0.95, 1.05) - 1, -1.0, 1.0)
        arrays.append(a)
    pixels = torch.from_numpy(np.stack(arrays).astype(np.float32))
    copy_pixels = torch.from_numpy(np.stack(copies).astype(np.float32)) if copies else None
    caps = [caption(sc, rng) for sc in scenes]
    ids = tok(caps, padding="max_length", truncation=True, max_length=s.text_max_positions,
              return_tensors="pt")["input_ids"]
    return pixels, copy_pixels, ids, cell_targets(scenes, s.grid), caps


def copy_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE between images and their copies: each copy must pick its own original out of the
    batch (which holds one-fact variants of some scenes), both ways."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every (image, caption) pair is a binary problem."""
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() * scale.exp() + bias
    labels = 2 * torch.eye(len(img), device=img.device) - 1
    return -F.logsigmoid(labels * logits).sum(-1).mean()


def lr_at(step: int, s: VisionSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    p = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * 0.5 * (1 + math.cos(math.pi * p))


@torch.no_grad()
def evaluate(model, heads, tok, s: VisionSettings, n: int = 256) -> dict[str, float]:
    """Held-out figures on fresh scenes:

    - ``retrieval_top1``: image -> its caption among ``n``;
    - ``match_auc``: P(an image is closer to its own caption than to another scene's);
    - ``pair_auc``: P(a matched image-caption pair scores above a mismatched pair of other scenes):
      what the image-text rank band of curation relies on to drop mismatched captions;
    - ``blank_auc``: the same with a blank image (``pool.blank_image``) carrying a real caption;
    - ``dup_cos_p5`` / ``_p10`` / ``_p50``, ``altered_cos_p95``, ``other_cos_p99``: image-image cosine with a near-duplicate
      (1 px shift, brightness, JPEG), with the scene one fact changed, and with other scenes: where
      the dedup threshold can sit;
    - ``attr_*``: per-cell attribute accuracy of the heads (occupied cells; ``empty``: empty cells).
    """
    from PIL import Image

    from bunny.data.synthetic.pool import blank_image, near_duplicate
    from bunny.data.synthetic.questions import altered
    from bunny.data.synthetic.scenes import encode

    model.eval()
    rng = np.random.default_rng(s.seed + 1_000_003)
    ev = VisionSettings(**{**asdict(s), "batch_size": n, "hard_negative_share": 0.0, "augment": False})
    pixels, ids, tgt, _ = batch(tok, rng, ev)

    def embed_images(px):
        out = model.get_image_features(pixel_values=px)
        return F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)

    out = model.vision_model(pixel_values=pixels, output_hidden_states=True)
    img = embed_images(pixels)
    txt = model.get_text_features(input_ids=ids)
    txt = F.normalize(txt if torch.is_tensor(txt) else txt.pooler_output, dim=-1)
    sim = img @ txt.t()
    retrieval = float((sim.argmax(1) == torch.arange(n)).float().mean())
    own = sim.diag()[:, None]
    off = ~torch.eye(n, dtype=torch.bool)
    auc = float((own > sim)[off].float().mean())
    # across the pool, as the image-text rank band sees it: any matched pair above any mismatched one
    pair_auc = _auc(sim.diag(), sim[off])
    # image-image: near-duplicates and one-fact changes of fresh scenes
    k = 128
    scenes = [sample_scene(rng, s.grid) for _ in range(k)]

    def px_of(images):
        return torch.from_numpy(np.stack([
            ((np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
            for im in images]))

    base = [Image.open(io_bytes(encode(render(sc, s.image_size, rng), "JPEG"))) for sc in scenes]
    dups = [Image.open(io_bytes(near_duplicate(encode(im, "JPEG"), rng))) for im in base]
    alt = [render(altered(sc, rng), s.image_size, rng) for sc in scenes]
    e_base, e_dup, e_alt = embed_images(px_of(base)), embed_images(px_of(dups)), embed_images(px_of(alt))
    other = e_base @ e_base.t()
    # blank images (pool.blank_image) carrying a real caption against matched pairs
    blanks = [Image.open(io_bytes(blank_image(s.image_size, rng))) for _ in range(k)]
    blank_sim = (embed_images(px_of(blanks)) * txt[:k]).sum(-1)
    figures = {
        "retrieval_top1": retrieval,
        "match_auc": auc,
        "pair_auc": pair_auc,
        "blank_auc": _auc(sim.diag(), blank_sim),
        "dup_cos_p5": float(torch.quantile((e_base * e_dup).sum(-1), 0.05)),
        "dup_cos_p10": float(torch.quantile((e_base * e_dup).sum(-1), 0.10)),
        "dup_cos_p50": float(torch.quantile((e_base * e_dup).sum(-1), 0.5)),
        "altered_cos_p95": float(torch.quantile((e_base * e_alt).sum(-1), 0.95)),
        "other_cos_p99": float(torch.quantile(other[~torch.eye(k, dtype=torch.bool)], 0.99)),
    }
    pred = heads(patches_to_cells(out.hidden_states[s.feature_layer], s.grid))
    occupied = tgt["shape"] > 0
    for name in ("shape", "color", "size"):
        figures[f"attr_{name}"] = float((pred[name].argmax(-1) == tgt[name])[occupied].float().mean())
    figures["attr_background"] = float((pred["background"].argmax(-1) == tgt["background"]).float().mean())
    figures["attr_cell"] = float((pred["cell"].argmax(-1) == tgt["cell"]).float().mean())
    figures["attr_empty"] = float((pred["shape"].argmax(-1) == 0)[~occupied].float().mean())
    model.train()
    return {k: round(v, 4) for k, v in figures.items()}


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney statistic)."""
    both = torch.cat([pos, neg]).double()
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=both.dtype)
    for v in both.unique()[both.unique(return_counts=True)[1] > 1]:  # ties: their mean rank
        ranks[both == v] = ranks[both == v].mean()
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def train_vision(tok, out_dir: str | Path | None, s: VisionSettings, log=print,
                 stop_after: int | None = None) -> dict:
    """Train the two towers (+ attribute heads), save the ``SiglipModel`` folder; return figures.
    ``stop_after``: stop after that many steps and return only the fingerprint (``bunny backbones
    --check``), saving nothing."""
    from bunny.backbones.ship import FINGERPRINT_STEP, fingerprint

    model = build_model(tok, s)
    heads = AttributeHeads(s.hidden_size, s.grid)
    facts = FactHeads(s.hidden_size, s.grid)
    params = list(model.parameters()) + list(heads.parameters()) + list(facts.parameters())
    temp = [model.logit_scale, model.logit_bias]
    rest = [p for p in params if all(p is not t for t in temp)]
    decay = [p for p in rest if p.ndim >= 2]
    no_decay = [p for p in rest if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay, "mult": 1.0},
                             {"params": no_decay, "weight_decay": 0.0, "mult": 1.0},
                             {"params": temp, "weight_decay": 0.0, "mult": s.scale_lr_mult}],
                            lr=s.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(s.seed)
    model.train()
    t0, cpu0 = time.perf_counter(), time.process_time()
    losses, aux_losses, fp = [], [], {}
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s) * g["mult"]
        pixels, copies, ids, tgt, _ = batch_views(tok, rng, s)
        vis = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        txt = model.text_model(input_ids=ids)
        # pooler outputs are the towers' embeddings (attention-pooling head / last token + head)
        loss_c = sigmoid_loss(vis.pooler_output, txt.pooler_output, model.logit_scale, model.logit_bias)
        pred = heads(patches_to_cells(vis.hidden_states[s.feature_layer], s.grid))
        loss_a = sum(F.cross_entropy(pred[k].flatten(0, -2), tgt[k].flatten()) for k in pred)
        loss = loss_c + s.aux_weight * loss_a
        if s.copy_weight:
            loss_d = copy_loss(vis.pooler_output, model.vision_model(pixel_values=copies).pooler_output,
                               s.copy_temperature)
            loss = loss + s.copy_weight * loss_d
        if s.fact_weight:
            loss = loss + s.fact_weight * (fact_loss(facts, vis.pooler_output, tgt)
                                           + fact_loss(facts, txt.pooler_output, tgt))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_c.item())
        aux_losses.append(loss_a.item())
        if step + 1 == FINGERPRINT_STEP:
            fp = fingerprint(model)
        if stop_after is not None and step + 1 >= stop_after:
            return {"fingerprint": fingerprint(model)}
        if log and (step % 50 == 0 or step == s.steps - 1):
            log(f"  vision step {step:4d}/{s.steps} sigmoid {loss_c.item():.3f} attributes {loss_a.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    figures = evaluate(model, heads, tok, s)
    out = Path(out_dir)
    model.save_pretrained(out, max_shard_size="4MB")  # shards under 5 MiB: the set is shipped in git
    tok.save_pretrained(out)
    image_processor(s).save_pretrained(out)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # all threads: on a shared machine, what the training costs
        "threads": torch.get_num_threads(),
        "sigmoid_loss_first": round(float(np.mean(losses[:10])), 4),
        "sigmoid_loss_last": round(float(np.mean(losses[-10:])), 4),
        "attribute_loss_first": round(float(np.mean(aux_losses[:10])), 4),
        "attribute_loss_last": round(float(np.mean(aux_losses[-10:])), 4),
        "logit_scale": round(model.logit_scale.item(), 4),
        "logit_bias": round(model.logit_bias.item(), 4),
        "losses": [round(x, 4) for x in losses],
        **figures,
        "fingerprint": fp,
        "settings": asdict(s),
    }
