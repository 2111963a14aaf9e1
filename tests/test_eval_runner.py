"""The evaluation runner on a tiny random model: batching, resuming, data parallel, CLI, report.

The benchmarks are the synthetic world's (written in the official layouts); answers of a random
model are nonsense, but greedy nonsense is deterministic, which is what these tests rely on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import tiny_model, tiny_model_folder

from bunny.eval import evaluate
from bunny.eval.runner import ModelAnswerer, read_records
from bunny.eval.tasks import EvalDataError, build_task

TASKS = ["pope", "sqa", "mmmu"]  # short prompts, text-only SQA questions, MMMU's open + choice mix
LIMIT = 12
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    from bunny.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, 40, seed=1, bench_size=24)
    return root / "bench"


@pytest.fixture(scope="module")
def answerer() -> ModelAnswerer:
    model, processor = tiny_model(seed=0)
    return ModelAnswerer(model, processor, model_id="tiny")


@pytest.fixture(scope="module")
def reference(bench, answerer, tmp_path_factory) -> Path:
    """One uninterrupted run at batch size 1: the original's loop, one question at a time."""
    out = tmp_path_factory.mktemp("ref")
    evaluate(answerer, TASKS, bench, out, batch_size=1, limit=LIMIT, max_new_tokens=NEW_TOKENS, quiet=True)
    return out


def answers(out: Path, task: str) -> list[tuple[object, str]]:
    lines = (out / task / "answers.jsonl").read_text().splitlines()
    return [(r["question_id"], r["text"]) for r in map(json.loads, lines)]


def test_batch_size_never_changes_an_answer(bench, answerer, reference, tmp_path):
    scores = evaluate(answerer, TASKS, bench, tmp_path, batch_size=8, limit=LIMIT, max_new_tokens=NEW_TOKENS,
                      quiet=True)
    for task in TASKS:
        ref = answers(reference, task)
        assert len(ref) == LIMIT and len({t for _, t in ref}) > 1  # real, varied generations
        assert answers(tmp_path, task) == ref, task  # same order, same text
        assert scores[task] == json.loads((reference / task / "scores.json").read_text())
    assert any(not d.images for d in build_task("sqa", bench).docs()[:LIMIT])  # mixed text-only batches


class Crash(RuntimeError):
    pass


def test_rerun_resumes_after_an_interruption(bench, answerer, reference, tmp_path):
    calls: list[int] = []

    def crashing(prompts, images, max_new_tokens):
        if len(calls) == 2:
            raise Crash("killed")
        calls.append(len(prompts))
        return answerer(prompts, images, max_new_tokens)

    with pytest.raises(Crash):
        evaluate(crashing, ["pope"], bench, tmp_path, batch_size=4, limit=LIMIT, max_new_tokens=NEW_TOKENS,
                 model_id="tiny", quiet=True)
    path = tmp_path / "pope" / "answers.jsonl"
    assert len(read_records(path)) == 8  # two finished batches were kept
    with open(path, "a") as f:
        f.write('{"question_id": "random/9", "te')  # a line cut by a kill mid-write
    calls.clear()

    def counting(prompts, images, max_new_tokens):
        calls.append(len(prompts))
        return answerer(prompts, images, max_new_tokens)

    evaluate(counting, ["pope"], bench, tmp_path, batch_size=4, limit=LIMIT, max_new_tokens=NEW_TOKENS,
             model_id="tiny", quiet=True)
    assert calls == [4]  # only the rest was generated
    assert answers(tmp_path, "pope") == answers(reference, "pope")
    evaluate(counting, ["pope"], bench, tmp_path, batch_size=4, limit=LIMIT, model_id="tiny", quiet=True)
    assert calls == [4]  # a finished run generates nothing
    # answers of another model or another prompt are never mixed in
    with pytest.raises(EvalDataError, match="answered by model 'tiny', not 'other'"):
        evaluate(counting, ["pope"], bench, tmp_path, limit=LIMIT, model_id="other", quiet=True)


def test_other_weights_never_resume_into_the_same_folder(bench, tmp_path):
    first = tiny_model(seed=0)
    evaluate(first, ["pope"], bench, tmp_path, limit=2, max_new_tokens=2, quiet=True, report=False)
    evaluate(tiny_model(seed=0), ["pope"], bench, tmp_path, limit=4, max_new_tokens=2, quiet=True, report=False)
    assert len(read_records(tmp_path / "pope" / "answers.jsonl")) == 4  # same weights: resumed
    with pytest.raises(EvalDataError, match="was answered by model 'bunny-"):
        evaluate(tiny_model(seed=1), ["pope"], bench, tmp_path, limit=4, quiet=True, report=False)


