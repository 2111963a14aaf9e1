"""Hand-checked scoring fixtures for the eight benchmark tasks.

Benchmark files are written here by hand in the official layouts (raw text where the format is
text), answers are the tricky ones users' models produce, and every expected number is worked
out in the comments next to it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random

import pytest
from PIL import Image

from bunny.eval.tasks import TASKS, EvalDataError, build_task, flatten, get_value, read_answers
from bunny.eval.tasks.mmbench import can_infer
from bunny.eval.tasks.mme import read_yes_no as mme_read
from bunny.eval.tasks.mmmu import parse_multi_choice_response, parse_open_response
from bunny.eval.tasks.pope import read_yes_no as pope_read
from bunny.eval.tasks.sqa import read_letter as sqa_read
from bunny.eval.tasks.vqav2 import evalai_answer, process_digit_article, process_punctuation, vqa_accuracy
from bunny.eval.writers import write_mmmu


def png(color=(200, 30, 30), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def answers_file(path, pairs):
    with open(path, "w") as f:
        for qid, text in pairs:
            f.write(json.dumps({"question_id": qid, "text": text}) + "\n")
    return path


def test_registry_has_the_eight_tasks():
    assert TASKS.names() == ["gqa", "mmbench", "mme", "mmmu", "pope", "seed", "sqa", "vqav2"]


# ---- MME ---------------------------------------------------------------------------------------------
def test_mme_reading_rule():
    assert mme_read("Yes") == "yes"
    assert mme_read("Yes, there is") == "yes"  # "yes," in the first four characters
    assert mme_read("No.") == "no"
    assert mme_read("NO") == "no"
    assert mme_read("not sure") == "no"  # "not " contains "no"
    assert mme_read("The answer is yes.") == "other"  # only the first four characters count
    assert mme_read("") == "other"
    assert mme_read("Nope") == "no"


def make_mme(root):
    # existence: images and txt side by side; artwork: images/ + questions_answers_YN/ (as released)
    ex = root / "existence"
    ex.mkdir(parents=True)
    (ex / "000000000139.jpg").write_bytes(png())
    (ex / "000000000139.txt").write_text("Is there a tv in this image? Please answer yes or no.\tYes\n"
                                         "Is there a dog in this image? Please answer yes or no.\tNo\n")
    (ex / "000000000632.png").write_bytes(png())
    (ex / "000000000632.txt").write_text("Is there a bed? Please answer yes or no.\tYes\n"
                                         "Is there a car? Please answer yes or no.\tNo\n")
    art = root / "artwork"
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YN").mkdir()
    (art / "images" / "10002.jpg").write_bytes(png())
    (art / "questions_answers_YN" / "10002.txt").write_text("Is this artwork by Monet?\tYes\nIs it by Goya?\tNo\n")
    code = root / "code_reasoning"
    code.mkdir()
    (code / "0020.png").write_bytes(png())
    (code / "0020.txt").write_text("Will the code print 3?\tYes\nWill it print 4?\tNo\n")
    return root


def test_mme_loads_official_layouts_and_scores(tmp_path, caplog):
    root = make_mme(tmp_path / "MME_Benchmark_release_version")
    task = build_task("mme", tmp_path, subtasks="existence,artwork,code_reasoning")  # parent folder works
    docs = task.docs()
    ids = [d.question_id for d in docs]
    assert ids[:4] == ["existence/000000000139.jpg/0", "existence/000000000139.jpg/1",
                       "existence/000000000632.png/0", "existence/000000000632.png/1"]
    assert "artwork/10002.jpg/0" in ids and "code_reasoning/0020.png/1" in ids
    assert docs[0].prompt == ("<image>\nIs there a tv in this image? Please answer yes or no.\n"
                              "Answer the question using a single word or phrase.")
    assert docs[0].images == [root / "existence" / "000000000139.jpg"]
    assert task.missing_images() == []
    path = answers_file(tmp_path / "a.jsonl", [
        ("existence/000000000139.jpg/0", "Yes, there is"),  # yes, right
        ("existence/000000000139.jpg/1", "No."),  # no, right -> image 1 both right
        ("existence/000000000632.png/0", "The answer is yes."),  # other, wrong
        ("existence/000000000632.png/1", "not sure"),  # no, right
        # artwork/10002.jpg/0 missing -> wrong
        ("artwork/10002.jpg/1", "NO"),  # right
        ("code_reasoning/0020.png/0", "yes"),  # right
        ("code_reasoning/0020.png/1", ""),  # other, wrong
        ("existence/999.jpg/0", "Yes"),  # not in the benchmark
    ])
    with caplog.at_level(logging.WARNING, logger="bunny.eval"):
        s = task.score(path)
    # existence: acc 3/4, acc+ 1/2 -> 75 + 50; artwork: acc 1/2, acc+ 0 -> 50; code: 1/2, 0 -> 50
    assert s["subtasks"] == pytest.approx({"existence": 125.0, "artwork": 50.0, "code_reasoning": 50.0})
    assert s["perception"] == pytest.approx(175.0)
    assert s["cognition"] == pytest.approx(50.0)
    assert s["meta"]["missing"] == 1 and s["meta"]["unknown_ids"] == 1
    assert s["other_answers"] == 2
    text = caplog.text
    assert "existence/999.jpg/0" in text and "line 8" in text and str(path) in text
    assert "1 of 8 question(s) have no answer" in text
    assert get_value(s, "subtasks.existence") == pytest.approx(125.0)
    assert flatten(s)["subtasks.artwork"] == pytest.approx(50.0)


def test_mme_bad_input_names_file_and_line(tmp_path):
    make_mme(tmp_path)
    (tmp_path / "existence" / "000000000632.txt").write_text("Is there a bed?\tYes\nIs there a car? No\n")
    with pytest.raises(EvalDataError, match=r"000000000632\.txt:2: expected 'question<TAB>Yes\|No'"):
        build_task("mme", tmp_path, subtasks="existence").docs()
    with pytest.raises(EvalDataError, match="subtask folder\\(s\\) missing: count"):
        build_task("mme", tmp_path).docs()  # the full benchmark needs all 14 subtasks
    (tmp_path / "code_reasoning" / "0020.png").unlink()
    with pytest.raises(EvalDataError, match=r"0020\.txt: no image named 0020"):
        build_task("mme", tmp_path, subtasks="code_reasoning").docs()


# ---- POPE --------------------------------------------------------------------------------------------
def test_pope_reading_rule():
    assert pope_read("Yes, there is a dog in the image.") == "yes"
    assert pope_read("No.") == "no"
    assert pope_read("There is not a cat.") == "no"
    assert pope_read("NO") == "yes"  # case as written: only No / no / not count
    assert pope_read("I think no, it isn't.") == "no"  # comma dropped, "no" is a word
    assert pope_read("Yes. No dog though.") == "yes"  # only the first sentence
    assert pope_read("") == "yes"
    assert pope_read("Nope") == "yes"


def make_pope(root):
    rows = {
        "random": [(1, "yes"), (2, "no"), (3, "yes"), (4, "no")],
        "popular": [(1, "yes"), (2, "no")],
        "adversarial": [(1, "yes"), (2, "no")],
    }
    root.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        with open(root / f"coco_pope_{split}.json", "w") as f:
            for qid, label in items:
                f.write(json.dumps({"question_id": qid, "image": f"COCO_val2014_{qid:012d}.jpg",
                                    "text": "Is there a dog in the image?", "label": label}) + "\n")
    (root / "images").mkdir(exist_ok=True)
    for qid in range(1, 5):
        (root / "images" / f"COCO_val2014_{qid:012d}.jpg").write_bytes(png())
    return root


def test_pope_scores_per_split(tmp_path):
    root = make_pope(tmp_path / "pope")
    task = build_task("pope", root)
    assert len(task.docs()) == 8
    assert task.docs()[0].question_id == "adversarial/1"
    assert task.docs()[0].prompt == "<image>\nIs there a dog in the image?\nAnswer the question using a single word or phrase."
    path = answers_file(tmp_path / "a.jsonl", [
        ("random/1", "Yes, there is a dog."),  # TP
        ("random/2", "No."),  # TN
        ("random/3", "NO"),  # read as yes -> TP
        # random/4 (label no) missing -> counted as the wrong answer, yes -> FP
        ("popular/1", "There is not a dog."),  # FN
        ("popular/2", "no"),  # TN
        ("adversarial/1", "Yes"),
        ("adversarial/2", "No"),
    ])
    s = task.score(path)
    # random: TP 2, FP 1, TN 1, FN 0 -> precision 2/3, recall 1, F1 0.8, accuracy 3/4, yes 3/4
    assert s["random"] == pytest.approx({"accuracy": 75.0, "precision": 200 / 3, "recall": 100.0, "f1": 80.0,
                                         "yes_ratio": 75.0})
    # popular: TP 0 FP 0 TN 1 FN 1 -> precision and recall 0 (no division error), accuracy 1/2
    assert s["popular"] == pytest.approx({"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                          "yes_ratio": 0.0})
    assert s["adversarial"]["f1"] == pytest.approx(100.0)
    assert s["f1"] == pytest.approx((80 + 0 + 100) / 3)
    assert s["meta"]["missing"] == 1


def test_pope_bad_label_names_file_and_line(tmp_path):
    root = make_pope(tmp_path)
    with open(root / "coco_pope_popular.json", "a") as f:
        f.write(json.dumps({"question_id": 9, "image": "x.jpg", "text": "?", "label": "maybe"}) + "\n")
    with pytest.raises(EvalDataError, match=r"coco_pope_popular\.json:3: label must be"):
        build_task("pope", root).docs()
    (root / "coco_pope_popular.json").write_text('{"question_id": 1, "image": "x.jpg"\n')
    with pytest.raises(EvalDataError, match=r"coco_pope_popular\.json:1: expected a JSON object"):
        build_task("pope", root).docs()


def test_missing_images_are_listed(tmp_path):
    root = make_pope(tmp_path)
    (root / "images" / "COCO_val2014_000000000003.jpg").unlink()
    task = build_task("pope", root)
    missing = task.missing_images()
    assert len(missing) == 1 and "COCO_val2014_000000000003.jpg" in missing[0] and "random/3" in missing[0]


# ---- GQA ---------------------------------------------------------------------------------------------
def test_gqa_exact_match_after_rstrip_and_lower(tmp_path):
    qs = {
        "201307251": {"imageId": "n1", "question": "Is it sunny?", "answer": "yes",
                      "types": {"structural": "verify", "semantic": "attr"}},
        "201640614": {"imageId": "n1", "question": "Who is it?", "answer": "dog",
                      "types": {"structural": "query", "semantic": "obj"}},
        "202225914": {"imageId": "n2", "question": "How many?", "answer": "2",
                      "types": {"structural": "query", "semantic": "attr"}},
        "20899289": {"imageId": "n2", "question": "Where?", "answer": "left",
                     "types": {"structural": "query", "semantic": "rel"}},
        "20899290": {"imageId": "n2", "question": "What?", "answer": "cat",
                     "types": {"structural": "query", "semantic": "obj"}},
    }
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(qs))
    task = build_task("gqa", tmp_path)
    assert task.docs()[0].images == [tmp_path / "images" / "n1.jpg"]
    s = task.score({
        "201307251": "Yes.",  # right
        "201640614": "The dog..",  # "the dog": articles are not removed -> wrong
        "202225914": "two",  # no number normalisation -> wrong
        "20899289": "Left",  # right
        "20899290": "",  # wrong
    })
    assert s["accuracy"] == pytest.approx(40.0)
    assert s["structural"] == pytest.approx({"query": 25.0, "verify": 100.0})
    assert s["semantic"]["attr"] == pytest.approx(50.0)
    with pytest.raises(EvalDataError, match="found: testdev_balanced_questions.json"):
        build_task("gqa", tmp_path, split="val_balanced").docs()


# ---- VQAv2 -------------------------------------------------------------------------------------------
def official_vqa_accuracy(res_ans, gt_answers):
    """GT-Vision-Lab's vqaEval.py loop, written out literally for comparison."""
    gts = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(gt_answers)]
    res = res_ans.replace("\n", " ").replace("\t", " ").strip()
    res = process_digit_article(process_punctuation(res))
    if len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = process_punctuation(g["answer"])
    accs = []
    for g in gts:
        others = [x for x in gts if x != g]
        accs.append(min(1, len([x for x in others if x["answer"] == res]) / 3))
    return sum(accs) / len(accs)


