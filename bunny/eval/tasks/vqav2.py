"""VQAv2: open short answers, ten human answers each; the paper reports test-dev (server-scored).

Layout: ``v2_OpenEnded_mscoco_<split>_questions.json`` and, for splits with public answers,
``v2_mscoco_<split>_annotations.json``; images in ``images/`` as ``COCO_<split>_<12-digit id>.jpg``
(test-dev questions use the test2015 images, ``COCO_test2015_...``; ``images/<split>/`` and
``<split>/`` folders as unzipped from COCO are accepted too). question_id: the int question_id.

Scoring: the prediction goes through the EvalAI answer processor (as the submission converter of
LLaVA/Bunny does), then the official ``vqaEval.py`` accuracy (GT-Vision-Lab/VQA): the prediction is
normalised again (punctuation, digits, articles, contractions), the human answers only have their
punctuation processed and only when the ten differ; each of the ten leave-one-out subsets scores
min(#matching humans / 3, 1); the question scores their mean. (Some copies of vqaEval.py also
normalise the human answers' digits and articles; the official one does not: docs/evaluation.md.)
A split without annotations (test-dev, test) writes ``submission.json`` for the EvalAI server:
every test2015 question when ``v2_OpenEnded_mscoco_test2015_questions.json`` is there (the server
wants all of them; unanswered ones get ""), else this split's questions.
"""

from __future__ import annotations

import functools
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from bunny.eval.tasks.base import IMAGE, SHORT_ANSWER, TASKS, Doc, EvalDataError, Task, pct, read_json_object

# ---- the EvalAI / official VQA answer normalisation ---------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]
# "(?!<=\d)" is the original's typo for a lookbehind; it is kept, since it defines the metric.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The original passes re.UNICODE (= 32) as the `count` argument of sub(): at most 32 periods go.
_PERIOD_COUNT = 32


@functools.lru_cache(maxsize=1 << 16)  # pure; answers repeat a lot ("yes", "2"), so scoring 200k is seconds
def process_punctuation(text: str) -> str:
    out = text
    comma_between_digits = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma_between_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


