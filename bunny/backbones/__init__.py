"""Small backbones made from the synthetic world, used like real ones.

``build_backbones(cache_dir, settings)`` writes three Hugging Face folders:

- ``tokenizer/``: a byte-level BPE trained on the world's text (``bunny.backbones.tokenizer``);
- ``siglip/``: a SigLIP-style ``SiglipModel`` (both towers, tokenizer, image processor), the layout of
  google/siglip-so400m-patch14-384 (``bunny.backbones.vision``);
- ``lm/``: a small Phi-architecture causal LM (``PhiForCausalLM``, the layout of microsoft/phi-2) that
  has learned to answer questions about a scene description in its context
  (``bunny.backbones.language``).

The recipe then uses them through exactly the code path that takes the real checkpoints. They are
cached under ``cache_dir/<key>/``, the key hashing the settings and ``FORMAT_VERSION``: a second
call with the same settings returns at once (``Backbones.reused``). ``backbones.json`` beside them
records the measured figures (time, losses, held-out probes). The default settings' set is shipped in
the repository (``bunny/backbones/shipped/<key>/``, made by ``bunny backbones``; ``ship.py``), so a
fresh clone's demo starts from it instead of training for minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bunny.backbones.language import LMSettings
from bunny.backbones.vision import VisionSettings

FORMAT_VERSION = 3  # 3: the LM's conversation mix (SINGLE_KINDS) and lookup supervision


@dataclass
class BackboneSettings:
    vocab_size: int = 1024
    tokenizer_scenes: int = 3000  # scenes whose text trains the BPE
    vision: VisionSettings = field(default_factory=VisionSettings)
    lm: LMSettings = field(default_factory=LMSettings)
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"v": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @staticmethod
    def from_dict(d: dict) -> BackboneSettings:
        d = dict(d)
        vision = VisionSettings(**d.pop("vision", {}))
        lm = LMSettings(**d.pop("lm", {}))
        return BackboneSettings(vision=vision, lm=lm, **d)


@dataclass
class Backbones:
    root: Path
    settings: BackboneSettings
    figures: dict
    reused: bool = False

    shipped: bool = False

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def vision(self) -> Path:
        return self.root / "siglip"

    @property
    def lm(self) -> Path:
        return self.root / "lm"


def corpus(n_scenes: int, seed: int) -> Iterator[str]:
    """The world's text as the models will see it: captions, descriptions, instruction conversations
    in the `bunny` chat format, text-only conversations and the benchmarks' prompt phrasing."""
    from bunny.backbones.language import render_bunny
    from bunny.data.synthetic.instruct import IMAGE_KINDS, conversation, text_conversation
    from bunny.data.synthetic.pool import low_info_caption
    from bunny.data.synthetic.scenes import caption, description, sample_scene

    rng = np.random.default_rng(seed)
    kinds = list(IMAGE_KINDS)
    for i in range(n_scenes):
        sc = sample_scene(rng)
        yield caption(sc, rng)
        yield description(sc)
        conv = conversation(kinds[i % len(kinds)], sc, rng, image=description(sc))
        yield "".join(text for text, _ in render_bunny(conv))
        if i % 4 == 0:
            yield "".join(text for text, _ in render_bunny(text_conversation(rng)))
            yield low_info_caption(rng)


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def build_backbones(cache_dir: str | Path, settings: BackboneSettings | None = None,
                    log: Callable[[str], None] | None = print, force: bool = False) -> Backbones:
    """Train (or reuse from ``cache_dir``) the tokenizer, the SigLIP-style model and the LM."""
    from bunny.backbones.language import train_language
    from bunny.backbones.ship import FINGERPRINT_STEP, SHIPPED_DIR, file_hashes
    from bunny.backbones.tokenizer import train_tokenizer, wrap
    from bunny.backbones.vision import train_vision

    s = settings or BackboneSettings()
    root = Path(cache_dir) / s.key()
    for where, shipped in ((root, False), (SHIPPED_DIR / s.key(), True)):
        meta = where / "backbones.json"
        if meta.is_file() and not force:
            return Backbones(where, s, json.loads(meta.read_text())["figures"], reused=True, shipped=shipped)
    log = log or (lambda _msg: None)
    figures: dict = {}
    work = _atomic_dir(root)
    try:
        t = time.perf_counter()
        tok = wrap(train_tokenizer(corpus(s.tokenizer_scenes, s.seed), s.vocab_size),
                   model_max_length=s.lm.max_positions)
        tok.save_pretrained(work / "tokenizer")
        figures["tokenizer"] = {"vocab_size": len(tok), "seconds": round(time.perf_counter() - t, 1)}
        log(f"  tokenizer: {len(tok)} tokens ({figures['tokenizer']['seconds']} s)")
        figures["vision"] = train_vision(tok, work / "siglip", s.vision, log=log)
        figures["lm"] = train_language(tok, work / "lm", s.lm, side=s.vision.image_size // s.vision.patch_size, log=log)
        (work / "backbones.json").write_text(json.dumps({
            "settings": asdict(s), "key": s.key(), "figures": figures, "fingerprint_step": FINGERPRINT_STEP,
            "files": file_hashes(work)}, indent=1))
        if root.exists():
            shutil.rmtree(root)
        work.rename(root)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Backbones(root, s, figures)