def test_evalai_processor():
    assert evalai_answer("Two") == "2"
    assert evalai_answer("two dogs.") == "2 dogs"
    assert evalai_answer("The dog") == "dog"
    assert evalai_answer("an apple!") == "apple"
    assert evalai_answer("None") == "0"
    assert evalai_answer("dont know") == "don't know"
    assert evalai_answer("1,000") == "1000"
    assert evalai_answer("3.5") == "3.5"  # a period between digits stays
    assert evalai_answer("Yes.\n") == "yes"
    assert evalai_answer("") == ""


def test_vqa_accuracy_matches_the_official_loop():
    rng = random.Random(0)
    pool = ["2", "two", "yes", "no", "the dog", "dog", "red", "Red.", "1,000", "1000", "a cat", "cat", "hot-dog",
            "hot dog", "t-shirt", "don't know", "dont know"]
    for _ in range(300):
        gts = [rng.choice(pool) for _ in range(10)]
        pred = evalai_answer(rng.choice(pool))
        assert vqa_accuracy(pred, gts) == pytest.approx(official_vqa_accuracy(pred, gts))


def make_vqav2(root, split="val2014", with_annotations=True):
    questions = [
        {"question_id": 1001, "image_id": 42, "question": "How many dogs?"},
        {"question_id": 1002, "image_id": 42, "question": "Is it sunny?"},
        {"question_id": 1003, "image_id": 43, "question": "What animal?"},
        {"question_id": 1004, "image_id": 43, "question": "What colour?"},
        {"question_id": 1005, "image_id": 43, "question": "Where?"},
    ]
    answers = {1001: ["2"] * 10, 1002: ["yes"] * 3 + ["no"] * 7, 1003: ["dog"] * 2 + ["puppy"] * 8,
               1004: ["red"] * 10, 1005: ["park"] * 10}
    types = {1001: "number", 1002: "yes/no", 1003: "other", 1004: "other", 1005: "other"}
    root.mkdir(parents=True, exist_ok=True)
    (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": questions}))
    if with_annotations:
        anns = [{"question_id": q, "image_id": 0, "answer_type": types[q], "question_type": "what",
                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(v)]}
                for q, v in answers.items()]
        (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": anns}))
    img_split = "test2015" if split == "test-dev2015" else split
    (root / "images").mkdir(exist_ok=True)
    for image_id in (42, 43):
        (root / "images" / f"COCO_{img_split}_{image_id:012d}.jpg").write_bytes(png())
    return root


def test_vqav2_accuracy(tmp_path):
    task = build_task("vqav2", make_vqav2(tmp_path))
    assert task.split_name == "val2014"
    assert task.docs()[0].question_id == 1001
    assert task.missing_images() == []
    assert len(task.load_images(task.docs()[0])) == 1
    s = task.score({
        1001: "two",  # -> "2"; ten humans agree -> 1
        "1002": "Yes.",  # -> "yes": 3 humans; leave-one-out (3 * 2/3 + 7 * 1) / 10 = 0.9
        1003: "a dog",  # -> "dog": 2 humans; (2 * 1/3 + 8 * 2/3) / 10 = 0.6
        1004: "",  # 0
        # 1005 missing -> 0
    })
    assert s["accuracy"] == pytest.approx(100 * (1 + 0.9 + 0.6) / 5)
    assert s["answer_types"] == pytest.approx({"number": 100.0, "yes/no": 90.0, "other": 100 * 0.6 / 3})
    assert s["meta"]["missing"] == 1


def test_vqav2_test_dev_writes_submission_for_all_test_questions(tmp_path):
    root = make_vqav2(tmp_path, split="test-dev2015", with_annotations=False)
    full = [{"question_id": q, "image_id": 42, "question": "?"} for q in (1001, 1002, 1003, 1004, 1005, 9999)]
    (root / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps({"questions": full}))
    task = build_task("vqav2", root)
    assert task.split_name == "test-dev2015"  # preferred over test2015 when both are there
    assert task.missing_images() == []  # test-dev questions use COCO_test2015_* images
    s = task.score({1001: "Two dogs.", 1002: "yes"}, out_dir=tmp_path / "out")
    sub = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert [r["question_id"] for r in sub] == [1001, 1002, 1003, 1004, 1005, 9999]
    assert sub[0]["answer"] == "2 dogs" and sub[1]["answer"] == "yes" and sub[5]["answer"] == ""
    assert "accuracy" not in s and s["submission"]


# ---- ScienceQA -----------------------------------------------------------------------------------------
def test_sqa_reading_rule():
    assert sqa_read("B") == "B"
    assert sqa_read("B. a dog") == "B"
    assert sqa_read("The answer is C.") == "C"
    assert sqa_read("(C)") is None
    assert sqa_read("b") is None  # case-sensitive
    assert sqa_read("B.") is None  # needs "B. " (a space after the period)
    assert sqa_read("The answer is B") is None  # the regex needs a character after the letter
    assert sqa_read("The answer is A. The answer is B.") is None  # two matches
    assert sqa_read("") is None


def make_sqa(root):
    problems = {
        "1": {"question": "Which animal?", "choices": ["cat", "dog", "bird"], "answer": 1, "hint": "Look.",
              "image": "image.png", "subject": "natural science", "split": "test"},
        "2": {"question": "Which word?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
              "subject": "language science", "split": "test"},
        "3": {"question": "Which state?", "choices": ["x", "y", "z"], "answer": 2, "hint": "",
              "image": "image.png", "subject": "social science", "split": "test"},
        "4": {"question": "Which?", "choices": ["p", "q", "r"], "answer": 0, "hint": "",
              "image": "image.png", "subject": "social science", "split": "test"},
        "5": {"question": "Train?", "choices": ["p", "q"], "answer": 0, "hint": "", "image": None,
              "subject": "social science", "split": "train"},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["5"], "test": ["1", "2", "3", "4"]}))
    for pid in ("1", "3", "4"):
        (root / "images" / "test" / pid).mkdir(parents=True)
        (root / "images" / "test" / pid / "image.png").write_bytes(png())
    return root


