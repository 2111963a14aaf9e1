"""Evaluation speed: questions/s at batch 1 (the original's one-question loop) vs 8 vs 32, where the
time goes, and scoring full-size official files.

    .venv/bin/python benchmarks/bench_eval.py                          # small config + scoring (2-core CPU: minutes)
    .venv/bin/python benchmarks/bench_eval.py --model runs/demo/stage2 # also a trained model folder (the demo's)
    .venv/bin/python benchmarks/bench_eval.py --skip-generation        # scoring only (seconds)

Generation runs the real evaluation loop (``bunny.eval.runner.generate_answers``: image decoding on a
thread, ``bunny.infer`` Generator, left-padded greedy batches, answers.jsonl appended) on POPE-style
questions from the synthetic world, once per batch size, in one process, and checks that every batch
size gives the same answers. The small config is random (SigLIP-style tower: 6 layers, width 384,
384 px images / 14 px patches = 729 image tokens; Qwen2-style LM: 8 layers, width 768): a random
model never stops on its own, so every answer is forced to ``--new-tokens`` tokens (short answers:
prefill dominates, as in the short-answer benchmarks). A trained model (``--model``) stops where it
stops. The time is split with hooks into preprocessing (tokenize, image resize/normalise, padding),
image encoding (vision tower + projector), LM prefill, decode, and the rest (generate's overhead).

Scoring builds official-sized files (8,910 POPE, 12,578 GQA, 2,374 MME, 20,000 VQAv2 answers) in a
temp folder and times load + score with the official rules, from the answers file.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


# ---- generation ----------------------------------------------------------------------------------------
def small_model(seed: int = 0):
    """The small random config (see the module docstring)."""
    from bunny.backbones import corpus
    from bunny.backbones.tokenizer import train_tokenizer, wrap
    from bunny.model.tiny import tiny_model

    tok = wrap(train_tokenizer(corpus(300, seed=0), vocab_size=4096), model_max_length=4096)
    return tiny_model(tok, vision="siglip", family="qwen2", seed=seed,
                      vision_overrides=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                            num_attention_heads=6, image_size=384, patch_size=14),
                      text_overrides=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                          num_attention_heads=12, num_key_value_heads=4,
                                          max_position_embeddings=4096))


def force_length(answerer: Any) -> None:
    """Every reply runs to max_new_tokens: no end token, no stop string (random weights never stop)."""
    answerer.generator.end_ids = set()
    answerer.generator.default_stop = ()
    answerer.model.generation_config.eos_token_id = None


class Profile:
    """Wall time per phase, from hooks on the model (synchronised on CUDA)."""

    def __init__(self, answerer: Any) -> None:
        import torch

        self.t: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        model = answerer.model
        self.sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
        self._vision_start = 0.0
        self._wrap_forward(model)
        self._wrap_generate(model)
        model.vision_tower.register_forward_pre_hook(self._vision_pre)
        model.mm_projector.register_forward_hook(self._vision_post)

    def _vision_pre(self, *args: Any) -> None:
        self.sync()
        self._vision_start = time.perf_counter()

    def _vision_post(self, *args: Any) -> None:
        self.sync()
        self.t["image encoding"] += time.perf_counter() - self._vision_start

    def _wrap_forward(self, model: Any) -> None:
        inner = model.forward

        @functools.wraps(inner)  # generate() inspects forward's signature
        def forward(*args: Any, **kwargs: Any) -> Any:
            ids = kwargs.get("input_ids")
            phase = "prefill" if ids is None or ids.shape[1] > 1 else "decode"
            before = self.t["image encoding"]
            self.sync()
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.sync()
            dt = time.perf_counter() - t0
            self.t[phase] += dt - (self.t["image encoding"] - before)  # the LM part only
            self.t["forward"] += dt
            self.calls[phase] += 1
            return out

        model.forward = forward

    def _wrap_generate(self, model: Any) -> None:
        inner = model.generate

        @functools.wraps(inner)
        def generate(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.t["generate"] += time.perf_counter() - t0
            return out

        model.generate = generate

    def reset(self) -> None:
        self.t.clear()
        self.calls.clear()

    def split(self, total: float) -> dict[str, float]:
        gen = self.t["generate"]
        return {
            "preprocessing": total - gen,
            "image encoding": self.t["image encoding"],
            "prefill": self.t["prefill"],
            "decode": self.t["decode"],
            "other (generate overhead)": gen - self.t["forward"],
        }


def bench_generation(answerer: Any, task: Any, n: int, batch_sizes: list[int], new_tokens: int, label: str,
                     work: Path, rounds: int = 2) -> dict[str, Any]:
    """Each round runs every batch size once, interleaved (a shared, busy CPU slows all of them
    alike); the fastest round per batch size is reported, with its time split."""
    from bunny.eval.runner import generate_answers, read_records

    prof = Profile(answerer)
    # warm-up (first-call allocations, lazy imports) outside the timings
    generate_answers(task, answerer, work / f"{label}-warmup", batch_size=2, limit=2, max_new_tokens=new_tokens,
                     progress=False)
    best: dict[int, dict[str, Any]] = {}
    texts: dict[int, list[str]] = {}
    for r in range(rounds):
        for bs in batch_sizes:
            prof.reset()
            t0 = time.perf_counter()
            run = generate_answers(task, answerer, work / f"{label}-r{r}-b{bs}", batch_size=bs, limit=n,
                                   max_new_tokens=new_tokens, model_id=label, progress=False)
            total = time.perf_counter() - t0
            texts.setdefault(bs, [t["text"] for t in read_records(run.answers).values()])
            if bs not in best or total < best[bs]["seconds"]:
                best[bs] = {"batch": bs, "seconds": total, "qps": n / total, "split": prof.split(run.seconds),
                            "decode_steps": prof.calls["decode"], "loop_seconds": run.seconds}
            print(f"  [{label}] round {r + 1} batch {bs:>2}: {total:.1f} s", flush=True)
    rows = [best[bs] for bs in batch_sizes]
    base = rows[0]["qps"]
    for row in rows:
        row["speedup"] = row["qps"] / base
        parts = ", ".join(f"{k} {v:.1f}s ({100 * v / row['loop_seconds']:.0f}%)" for k, v in row["split"].items())
        print(f"  [{label}] batch {row['batch']:>2}: {n} questions in {row['seconds']:.1f} s = {row['qps']:.2f} q/s "
              f"({row['speedup']:.2f}x batch {batch_sizes[0]}) | {parts}", flush=True)
    same = all(texts[bs] == texts[batch_sizes[0]] for bs in batch_sizes)
    print(f"  [{label}] identical answers at every batch size: {same}", flush=True)
    return {"rows": rows, "identical": same}


# ---- scoring ----------------------------------------------------------------------------------------------
def official_sized_files(root: Path, rng: random.Random) -> dict[str, tuple[Path, Path]]:
    """Benchmark files of the official sizes (images are empty files: scoring never opens them)."""
    from bunny.eval.tasks.mme import SUBTASKS

    out: dict[str, tuple[Path, Path]] = {}
    yn = ["Yes", "No", "yes", "no", "Yes, there is.", "No, there is not.", "I think so."]
    # POPE: 3 splits x 2,970
    d = root / "pope"
    (d / "images").mkdir(parents=True)
    ans = []
    for split in ("adversarial", "popular", "random"):
        with open(d / f"coco_pope_{split}.json", "w") as f:
            for q in range(1, 2971):
                f.write(json.dumps({"question_id": q, "image": f"COCO_val2014_{q:012d}.jpg",
                                    "text": "Is there a dog in the image?", "label": rng.choice(["yes", "no"])}) + "\n")
                ans.append({"question_id": f"{split}/{q}", "text": rng.choice(yn)})
    out["pope"] = (d, _write_answers(root / "pope.jsonl", ans))
    # GQA testdev-balanced: 12,578
    d = root / "gqa"
    d.mkdir()
    words = ["yes", "no", "left", "right", "man", "table", "white", "black", "wood", "dog", "cat", "car"]
    qs = {str(20000000 + i): {"imageId": f"n{i % 398}", "question": "What is it?", "answer": rng.choice(words),
                              "types": {"structural": rng.choice(["query", "verify", "logical"]),
                                        "semantic": rng.choice(["obj", "attr", "rel"])}} for i in range(12578)}
    (d / "testdev_balanced_questions.json").write_text(json.dumps(qs))
    ans = [{"question_id": k, "text": rng.choice(words).capitalize() + rng.choice(["", "."])} for k in qs]
    out["gqa"] = (d, _write_answers(root / "gqa.jsonl", ans))
    # MME: 2,374 questions = 1,187 images, spread over the 14 subtasks
    d = root / "mme"
    ans = []
    for i in range(1187):
        sub = SUBTASKS[i % len(SUBTASKS)]
        (d / sub).mkdir(parents=True, exist_ok=True)
        (d / sub / f"{i:05d}.png").write_bytes(b"")
        (d / sub / f"{i:05d}.txt").write_text("Is it red? Please answer yes or no.\tYes\n"
                                              "Is it blue? Please answer yes or no.\tNo\n")
        for k in range(2):
            ans.append({"question_id": f"{sub}/{i:05d}.png/{k}", "text": rng.choice(yn)})
    out["mme"] = (d, _write_answers(root / "mme.jsonl", ans))
    # VQAv2 (val-style, with annotations): 20,000 questions x 10 human answers
    d = root / "vqav2"
    d.mkdir()
    pool = ["2", "two", "yes", "no", "red", "the dog", "dog", "1,000", "t-shirt", "hot dog"]
    questions = [{"question_id": i, "image_id": i // 5, "question": "What?"} for i in range(20000)]
    anns = [{"question_id": i, "image_id": i // 5, "answer_type": "other", "question_type": "what",
             "answers": [{"answer": rng.choice(pool), "answer_confidence": "yes", "answer_id": k + 1}
                         for k in range(10)]} for i in range(20000)]
    (d / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (d / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    ans = [{"question_id": i, "text": rng.choice(pool).capitalize() + "."} for i in range(20000)]
    out["vqav2"] = (d, _write_answers(root / "vqav2.jsonl", ans))
    return out


def _write_answers(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def bench_scoring(work: Path) -> dict[str, dict[str, float]]:
    from bunny.eval.tasks import build_task, read_answers

    files = official_sized_files(work / "official", random.Random(0))
    out = {}
    for name, (data, answers) in files.items():
        t0 = time.perf_counter()
        task = build_task(name, data)
        n = len(task.docs())
        t1 = time.perf_counter()
        scores = task.score(read_answers(answers))
        t2 = time.perf_counter()
        head = scores[task.headline]
        out[name] = {"answers": n, "load_s": t1 - t0, "score_s": t2 - t1, task.headline: head}
        print(f"  score {name:<6} {n:>6} answers: load {t1 - t0:.2f} s + score {t2 - t1:.2f} s "
              f"({task.headline} {head:.2f})", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="also time this model folder (e.g. the demo's trained model)")
    ap.add_argument("--questions", type=int, default=32, help="questions per batch size (default 32)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=4, help="forced answer length for the random model (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best per batch size counts")
    ap.add_argument("--device", default=None)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--skip-small", action="store_true", help="time only --model, not the small random config")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    import torch

    from bunny.eval.runner import ModelAnswerer, load_answerer
    from bunny.eval.tasks import build_task

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        work = Path(tmp)
        print("scoring official-sized answer files:", flush=True)
        results["scoring"] = bench_scoring(work)
        if not args.skip_generation:
            from bunny.data.synthetic import generate_world

            generate_world(work / "world", 60, seed=0, bench_size=max(args.questions // 3 + 1, 8),
                           tasks=("pope",))
            task = build_task("pope", work / "world" / "bench")
            if len(task.docs()) < args.questions:
                raise SystemExit(f"only {len(task.docs())} questions generated")
            sizes = [int(b) for b in args.batch_sizes.split(",")]
            if not args.skip_small:
                model, processor = small_model()
                dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
                model.to(device=device, dtype=dtype)
                answerer = ModelAnswerer(model, processor, model_id="small-random")
                force_length(answerer)
                print(f"small config (random, {args.new_tokens} new tokens per answer), "
                      f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters:", flush=True)
                results["small"] = bench_generation(answerer, task, args.questions, sizes, args.new_tokens, "small",
                                                    work, rounds=args.rounds)
                del answerer, model
            if args.model:
                answerer = load_answerer(args.model, device=device)
                print(f"model {args.model} (stops on its own end token, up to 16 new tokens):", flush=True)
                results["model"] = bench_generation(answerer, task, args.questions, sizes, 16, "model", work,
                                                rounds=args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
