"""`bunny score` with one question id spelled as a number and as a string (issue 12.6)."""

from __future__ import annotations

import json
import logging

from _train_helpers import world

from bunny.cli import main as bunny_main
from bunny.eval.tasks import build_task


def test_an_id_spelled_two_ways_is_one_id_reported_once(tmp_path, caplog):
    data = world() / "bench" / "pope"
    docs = build_task("pope", str(data)).docs()
    lines = [{"question_id": d.question_id, "text": "yes"} for d in docs[1:]]
    lines += [{"question_id": 7, "text": "yes"}, {"question_id": "7", "text": "no"}]  # not a POPE id, twice
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with caplog.at_level(logging.WARNING):
        assert bunny_main(["score", "--task", "pope", "--data", str(data), "--answers", str(answers),
                           "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "scores.json").read_text())["meta"]
    assert meta["unknown_ids"] == 1 and meta["duplicates"] == 0 and meta["missing"] == 1
    text = caplog.text
    n = len(lines)
    assert f'question_id 7 (line {n - 1}) and "7" (line {n})' in text and "answered more than once" not in text
