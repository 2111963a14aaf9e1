"""Average the weights of several models linearly (the Bunny-v1.0-4B / 8B recipe).

Example:
    bunny average runs/lora-a runs/lora-b --weights 0.3 0.7 --out runs/averaged

Each input is a model folder or a LoRA run (merged into its base first, as the paper merges each
LoRA before averaging). All inputs must share the architecture (same tensor names and shapes).
The weights must be positive and sum to 1. The average is computed one tensor at a time in
float32, so memory stays at one model's size; the output keeps the first model's dtype, config,
tokenizer and image processor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="model folders or LoRA run folders (at least two)")
    p.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per model, summing to 1")
    p.add_argument("--out", required=True, help="where to write the averaged model folder")


def _tensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise SystemExit(f"bunny average: {folder} has no model.safetensors (not a bunny model folder?)")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def average_folders(folders: list[Path], weights: list[float], out: Path) -> Path:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bunny.model.files import atomic_folder

    maps = [_tensor_files(f) for f in folders]
    names = sorted(maps[0])
    for f, m in zip(folders[1:], maps[1:]):
        if set(m) != set(names):
            extra, missing = sorted(set(m) - set(names))[:5], sorted(set(names) - set(m))[:5]
            raise SystemExit(f"bunny average: {f} has different tensors than {folders[0]} "
                             f"(extra {extra}, missing {missing}): not the same architecture")
    handles: dict[Path, object] = {}

    def get(path: Path, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path].get_tensor(name)  # type: ignore[attr-defined]

    with atomic_folder(out) as tmp:
        for item in folders[0].iterdir():  # config, tokenizer, image processor
            if item.is_file() and not item.name.startswith("model.safetensors"):
                shutil.copy2(item, tmp / item.name)
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, shards, limit = 0, [], 4 * 1024**3
        for name in names:
            first = get(maps[0][name], name)
            acc = first.to(torch.float32) * weights[0]
            for w, m, f in zip(weights[1:], maps[1:], folders[1:]):
                t = get(m[name], name)
                if t.shape != first.shape:
                    raise SystemExit(f"bunny average: {name} is {tuple(t.shape)} in {f} but {tuple(first.shape)} "
                                     f"in {folders[0]}")
                acc += t.to(torch.float32) * w
            shard[name] = acc.to(first.dtype).contiguous() if first.is_floating_point() else first
            shard_bytes += shard[name].numel() * shard[name].element_size()
            if shard_bytes >= limit:
                shards.append(shard)
                shard, shard_bytes = {}, 0
        if shard or not shards:
            shards.append(shard)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for k, part in enumerate(shards, start=1):
                fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                save_file(part, str(tmp / fname), metadata={"format": "pt"})
                for n, t in part.items():
                    weight_map[n] = fname
                    total += t.numel() * t.element_size()
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def run(args: argparse.Namespace) -> int:
    if len(args.models) < 2:
        raise SystemExit("bunny average: give at least two models")
    if len(args.weights) != len(args.models):
        raise SystemExit(f"bunny average: {len(args.models)} models but {len(args.weights)} weights")
    if any(w <= 0 for w in args.weights) or abs(sum(args.weights) - 1.0) > 1e-6:
        raise SystemExit(f"bunny average: weights must be positive and sum to 1, got {args.weights}")
    from bunny.train.lora_io import LORA_META

    with tempfile.TemporaryDirectory(prefix="bunny-average-", dir=Path(args.out).parent if
                                     Path(args.out).parent.exists() else None) as scratch:
        folders = []
        for k, m in enumerate(args.models):
            path = Path(m)
            lora = next((c for c in (path, path / "final") if (c / LORA_META).is_file()), None)
            if lora is not None:  # merge the LoRA into its base first
                from bunny.model.layouts.ours import save_model
                from bunny.model.loading import load_model

                model, processor = load_model(lora)  # merged into its base
                path = save_model(model, processor, Path(scratch) / f"merged-{k}")
                del model
            elif not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
                path = path / "final"
            folders.append(path)
        out = average_folders(folders, list(args.weights), Path(args.out))
    print(f"averaged {len(folders)} models with weights {args.weights}: {out}")
    return 0