def test_sqa_prompt_and_scores(tmp_path):
    task = build_task("sqa", make_sqa(tmp_path))
    docs = {d.question_id: d for d in task.docs()}
    assert set(docs) == {"1", "2", "3", "4"}  # only the test split
    assert docs["1"].prompt == ("<image>\nContext: Look.\nWhich animal?\nA. cat\nB. dog\nC. bird\n"
                                "Answer with the option's letter from the given choices directly.")
    assert docs["2"].prompt == "Which word?\nA. a\nB. b\nAnswer with the option's letter from the given choices directly."
    assert docs["2"].images == [] and task.missing_images() == []
    s = task.score({"1": "B. dog", "2": "The answer is A.", "3": "(C)", "4": "D"})
    # right: 1 and 2; 3 unreadable; 4: "D" is beyond three choices -> wrong
    assert s["accuracy"] == pytest.approx(50.0)
    assert s["img_accuracy"] == pytest.approx(100 / 3)  # questions 1, 3, 4 have an image
    img_only = build_task("sqa", tmp_path, subset="img")
    assert [d.question_id for d in img_only.docs()] == ["1", "3", "4"]


# ---- SEED --------------------------------------------------------------------------------------------
def make_seed(root):
    qs = [
        {"question_id": "101", "question": "What is it?", "choice_a": "cat", "choice_b": "dog", "choice_c": "cow",
         "choice_d": "pig", "answer": "B", "data_type": "image", "data_id": "1454426_2591111986.jpg",
         "question_type_id": 1},
        {"question_id": "102", "question": "Colour?", "choice_a": "red", "choice_b": "blue", "choice_c": "green",
         "choice_d": "black", "answer": "B", "data_type": "image", "data_id": "1454426_2591111986.jpg",
         "question_type_id": 2},
        {"question_id": "103", "question": "Count?", "choice_a": "1", "choice_b": "2", "choice_c": "3",
         "choice_d": "4", "answer": "B", "data_type": "image", "data_id": "1454426_2591111986.jpg",
         "question_type_id": 2},
        {"question_id": "v7", "question": "Action?", "choice_a": "run", "choice_b": "sit", "choice_c": "jump",
         "choice_d": "swim", "answer": "A", "data_type": "video", "data_id": "v_abc.mp4", "question_type_id": 10},
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "SEED-Bench.json").write_text(json.dumps({"questions": qs, "question_type": {
        "Scene Understanding": 1, "Instance Attributes": 2, "Action Recognition": 10}}))
    (root / "images").mkdir()
    (root / "images" / "1454426_2591111986.jpg").write_bytes(png())
    (root / "frames").mkdir()
    (root / "frames" / "v7.png").write_bytes(png())
    return root


