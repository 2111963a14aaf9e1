"""The Python entry point: ``run_curation`` does what ``bunny curate`` does and returns the paths.

Why a function and not only the CLI: the demo, notebooks and other pipelines call curation from
Python on a pool they just wrote, and want the coreset's path and the funnel back, not a printout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bunny.config import from_dict, load_config

from .config import CurateConfig
from .io import CurateError


@dataclass
class CurationResult:
    """What a run wrote under ``out`` (``coreset`` is None when the metadata has no image paths)."""

    out: Path
    funnel: dict[str, Any]
    embeddings: Path

    @property
    def kept(self) -> Path:
        return self.out / "kept.parquet"

    @property
    def dropped(self) -> Path:
        return self.out / "dropped.parquet"

    @property
    def coreset(self) -> Path | None:
        path = self.out / "coreset.json"
        return path if "coreset.json" in self.funnel["outputs"] else None

    @property
    def funnel_json(self) -> Path:
        return self.out / "funnel.json"

    @property
    def funnel_png(self) -> Path:
        return self.out / "funnel.png"

    @property
    def count(self) -> int:
        """Samples in the coreset."""
        return int(self.funnel["steps"][-1]["count"])

    def counts(self) -> dict[str, int]:
        """Samples after each step, in order (``input`` first)."""
        return {s["step"]: int(s["count"]) for s in self.funnel["steps"]}


def make_config(config: CurateConfig | dict[str, Any] | str | Path | None = None,
                overrides: list[str] | None = None) -> CurateConfig:
    """A :class:`CurateConfig` from a config object, a dict, a YAML file or nothing, plus ``key=value``."""
    if isinstance(config, CurateConfig):
        if overrides:
            from bunny.config import parse_overrides, to_dict

            return from_dict(CurateConfig, to_dict(config) | parse_overrides(overrides), "config (+ overrides)")
        return config
    if isinstance(config, dict):
        from bunny.config import parse_overrides

        return from_dict(CurateConfig, dict(config) | parse_overrides(overrides or []), "config")
    return load_config(CurateConfig, config, overrides)


def run_curation(
    config: CurateConfig | dict[str, Any] | str | Path | None = None,
    *,
    out: str | Path,
    embeddings: str | Path | None = None,
    pool: str | Path | None = None,
    image_folder: str | Path | None = None,
    model: str | Path | None = None,
    engine: Literal["local", "ray"] = "local",
    overrides: list[str] | None = None,
) -> CurationResult:
    """Condense a pool into a coreset under ``out``.

    Give either ``embeddings`` (a clip-retrieval layout folder) or ``pool`` (a LLaVA JSON of plain
    image-caption samples) with ``image_folder`` and ``model`` (a SiglipModel/CLIPModel folder);
    pool mode embeds into ``out/embeddings`` first (resumable: a rerun reuses finished shards).
    Raises :class:`CurateError` (bad input) or ``bunny.config.ConfigError`` (bad settings).
    """
    cfg = make_config(config, overrides)
    out = Path(out)
    if (embeddings is None) == (pool is None):
        raise CurateError("give either embeddings=DIR or pool=FILE.json (with image_folder and model)")
    if pool is not None and (image_folder is None or model is None):
        raise CurateError("pool mode needs image_folder=DIR and model=CLIP_DIR")
    if engine not in ("local", "ray"):
        raise CurateError(f"engine must be local or ray, got {engine!r}")
    if engine == "local":
        from .pipeline import run_local

        emb = Path(embeddings) if embeddings is not None else None
        if pool is not None:
            from .embed import embed_pool

            emb = embed_pool(pool, image_folder, model, out / "embeddings", cfg)  # type: ignore[arg-type]
        assert emb is not None
        return CurationResult(out, run_local(emb, out, cfg), emb)
    from .ray_engine import embed_pool_ray, ray_session, run_ray

    with ray_session(cfg):
        emb = Path(embeddings) if embeddings is not None else None
        if pool is not None:
            emb = embed_pool_ray(pool, image_folder, model, out / "embeddings", cfg)  # type: ignore[arg-type]
        assert emb is not None
        return CurationResult(out, run_ray(emb, out, cfg), emb)
