"""Curation benchmark: steps 2-6 of ``bunny curate`` (k-means, assignment, per-cluster dedup, the two
rank bands, the draw) on synthetic 768-d embeddings with planted near-duplicate groups.

    .venv/bin/python benchmarks/bench_curate.py                         # 250k, 500k, 1M + baseline
    .venv/bin/python benchmarks/bench_curate.py --sizes 100000 --no-baseline

For each size N: our local engine, then the naive baseline in the same run: the same pipeline with
step 3 done the obvious way, one dense float32 N_c x N_c similarity matrix per cluster in NumPy
(``naive_dedup_cluster`` below). Each run is a fresh process, so its peak RSS is its own. Reported:
wall and CPU seconds, peak RSS, the seconds of each step, the dedup's recall and precision against
the planted groups, whether both coresets are equal, and the growth of the time with N (the number
of points per cluster is fixed, so linear is the target). A last part puts one huge cluster
through both dedups: the blocked one stays at ``block_size^2`` similarities, the dense one needs
N_c^2. The pools are written once under ``--data`` (about 3 GB per million rows, float16) and reused.

Targets (issue 3): 1M rows in <= 120 s and <= 4 GiB peak on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

TARGET_SECONDS, TARGET_GIB = 120.0, 4.0


def naive_dedup_cluster(emb, gidx, cent_sim, threshold, keep="median", seed=0, block_size=0, matmul=""):
    """The baseline: the whole similarity matrix of the cluster at once, float32, thresholded."""
    from bunny.curate.dedup import _find, _union, pick_members

    m = len(gidx)
    if m == 0:
        return gidx.copy()
    adjacent = np.triu(emb @ emb.T > threshold, 1)
    ii, jj = np.nonzero(adjacent)
    parent = np.arange(m, dtype=np.int64)
    _union(parent, ii, jj)
    return pick_members(_find(parent, np.arange(m)), gidx, cent_sim, keep, seed)


def bench_config(n: int, points_per_cluster: int, iters: int, train_size: int) -> dict:
    clusters = max(1, n // points_per_cluster)
    return {"clusters": clusters, "coarse_clusters": max(1, round(clusters**0.5)), "kmeans_train_size": train_size,
            "kmeans_iters": iters, "dedup_threshold": 0.86, "image_text_band": [0.4, 0.6],
            "centroid_band": [0.15, 0.35], "sample": n // 50, "seed": 0}


def _pool(data: Path, n: int, dim: int) -> Path:
    from bunny.curate.synthetic import planted_pool

    root = data / f"pool_{n}_{dim}"
    if not (root / "planted_groups.npy").is_file():
        t = time.perf_counter()
        planted_pool(root, n, dim=dim, shard_rows=100_000, dup_fraction=0.2, max_group=5, points_per_topic=2000)
        print(f"  wrote the {n:,}-row pool in {time.perf_counter() - t:.0f} s ({root})", flush=True)
    return root


def _run_pipeline(emb: str, out: str, cfg: dict, naive: bool) -> dict:
    """In a fresh process: one pipeline run, with its own wall/CPU time and peak RSS."""
    import pyarrow.parquet as pq

    from bunny.curate import pipeline, run_curation
    from bunny.curate.synthetic import dedup_quality

    if naive:
        pipeline.dedup_cluster = naive_dedup_cluster
    t0, c0 = time.perf_counter(), os.times()
    res = run_curation(cfg, out=out, embeddings=emb)
    wall, c1 = time.perf_counter() - t0, os.times()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    group = np.load(Path(emb) / "planted_groups.npy")
    dropped = pq.read_table(res.dropped).to_pandas()
    dups = dropped[dropped.step == "dedup"]
    quality = dedup_quality(group, dups.key.astype(np.int64).to_numpy(), dups.duplicate_of.astype(np.int64).to_numpy())
    kept = pq.read_table(res.kept, columns=["key"])["key"].to_pylist()
    return {"wall": wall, "cpu": (c1.user - c0.user) + (c1.system - c0.system), "peak_gib": peak / 2**30,
            "steps": {s["step"]: s["seconds"] for s in res.funnel["steps"]},
            "steps_cpu": {s["step"]: s.get("cpu_seconds", 0.0) for s in res.funnel["steps"]},
            "counts": res.counts(), "quality": quality, "kept": kept,
            "matmul": "float32 dense" if naive else res.funnel["steps"][4].get("matmul")}


def _huge_cluster(m: int, dim: int, naive: bool, block_size: int) -> dict:
    """In a fresh process: one cluster of m rows (10% in duplicate pairs) through one dedup."""
    from bunny.curate.dedup import dedup_cluster, resolve_matmul

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((m, dim), dtype=np.float32)
    emb[: m // 10 : 2] = emb[1 : m // 10 : 2] + 0.1 * rng.standard_normal((m // 20, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    gidx, cent = np.arange(m), rng.random(m)
    matmul = resolve_matmul("auto")
    if matmul == "bf16":
        dedup_cluster(emb[:256], gidx[:256], cent[:256], 0.86, matmul=matmul)  # torch loaded before the RSS base
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if naive:
        rep = naive_dedup_cluster(emb, gidx, cent, 0.86)
    else:
        rep = dedup_cluster(emb, gidx, cent, 0.86, block_size=block_size, matmul=matmul)
    wall = time.perf_counter() - t0
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"wall": wall, "extra_gib": extra / 2**30, "dropped": int((rep != gidx).sum()),
            "matmul": "float32 dense" if naive else matmul}


def _in_child(fn, *args):
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--points-per-cluster", type=int, default=1000, help="N / clusters, fixed across sizes")
    p.add_argument("--iters", type=int, default=10, help="k-means iterations")
    p.add_argument("--train-size", type=int, default=100_000, help="k-means sample")
    p.add_argument("--no-baseline", action="store_true", help="skip the naive dense baseline")
    p.add_argument("--huge-cluster", type=int, default=20_000, help="rows of the one-cluster test (0: skip)")
    p.add_argument("--data", type=Path, default=Path("/tmp/bench_curate"), help="where the pools are cached")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    print(f"device: this machine, {os.cpu_count()} CPUs; load average before: {os.getloadavg()}", flush=True)
    results = []
    for n in args.sizes:
        emb = _pool(args.data, n, args.dim)
        cfg = bench_config(n, args.points_per_cluster, args.iters, args.train_size)
        row = {"n": n, "config": cfg, "load_before": os.getloadavg()[0]}
        row["ours"] = _in_child(_run_pipeline, str(emb), str(args.data / f"out_{n}"), cfg, False)
        if not args.no_baseline:
            row["naive"] = _in_child(_run_pipeline, str(emb), str(args.data / f"out_{n}_naive"), cfg, True)
        row["load_after"] = os.getloadavg()[0]
        _print_row(row)
        results.append(row)
    _print_summary(results)
    huge = None
    if args.huge_cluster:
        huge = {"m": args.huge_cluster,
                "ours": _in_child(_huge_cluster, args.huge_cluster, args.dim, False, 2048),
                "naive": _in_child(_huge_cluster, args.huge_cluster, args.dim, True, 0)}
        print(f"\none cluster of {huge['m']:,} x {args.dim}: blocked ({huge['ours']['matmul']}, blocks of 2048) "
              f"{huge['ours']['wall']:.1f} s, +{huge['ours']['extra_gib']:.2f} GiB; dense float32 "
              f"{huge['naive']['wall']:.1f} s, +{huge['naive']['extra_gib']:.2f} GiB; same drops: "
              f"{huge['ours']['dropped'] == huge['naive']['dropped']} ({huge['ours']['dropped']:,})")
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        for r in results:
            for k in ("ours", "naive"):
                if k in r:
                    r[k].pop("kept", None)
        args.json.write_text(json.dumps({"sizes": results, "huge_cluster": huge}, indent=2) + "\n")
    return 0


def _print_row(row: dict) -> None:
    ours = row["ours"]
    q = ours["quality"]
    steps = ", ".join(f"{k} {v:.1f}/{ours['steps_cpu'][k]:.1f}" for k, v in ours["steps"].items()
                      if k not in ("input", "filter") and v >= 0.05)
    print(f"\nN = {row['n']:,} ({row['config']['clusters']} clusters, {row['config']['coarse_clusters']} coarse; "
          f"load {row['load_before']:.1f} -> {row['load_after']:.1f})")
    print(f"  ours : {ours['wall']:6.1f} s wall, {ours['cpu']:6.1f} s CPU, peak {ours['peak_gib']:.2f} GiB "
          f"(dedup product: {ours['matmul']}); steps (wall/CPU s): {steps}")
    print(f"         dedup recall {q['recall']:.4f}, precision {q['precision']:.4f} "
          f"({q['correct']:,} of {q['planted_duplicates']:,} planted duplicates, {q['dropped']:,} dropped); "
          f"coreset {ours['counts']['sample']:,}")
    if "naive" in row:
        nv = row["naive"]
        same = nv["kept"] == ours["kept"]
        print(f"  naive: {nv['wall']:6.1f} s wall, {nv['cpu']:6.1f} s CPU, peak {nv['peak_gib']:.2f} GiB; "
              f"dedup {nv['steps']['dedup']:.1f} s vs ours {ours['steps']['dedup']:.1f} s "
              f"(x{nv['steps']['dedup'] / max(ours['steps']['dedup'], 1e-9):.2f}); same coreset: {same}")


def _print_summary(results: list[dict]) -> None:
    if not results:
        return
    print("\n| N | ours wall s | ours CPU s | peak GiB | dedup s | naive wall s | naive dedup s | recall | precision |"
          " wall per 1k rows |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        o, nv = r["ours"], r.get("naive")
        print(f"| {r['n']:,} | {o['wall']:.1f} | {o['cpu']:.1f} | {o['peak_gib']:.2f} | {o['steps']['dedup']:.1f} | "
              f"{nv['wall'] if nv else float('nan'):.1f} | {nv['steps']['dedup'] if nv else float('nan'):.1f} | "
              f"{o['quality']['recall']:.4f} | {o['quality']['precision']:.4f} | {1000 * o['wall'] / r['n']:.3f} |")
    first, last = results[0], results[-1]
    growth = (last["ours"]["wall"] / first["ours"]["wall"]) / (last["n"] / first["n"])
    cpu_growth = (last["ours"]["cpu"] / first["ours"]["cpu"]) / (last["n"] / first["n"])
    print(f"\ntime growth from {first['n']:,} to {last['n']:,} relative to linear: wall x{growth:.2f}, "
          f"CPU x{cpu_growth:.2f} (<= 1 is linear or better)")
    big = last["ours"]
    print(f"{last['n']:,} rows: {big['wall']:.1f} s (target <= {TARGET_SECONDS:.0f} s: "
          f"{'met' if big['wall'] <= TARGET_SECONDS else 'NOT met'}), peak {big['peak_gib']:.2f} GiB "
          f"(target <= {TARGET_GIB:.0f} GiB: {'met' if big['peak_gib'] <= TARGET_GIB else 'NOT met'})")


if __name__ == "__main__":
    raise SystemExit(main())
