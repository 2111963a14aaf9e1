"""Data condensation: a coreset of an image-text pool by embeddings, clustering and deduplication.

``run_curation(config, out=..., embeddings=... | pool=..., image_folder=..., model=...)`` is the
Python entry point (``bunny curate`` on the command line); see docs/curation.md. Names are
imported lazily so that ``import bunny.curate`` stays cheap (faiss, pyarrow and Ray load on use).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CurateConfig", "CurateError", "CurationResult", "run_curation"]


def __getattr__(name: str) -> Any:
    if name in ("run_curation", "CurationResult"):
        from . import api

        return getattr(api, name)
    if name == "CurateConfig":
        from .config import CurateConfig

        return CurateConfig
    if name == "CurateError":
        from .io import CurateError

        return CurateError
    raise AttributeError(f"module 'bunny.curate' has no attribute {name!r}")