def test_missing_image_fails_before_any_generation(bench, tmp_path):
    import shutil

    data = tmp_path / "pope"
    shutil.copytree(bench / "pope", data)
    first = build_task("pope", data).docs()[0].images[0]
    first.unlink()

    def never(*args):
        raise AssertionError("generate must not run")

    with pytest.raises(EvalDataError, match=rf"image\(s\) not found:\n  .*{first.name}"):
        evaluate(never, ["pope"], data, tmp_path / "out", quiet=True)


def test_cli_eval_and_score_write_answers_scores_and_report(bench, tmp_path):
    from bunny.cli import main

    model = tiny_model_folder(tmp_path, seed=0)
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(model), "--task", "pope,mmbench", "--data", str(bench), "--out", str(out),
               "--limit", "8", "--batch-size", "4", "--max-new-tokens", "4", "--no-progress"])
    assert rc == 0
    pope = json.loads((out / "pope" / "scores.json").read_text())
    assert {"f1", "adversarial", "meta"} <= set(pope)  # BENCHMARK_FORMATS.md keys (the first 8: one split)
    assert pope["meta"]["questions"] == 8 and pope["meta"]["missing"] == 0
    assert (out / "mmbench" / "submission.xlsx").is_file()
    report = (out / "report.md").read_text()
    assert "| pope (-) | f1 |" in report and "86.80" in report  # beside the published Bunny-v1.0-3B F1
    assert "categories." in report  # sub-categories listed per task
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    # scoring alone, from the answers file, gives the same numbers
    rc = main(["score", "--task", "pope", "--data", str(bench / "pope"), "--answers",
               str(out / "pope" / "answers.jsonl"), "--out", str(tmp_path / "scored"), "--only-answered"])
    assert rc == 0
    rescored = json.loads((tmp_path / "scored" / "scores.json").read_text())
    assert rescored["f1"] == pytest.approx(pope["f1"]) and rescored["adversarial"] == pytest.approx(pope["adversarial"])
    # bad input is a clear error, not a traceback
    assert main(["eval", "--model", str(model), "--task", "nope", "--data", str(bench), "--out", str(out)]) == 2


def test_two_ranks_split_the_questions_and_merge_in_order(bench, answerer, reference, tmp_path):
    """The data-parallel logic in one process: two ranks as threads with a real barrier (the
    torchrun test below runs it as two processes on gloo)."""
    import threading

    from bunny.eval.runner import Dist, generate_answers

    barrier = threading.Barrier(2, timeout=120)

    class ThreadDist(Dist):
        def barrier(self) -> None:
            barrier.wait()

    task = build_task("pope", bench)
    seen: dict[int, list] = {0: [], 1: []}

    def rank(r: int) -> None:
        def gen(prompts, images, n):
            seen[r].extend(prompts)
            return answerer(prompts, images, n)

        generate_answers(task, gen, tmp_path / "pope", batch_size=4, limit=LIMIT, max_new_tokens=NEW_TOKENS,
                         model_id="tiny", dist=ThreadDist(r, 2), progress=False)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    docs = task.docs()[:LIMIT]
    assert seen[0] == [d.prompt for d in docs[0::2]] and seen[1] == [d.prompt for d in docs[1::2]]
    assert answers(tmp_path, "pope") == answers(reference, "pope")
    assert not list((tmp_path / "pope").glob("answers.rank*.jsonl"))


@pytest.mark.slow
def test_two_processes_answer_like_one(bench, reference, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU): every question answered once, merged in question order,
    the same answers as the single-process batch-1 run."""
    model, processor = tiny_model(seed=0)
    from bunny.model.layouts.ours import save_model

    folder = save_model(model, processor, tmp_path / "tiny")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bunny.cli", "eval", "--model", str(folder), "--task", ",".join(TASKS), "--data", str(bench),
           "--out", str(out), "--limit", str(LIMIT), "--batch-size", "3", "--max-new-tokens", str(NEW_TOKENS),
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in TASKS:
        assert answers(out, task) == answers(reference, task), task
        assert not list((out / task).glob("answers.rank*.jsonl"))
    assert (out / "report.md").is_file()
    assert "processes: 2" in (out / "report.md").read_text()