def test_seed_official_rule_and_named_options(tmp_path):
    root = make_seed(tmp_path)
    task = build_task("seed", root)
    d = task.docs()[0]
    assert d.prompt == ("<image>\nWhat is it?\nA. cat\nB. dog\nC. cow\nD. pig\n"
                        "Answer with the option's letter from the given choices directly.")
    assert task.docs()[3].images == [root / "frames" / "v7.png"]
    answers = {"101": " B\n", "102": "B.", "103": "(B)", "v7": "A"}
    s = task.score(answers, out_dir=tmp_path / "out")
    # official: the whole stripped output must be the letter: 101 and v7 right
    assert s["image_accuracy"] == pytest.approx(100 / 3)
    assert s["video_accuracy"] == pytest.approx(100.0)
    assert s["accuracy"] == pytest.approx(50.0)
    assert s["types"]["Instance Attributes"] == pytest.approx(0.0)
    up = [json.loads(x) for x in (tmp_path / "out" / "submission.jsonl").read_text().splitlines()]
    assert up[0] == {"question_id": "101", "prediction": "B"}
    assert build_task("seed", root, answer_rule="lmms-eval").score(answers)["image_accuracy"] == pytest.approx(200 / 3)
    assert build_task("seed", root, answer_rule="vlmevalkit").score(answers)["image_accuracy"] == pytest.approx(100.0)
    assert [d.question_id for d in build_task("seed", root, data_types="image").docs()] == ["101", "102", "103"]
    (root / "frames" / "v7.png").unlink()
    assert any("frames/<question_id>.png" in m for m in build_task("seed", root).missing_images())
    (root / "images").rename(root / "SEED-Bench-image")  # the official download's folder name
    assert build_task("seed", root, data_types="image").missing_images() == []
    with pytest.raises(EvalDataError, match="answer_rule"):
        build_task("seed", root, answer_rule="loose")


