"""The curation config: every knob of `bunny curate`, loaded with ``bunny.config.load_config``.

Defaults follow the paper (Bunny-pretrain-LAION-2M, ../shared/RECIPE.md) where it says something:
threshold 0.86, median member kept, image-text band 40%-60%, centroid band 15%-35%. The k-means
knobs say how much work training does (sample size x iterations x rounds) and the block/partition
knobs bound memory (see docs/curation.md, "Memory"). Every step can be turned off: filters at 0/null,
``dedup_threshold: null``, a band of ``[0, 1]``, ``sample: null``; k-means is skipped when neither dedup
nor the centroid band needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KEEP_RULES = ("median", "nearest", "farthest", "random", "largest")


@dataclass
class CurateConfig:
    # step 1: basic filters (DataComp-style; 0 / null = off) and embedding
    min_caption_words: int = 0
    min_caption_chars: int = 0
    min_image_side: int = 0  # pixels of the shorter side; needs width/height (pool mode, or metadata columns)
    max_aspect_ratio: float | None = None  # long side / short side
    embed_batch_size: int = 32
    shard_size: int = 10_000  # samples per written embedding shard (the unit of resume)
    image_mode: Literal["square", "pad"] = "square"
    bad_images: Literal["error", "drop"] = "error"  # an unreadable image: stop, or drop it as step "unreadable"
    device: str = "cpu"  # torch device for embedding

    # step 2: spherical k-means on L2-normalised image embeddings
    clusters: int = 100
    coarse_clusters: int = 0  # 0: one flat level (the paper); >0: two levels, assignment O(coarse + clusters/coarse)
    kmeans_train_size: int = 100_000  # vectors drawn (seeded) to train on, per round
    kmeans_iters: int = 20
    kmeans_rounds: int = 1  # each round draws a fresh sample and warm-starts from the last centroids

    # step 3: near-duplicate removal inside each cluster
    dedup_threshold: float | None = 0.86  # cosine above which two samples are duplicates; null: no dedup
    # which member of a duplicate group stays; ``largest``: the biggest image file (metadata column
    # ``bytes``, written by pool-mode embedding): a mirror's copy is re-encoded, mostly smaller
    keep: Literal["median", "nearest", "farthest", "random", "largest"] = "median"
    block_size: int = 2048  # rows per similarity block: at most block_size^2 similarities at once
    dedup_matmul: Literal["auto", "float32", "bf16"] = "auto"  # product that proposes pairs (same result)
    spill_partition_mb: float = 256  # target size of one on-disk partition of normalised embeddings

    # steps 4-6: rank bands (fractions of the ranked survivors; [0, 1] disables) and the final draw
    image_text_band: tuple[float, float] = (0.4, 0.6)
    centroid_band: tuple[float, float] = (0.15, 0.35)
    sample: int | None = None  # draw this many at random at the end; null keeps all
    seed: int = 0
    write_scores: bool = False  # also write scores.parquet: every sample's cluster, similarities and step
    threads: int | None = None  # worker threads for k-means cells and clusters (null: one per CPU)

    # engine `ray`
    ray_address: str | None = None  # null: start a local Ray (ray_num_cpus CPUs) unless one is running
    ray_num_cpus: int | None = None
    ray_embed_actors: int = 1
    ray_gpus_per_actor: float = 0.0

    def __post_init__(self) -> None:
        for name in ("clusters", "kmeans_train_size", "kmeans_iters", "kmeans_rounds", "block_size",
                     "embed_batch_size", "shard_size", "ray_embed_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")
        if not self.spill_partition_mb > 0:
            raise ValueError(f"spill_partition_mb must be > 0, got {self.spill_partition_mb}")
        for name in ("min_caption_words", "min_caption_chars", "min_image_side", "coarse_clusters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.coarse_clusters > self.clusters:
            raise ValueError(f"coarse_clusters ({self.coarse_clusters}) must not exceed clusters ({self.clusters})")
        if self.dedup_threshold is not None and not -1.0 <= self.dedup_threshold <= 1.0:
            raise ValueError(f"dedup_threshold is a cosine similarity in [-1, 1], got {self.dedup_threshold}")
        for name in ("image_text_band", "centroid_band"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"{name} must be [lo, hi] with 0 <= lo < hi <= 1, got [{lo}, {hi}]")
        if self.sample is not None and self.sample < 1:
            raise ValueError(f"sample must be a positive integer or null, got {self.sample}")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1.0:
            raise ValueError(f"max_aspect_ratio is long/short side, so >= 1 (or null), got {self.max_aspect_ratio}")

    @property
    def filters_enabled(self) -> bool:
        return bool(self.min_caption_words or self.min_caption_chars or self.min_image_side or self.max_aspect_ratio)

    @property
    def dedup_enabled(self) -> bool:
        return self.dedup_threshold is not None

    @property
    def needs_clusters(self) -> bool:
        """k-means serves dedup and the centroid band; with both off it is skipped."""
        return self.dedup_enabled or tuple(self.centroid_band) != (0.0, 1.0)