@functools.lru_cache(maxsize=1 << 16)
def process_digit_article(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = NUMBERS.get(w, w)
        if w not in ARTICLES:
            words.append(w)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def evalai_answer(text: str) -> str:
    """The EvalAI answer processor applied to a prediction before submission.

    >>> evalai_answer("Two dogs."), evalai_answer("The cat"), evalai_answer("It's 1,000!")
    ('2 dogs', 'cat', "it 's 1000")
    """
    t = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(t))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The official per-question accuracy (0..1): GT-Vision-Lab ``vqaEval.py``, literally.

    The prediction is normalised (punctuation, then digits/articles/contractions); the human
    answers only get the punctuation step, and only when the ten of them differ. Each human is
    left out in turn: min(#other humans matching / 3, 1), averaged over the ten.
    """
    res = _normalise_prediction(prediction)
    gts = human_answers if len(set(human_answers)) == 1 else [process_punctuation(a) for a in human_answers]
    n, m = len(gts), gts.count(res)
    if not n or not m:
        return 0.0
    # the m humans who gave `res` see m-1 matches among the others when left out, the n-m others m
    return (m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n


def _normalise_prediction(text: str) -> str:
    res = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(res))


@TASKS.register("vqav2")
class VQAv2(Task):
    name = "vqav2"
    paper_column = 4
    max_new_tokens = 128

    def _questions_files(self) -> dict[str, Path]:
        out = {}
        for p in self.data_dir.glob("v2_OpenEnded_mscoco_*_questions.json"):
            out[p.name[len("v2_OpenEnded_mscoco_"):-len("_questions.json")]] = p
        return out

    @property
    def split_name(self) -> str:
        if self.split:
            return self.split
        files = self._questions_files()
        if len(files) == 1:
            return next(iter(files))
        for preferred in ("test-dev2015", "val2014"):
            if preferred in files:
                return preferred
        if not files:
            raise EvalDataError(f"{self.data_dir}: no v2_OpenEnded_mscoco_<split>_questions.json found")
        raise EvalDataError(f"{self.data_dir}: several VQAv2 splits ({', '.join(sorted(files))}); pick one with --split")

    def _image_dirs(self, split: str) -> list[tuple[Path, str]]:
        img_splits = [split] + (["test2015"] if split == "test-dev2015" else [])
        dirs = []
        for s in img_splits:
            for d in (self.data_dir / "images", self.data_dir / "images" / s, self.data_dir / s):
                dirs.append((d, s))
        return dirs

    def _load(self) -> list[Doc]:
        split = self.split_name
        qpath = self.data_dir / f"v2_OpenEnded_mscoco_{split}_questions.json"
        if not qpath.is_file():
            raise EvalDataError(f"{qpath}: VQAv2 questions file not found")
        questions = read_json_object(qpath).get("questions")
        if not isinstance(questions, list):
            raise EvalDataError(f"{qpath}: expected a 'questions' list")
        apath = self.data_dir / f"v2_mscoco_{split}_annotations.json"
        targets: dict[int, dict] = {}
        if apath.is_file():
            anns = read_json_object(apath).get("annotations")
            if not isinstance(anns, list):
                raise EvalDataError(f"{apath}: expected an 'annotations' list")
            for i, a in enumerate(anns):
                try:
                    targets[int(a["question_id"])] = {"answers": [x["answer"] for x in a["answers"]],
                                                      "answer_type": a.get("answer_type")}
                except (KeyError, TypeError, ValueError) as exc:
                    raise EvalDataError(f"{apath}: annotation #{i}: expected question_id and answers ({exc})") from None
        dirs = self._image_dirs(split)
        docs = []
        for i, q in enumerate(questions):
            try:
                qid, image_id, text = int(q["question_id"]), int(q["image_id"]), q["question"]
            except (KeyError, TypeError, ValueError) as exc:
                raise EvalDataError(f"{qpath}: question #{i}: expected question_id, image_id, question ({exc})") from None
            if targets and qid not in targets:
                raise EvalDataError(f"{apath}: no annotation for question_id {qid} (question #{i} of {qpath.name})")
            docs.append(Doc(
                question_id=qid,
                prompt=f"{IMAGE}\n{text}\n{SHORT_ANSWER}",
                images=[_ImageRef(dirs, image_id)],
                target=targets.get(qid),
                meta={"answer_type": (targets.get(qid) or {}).get("answer_type")},
            ))
        return docs

    def load_images(self, doc: Doc) -> list[Any]:
        from bunny.data.images import load_image

        return [load_image(ref.resolve()) for ref in doc.images]

    def missing_images(self, docs=None) -> list[str]:
        out = []
        for d in self.docs() if docs is None else docs:
            for ref in d.images:
                if ref.find() is None:
                    out.append(f"{ref.candidates()[0]} (question {d.question_id})")
        return out

    def _score(self, docs: list[Doc], texts: dict[str, str]) -> dict[str, Any]:
        total = 0.0
        by_type: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for d in docs:
            text = texts.get(d.key)
            acc = 0.0
            if text is not None:
                acc = vqa_accuracy(evalai_answer(text), d.target["answers"])
            total += acc
            t = d.meta.get("answer_type")
            if t:
                by_type[t][0] += 1
                by_type[t][1] += acc
        out: dict[str, Any] = {"accuracy": pct(total, len(docs))}
        if by_type:
            out["answer_types"] = {t: pct(s, n) for t, (n, s) in sorted(by_type.items())}
        return out

    def write_submission(self, docs: list[Doc], texts: dict[str, str], out_dir: Path) -> list[Path]:
        if any(d.target is not None for d in docs):
            return []
        split = self.split_name
        ids: list[int] = [int(d.question_id) for d in docs]
        full = self.data_dir / "v2_OpenEnded_mscoco_test2015_questions.json"
        if split == "test-dev2015" and full.is_file():
            ids = [int(q["question_id"]) for q in read_json_object(full)["questions"]]
        rows = [{"question_id": i, "answer": evalai_answer(texts[str(i)]) if str(i) in texts else ""} for i in ids]
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "submission.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return [path]

    def published(self) -> dict[str, float]:
        return {"accuracy": 79.8} if self.split_name == "test-dev2015" else {}


class _ImageRef:
    """A COCO image found under one of several folder/prefix layouts (resolved on first use)."""

    __slots__ = ("dirs", "image_id", "_path")

    def __init__(self, dirs: list[tuple[Path, str]], image_id: int) -> None:
        self.dirs = dirs
        self.image_id = image_id
        self._path: Path | None = None

    def candidates(self) -> list[Path]:
        return [d / f"COCO_{s}_{self.image_id:012d}.jpg" for d, s in self.dirs]

    def find(self) -> Path | None:
        if self._path is None:
            self._path = next((p for p in self.candidates() if p.is_file()), None)
        return self._path

    def resolve(self) -> Path:
        p = self.find()
        if p is None:
            from bunny.data.images import ImageError

            raise ImageError(f"{self.candidates()[0]}: image not found (image_id {self.image_id})")
        return p

    def __repr__(self) -> str:
        return f"_ImageRef({self.candidates()[0]})"