# ---- MMBench -----------------------------------------------------------------------------------------
def test_mmbench_exact_matching():
    ch = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    assert can_infer("B", ch) == "B"
    assert can_infer("The answer is B.", ch) == "B"
    assert can_infer("(C)", ch) == "C"
    assert can_infer("B. dog", ch) == "B"
    assert can_infer("It is a dog", ch) == "B"  # option text
    assert can_infer("A or B", ch) is None  # two letters
    assert can_infer("a cat or a dog", ch) is None  # two option texts ("a" is lowercase, not a letter)
    assert can_infer("", ch) is None
    assert can_infer("Cannot determine the answer", ch) == "Z"  # refusal -> wrong


def mmbench_tsv(root, rows, name="MMBench_DEV_EN.tsv", with_answer=True):
    cols = ["index", "question", "hint", "A", "B", "C", "D"] + (["answer"] if with_answer else []) + \
        ["category", "l2-category", "image"]
    lines = ["\t".join(cols)]
    for r in rows:
        lines.append("\t".join(str(r.get(c, "")) for c in cols))
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def mmbench_rows():
    img = base64.b64encode(png()).decode()
    # question 7: four options, four circular copies; copies 2 and 3 point at row 7 for the image
    q7 = [
        {"index": 7, "question": "What animal?", "hint": "A farm.", "A": "cat", "B": "dog", "C": "cow", "D": "pig",
         "answer": "B", "category": "attribute", "l2-category": "FP-S", "image": img},
        {"index": 1000007, "question": "What animal?", "hint": "A farm.", "A": "dog", "B": "cow", "C": "pig",
         "D": "cat", "answer": "A", "category": "attribute", "l2-category": "FP-S", "image": img},
        {"index": 2000007, "question": "What animal?", "hint": "A farm.", "A": "cow", "B": "pig", "C": "cat",
         "D": "dog", "answer": "D", "category": "attribute", "l2-category": "FP-S", "image": "7"},
        {"index": 3000007, "question": "What animal?", "hint": "A farm.", "A": "pig", "B": "cat", "C": "dog",
         "D": "cow", "answer": "C", "category": "attribute", "l2-category": "FP-S", "image": "7"},
    ]
    # question 8: two options (C, D empty), no hint, two copies
    q8 = [
        {"index": 8, "question": "Is it day?", "hint": "", "A": "yes", "B": "no", "answer": "A",
         "category": "scene", "l2-category": "CP", "image": img},
        {"index": 1000008, "question": "Is it day?", "hint": "", "A": "no", "B": "yes", "answer": "B",
         "category": "scene", "l2-category": "CP", "image": "8"},
    ]
    return q7 + q8


