"""A ``.gguf`` file as an LLM: converted once to a normal HF folder, then used like any LLM folder.

Why convert: transformers reads GGUF (``from_pretrained(folder, gguf_file=name)``, weights
dequantized to float, tokenizer and chat template included) but refuses to ``save_pretrained`` such
a model, and re-reading a quantized file on every start costs time. So the file is read once, its
weights are copied into a fresh model of the same config (without ``quantization_config``), and
that model and the tokenizer are written to a cache folder keyed by the file's SHA-256. The next
start finds the folder. The cache is ``$BUNNY_GGUF_CACHE``, else ``$XDG_CACHE_HOME/bunny/gguf``
(``~/.cache/bunny/gguf``). A folder is written atomically, so an interrupted conversion is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from bunny.model.files import atomic_folder, read_json

MARKER = "bunny_gguf.json"


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def gguf_cache_dir() -> Path:
    if os.environ.get("BUNNY_GGUF_CACHE"):
        return Path(os.environ["BUNNY_GGUF_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bunny" / "gguf"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_to_folder(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The HF folder converted from the GGUF file ``path`` (converted now if the cache lacks it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    digest = file_sha256(path)
    out = Path(cache_dir) if cache_dir is not None else gguf_cache_dir()
    out = out / digest[:24]
    if (out / MARKER).is_file() and read_json(out / MARKER).get("sha256") == digest:
        return out
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise ImportError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from exc
    raw = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(raw)
    with no_init_weights():
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    with atomic_folder(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps({"source": str(path.resolve()), "sha256": digest}, indent=1))
    return out