def test_mmbench_circular_scoring(tmp_path):
    mmbench_tsv(tmp_path, mmbench_rows())
    task = build_task("mmbench", tmp_path)
    docs = {d.question_id: d for d in task.docs()}
    assert docs[7].prompt == ("<image>\nA farm.\nWhat animal?\nA. cat\nB. dog\nC. cow\nD. pig\n"
                              "Answer with the option's letter from the given choices directly.")
    assert docs[8].prompt == ("<image>\nIs it day?\nA. yes\nB. no\n"
                              "Answer with the option's letter from the given choices directly.")
    assert task.load_images(docs[3000007])[0].size == (8, 8)  # resolved through row 7
    assert task.missing_images() == []
    s = task.score({
        7: "B", 1000007: "The answer is A.", 2000007: "dog", 3000007: "(C)",  # all four right
        8: "A", 1000008: "A",  # second copy wrong -> question 8 fails circularly
    }, out_dir=tmp_path / "out")
    assert s["single_accuracy"] == pytest.approx(500 / 6)
    assert s["accuracy"] == pytest.approx(50.0)
    assert s["categories"] == pytest.approx({"attribute": 100.0, "scene": 0.0})
    assert s["l2_categories"] == pytest.approx({"FP-S": 100.0, "CP": 0.0})
    import pandas as pd

    sub = pd.read_excel(tmp_path / "out" / "submission.xlsx")
    assert list(sub.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer"]
    assert sub.loc[sub["index"] == 2000007, "prediction"].item() == "dog"


def test_mmbench_test_split_and_cn(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in mmbench_rows()]
    mmbench_tsv(tmp_path, rows, name="MMBench_TEST_CN.tsv", with_answer=False)
    task = build_task("mmbench", tmp_path)
    assert task.lang == "cn" and task.docs()[0].prompt.endswith("\n请直接回答选项字母。")
    s = task.score({7: "B"}, out_dir=tmp_path / "out")
    assert "accuracy" not in s and (tmp_path / "out" / "submission.xlsx").is_file()


def test_mmbench_bad_rows(tmp_path):
    rows = mmbench_rows()
    rows[1]["answer"] = "E"
    mmbench_tsv(tmp_path, rows)
    with pytest.raises(EvalDataError, match=r"MMBench_DEV_EN\.tsv:3 \(index 1000007\): answer 'E'"):
        build_task("mmbench", tmp_path).docs()
    path = mmbench_tsv(tmp_path, mmbench_rows())
    text = path.read_text().splitlines()
    text[2] += "\textra\tcells"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(EvalDataError, match=r"MMBench_DEV_EN\.tsv: malformed TSV .*line 3"):
        build_task("mmbench", tmp_path).docs()
    path.write_text("index\tquestion\tA\tB\n1\tq\ta\tb\n")
    with pytest.raises(EvalDataError, match=r"missing column\(s\) \['image'\]"):
        build_task("mmbench", tmp_path).docs()


# ---- MMMU --------------------------------------------------------------------------------------------
def test_mmmu_parsers():
    rng = random.Random(42)
    ch = ["A", "B", "C", "D"]
    opts = {"A": "12 cm", "B": "15 cm", "C": "20 cm", "D": "25 cm"}
    assert parse_multi_choice_response("(B)", ch, opts, rng) == "B"
    assert parse_multi_choice_response("B", ch, opts, rng) == "B"
    assert parse_multi_choice_response("The answer is C.", ch, opts, rng) == "C"
    assert parse_multi_choice_response("Not (A) but (D)", ch, opts, rng) == "D"  # last occurrence wins
    assert parse_multi_choice_response("I believe the length is 20 cm in total", ch, opts, rng) == "C"
    assert parse_multi_choice_response("20 cm", ch, opts, rng) in ch  # <= 5 words: no text match -> random
    assert 3.5 in parse_open_response("The answer is 3.50")
    assert 1000.0 in parse_open_response("It costs 1,000 dollars")
    assert "paris" in parse_open_response("Paris")


def test_mmmu_parquet_scoring_and_seeded_fallback(tmp_path):
    img = Image.new("RGB", (8, 8), (0, 0, 255))
    rows = [
        {"id": "validation_Art_1", "subject": "Art", "question": "Which style is <image 1>?",
         "options": ["Baroque", "Gothic", "Modern"], "answer": "B", "question_type": "multiple-choice",
         "image_1": img},
        {"id": "validation_Art_2", "subject": "Art", "question": "Compare <image 1> and <image 2>.",
         "options": ["same", "different"], "answer": "A", "question_type": "multiple-choice",
         "image_1": img, "image_2": img},
        {"id": "validation_Math_1", "subject": "Math", "question": "What is 7/2?", "options": [],
         "answer": "3.5", "question_type": "open", "image_1": img},
        {"id": "validation_Math_2", "subject": "Math", "question": "Name the city.", "options": [],
         "answer": "['Paris', 'paris city']", "question_type": "open", "image_1": img},
        {"id": "validation_Math_3", "subject": "Math", "question": "Pick", "options": ["1", "2", "3", "4"],
         "answer": "D", "question_type": "multiple-choice", "image_1": img},
    ]
    write_mmmu(tmp_path / "MMMU", rows)
    task = build_task("mmmu", tmp_path)  # the folder holding MMMU/ works too
    docs = {d.question_id: d for d in task.docs()}
    assert docs["validation_Art_1"].prompt == (
        "<image>\nWhich style is <image 1>?\n(A) Baroque\n(B) Gothic\n(C) Modern\n\n"
        "Answer with the option's letter from the given choices directly.")
    assert docs["validation_Math_1"].prompt == "<image>\nWhat is 7/2?\nAnswer the question using a single word or phrase."
    assert len(docs["validation_Art_2"].images) == 1  # default: image_1 only, as the original
    multi = {d.question_id: d for d in build_task("mmmu", tmp_path, images="all").docs()}
    assert multi["validation_Art_2"].prompt.startswith("Compare <image> and <image>.")
    assert len(multi["validation_Art_2"].images) == 2
    assert len(build_task("mmmu", tmp_path, images="all").load_images(multi["validation_Art_2"])) == 2
    answers = {
        "validation_Art_1": "(B) Gothic",  # right
        "validation_Art_2": "hmm",  # no candidate -> random draw 1 of Random(42)
        "validation_Math_1": "The answer is 3.50",  # 3.5 == 3.5 -> right
        "validation_Math_2": "It is Paris.",  # gold list, "paris" in "paris" -> right
        "validation_Math_3": "??",  # random draw 2
    }
    rng = random.Random(42)
    draw1 = rng.choice(["A", "B"])
    draw2 = rng.choice(["A", "B", "C", "D"])
    s = task.score(answers)
    right = 3 + (draw1 == "A") + (draw2 == "D")
    assert s["accuracy"] == pytest.approx(100 * right / 5)
    assert s["subjects"]["Math"] == pytest.approx(100 * (2 + (draw2 == "D")) / 3)
    assert set(s["disciplines"]) == {"Art and Design", "Science"}
    assert task.score(answers) == s  # the fallback is seeded: same answers, same score


def test_mmmu_test_split_writes_submission_and_bad_column(tmp_path):
    rows = [{"id": "test_Art_1", "subject": "Art", "question": "Q?", "options": ["a", "b"], "answer": "?",
             "question_type": "multiple-choice", "image_1": Image.new("RGB", (4, 4))}]
    write_mmmu(tmp_path, rows, split="test")
    task = build_task("mmmu", tmp_path, split="test")
    s = task.score({"test_Art_1": "(B)"}, out_dir=tmp_path / "out")
    assert json.loads((tmp_path / "out" / "submission.json").read_text()) == {"test_Art_1": "B"}
    assert "accuracy" not in s
    import pyarrow.parquet as pq

    path = next(tmp_path.glob("Art/test-*.parquet"))
    t = pq.read_table(path).drop(["question_type"])
    pq.write_table(t, path)
    with pytest.raises(EvalDataError, match=r"test-00000-of-00001\.parquet: missing column\(s\) \['question_type'\]"):
        build_task("mmmu", tmp_path, split="test").docs()
    with pytest.raises(EvalDataError, match="splits found: test"):
        build_task("mmmu", tmp_path).docs()


# ---- answers files -----------------------------------------------------------------------------------
def test_answers_file_errors_name_the_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": \n')
    with pytest.raises(EvalDataError, match=r"a\.jsonl:2: not valid JSON"):
        read_answers(p)
    p.write_text('{"question_id": 1}\n')
    with pytest.raises(EvalDataError, match=r"a\.jsonl:1: .*has no 'text'"):
        read_answers(p)
    p.write_text('{"question_id": 1, "text": "a"}\n\n{"question_id": 1, "text": "b"}\n')
    af = read_answers(p)
    assert af.texts == {"1": "b"} and af.duplicates == 1 and af.lines["1"] == 3
    with pytest.raises(EvalDataError, match="answers file not found"):
        read_answers(tmp_path / "nope.jsonl")


def test_unknown_option_is_an_error(tmp_path):
    make_pope(tmp_path)
    with pytest.raises(EvalDataError, match="unknown option"):
        build_task("pope", tmp_path, lenient=True)


# ---- rules found by reading the official scripts literally ---------------------------------------------
def test_vqav2_official_normalises_only_the_prediction_fully():
    # GT-Vision-Lab vqaEval.py: human answers get only the punctuation step (and only when they
    # differ); digits and articles are normalised on the prediction side alone.
    assert vqa_accuracy(evalai_answer("two"), ["2"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy(evalai_answer("two"), ["two"] * 10) == 0.0  # prediction "2" vs unprocessed "two"
    # three humans wrote "the dog": their article stays, the prediction loses it -> no match
    assert vqa_accuracy(evalai_answer("The dog"), ["the dog"] * 3 + ["cat"] * 7) == 0.0
    # punctuation is processed on both sides when the humans differ: "hot-dog" -> "hot dog"
    assert vqa_accuracy(evalai_answer("hot dog"), ["hot-dog"] * 2 + ["bun"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy(evalai_answer(""), ["yes"] * 10) == 0.0


def test_mmbench_rotate_adds_circular_copies_to_a_legacy_tsv(tmp_path):
    # a legacy TSV: each question once; --option mmbench.circular=rotate asks every rotation too
    rows = [r for r in mmbench_rows() if r["index"] < 1_000_000]
    rows[1]["image"] = base64.b64encode(png()).decode()  # question 8 carries its own image here
    mmbench_tsv(tmp_path, rows, name="MMBench_DEV_EN_legacy.tsv")
    assert [d.question_id for d in build_task("mmbench", tmp_path).docs()] == [7, 8]
    task = build_task("mmbench", tmp_path, circular="rotate")
    docs = {d.question_id: d for d in task.docs()}
    assert list(docs) == [7, 1000007, 2000007, 3000007, 8, 1000008]
    # copy k shows original option k as A; the right answer ("dog", B) moves with it
    assert docs[1000007].prompt == ("<image>\nA farm.\nWhat animal?\nA. dog\nB. cow\nC. pig\nD. cat\n"
                                    "Answer with the option's letter from the given choices directly.")
    assert [docs[i].target for i in (7, 1000007, 2000007, 3000007)] == ["B", "A", "D", "C"]
    assert docs[1000008].target == "B" and docs[1000008].meta["choices"] == {"A": "no", "B": "yes"}
    assert task.load_images(docs[3000007])[0].size == (8, 8)  # the original row's image
    s = task.score({7: "B", 1000007: "A", 2000007: "D", 3000007: "A", 8: "A", 1000008: "B"},
                   out_dir=tmp_path / "out")
    assert s["accuracy"] == pytest.approx(50.0)  # question 7 fails on its last rotation
    assert s["single_accuracy"] == pytest.approx(500 / 6)
    import pandas as pd

    sub = pd.read_excel(tmp_path / "out" / "submission.xlsx")
    assert list(sub["index"]) == [7, 8]  # the upload holds the file's rows only
    with pytest.raises(EvalDataError, match="circular must be"):
        build_task("mmbench", tmp_path, circular="yes").docs()


def test_mmbench_submission_survives_control_characters(tmp_path):
    mmbench_tsv(tmp_path, mmbench_rows())
    task = build_task("mmbench", tmp_path)
    task.score({7: "B\x00\x1b", 8: "A"}, out_dir=tmp_path)  # a broken model's bytes; Excel forbids them
    import pandas as pd

    sub = pd.read_excel(tmp_path / "submission.xlsx")
    assert sub.loc[sub["index"] == 7, "prediction"].item() == "B"


# ---- the synthetic world's benchmark files, read by the same loaders --------------------------------
def perfect_answer(task, d) -> str:
    """What a perfect model answers, in each benchmark's own answer form."""
    if task.name == "mme":
        return d.target.capitalize()
    if task.name == "vqav2":
        from collections import Counter

        return Counter(d.target["answers"]).most_common(1)[0][0]
    if task.name == "mmmu" and isinstance(d.target, list):
        return d.target[0]
    return d.target


@pytest.fixture(scope="module")
def synthetic_bench(tmp_path_factory):
    from bunny.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, 40, seed=3, bench_size=24)
    return root / "bench"


def test_synthetic_benchmarks_load_and_perfect_answers_score_the_maximum(synthetic_bench, tmp_path):
    meta = json.loads((synthetic_bench / "meta.json").read_text())
    assert sorted(meta) == TASKS.names()
    for name in TASKS.names():
        task = build_task(name, synthetic_bench)  # the parent of <task>/ works
        docs = task.docs()
        assert len(docs) == meta[name].get("rows", meta[name]["questions"]), name
        assert task.missing_images() == [], name
        for d in docs[:3]:
            images = task.load_images(d)
            assert len(images) == d.prompt.count("<image>") and all(im.mode == "RGB" for im in images), name
        perfect = {d.question_id: perfect_answer(task, d) for d in docs}
        s = task.score(perfect, out_dir=tmp_path / name)
        for metric, spec in meta[name]["metrics"].items():
            assert get_value(s, metric) == pytest.approx(spec["max"]), (name, metric)
        wrong = task.score({}, out_dir=tmp_path / name)  # nothing answered: all wrong, all counted
        assert wrong["meta"]["missing"] == len(docs)
        assert get_value(wrong, meta[name]["headline"]) == 0.0, name
