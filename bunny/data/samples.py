"""The LLaVA training-data schema (JSON list or JSONL) and its validation.

A sample::

    {"id": "000123", "image": "coco/000123.jpg",            # optional; a list for several images
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Why validate everything before training: the original LLaVA/Bunny loaders find a bad sample in
the middle of an epoch (a missing file kills a data-loader worker hours in) or, worse, never: a
sample whose ``<image>`` count does not match its images, or whose roles are out of order, is
silently mis-trained. Here every problem of every sample is collected in one pass and reported at
once, each naming the file, the sample's index (JSON) or line (JSONL), and the field. The policy
``on_bad_sample`` then either stops (``error``) or drops exactly the reported samples and says how
many (``skip``); nothing is dropped without a line in the log.

Checks: the JSON structure; roles (an optional ``system`` turn first, then ``human``/``gpt``
alternating, starting with ``human`` and ending with ``gpt``); at least one assistant turn; no
empty text; the ``<image>`` count equals the number of images (and ``<image>`` only in user
turns); each image exists and decodes (``image_check``); and, given a tokenizer-backed length
function, the sample fits ``model_max_length`` after the image tokens are expanded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bunny.data.templates import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
SYSTEM_ROLES = ("system",)
ImageCheck = Literal["decode", "open", "exists", "none"]


@dataclass
class Sample:
    """One conversation as read from a data file (``index``: position in a JSON list, or 1-based
    line number in a JSONL file; ``where`` renders it for messages)."""

    id: str
    conversations: list[dict[str, Any]]
    images: list[str]
    source: str
    index: int
    jsonl: bool = False

    @property
    def where(self) -> str:
        return f"{self.source}:{self.index}" if self.jsonl else f"{self.source}[{self.index}]"

    @property
    def has_image(self) -> bool:
        return bool(self.images)


@dataclass(frozen=True)
class SampleIssue:
    """One problem with one sample: file, index (or line), the field at fault and what is wrong."""

    source: str
    index: int
    field: str
    message: str
    sample_id: str | None = None
    jsonl: bool = False

    def __str__(self) -> str:
        where = f"{self.source}:{self.index}" if self.jsonl else f"{self.source}[{self.index}]"
        sid = f" (id {self.sample_id})" if self.sample_id is not None else ""
        return f"{where}{sid} {self.field}: {self.message}"

    @property
    def key(self) -> tuple[str, int]:
        return (self.source, self.index)


class DataValidationError(ValueError):
    """Training data failed validation; ``issues`` holds every problem found."""

    def __init__(self, issues: Sequence[SampleIssue], n_samples: int, max_listed: int = 50,
                 whole_file: bool = False):
        self.issues = list(issues)
        bad = len({i.key for i in self.issues})
        lines = [f"{i.source}: {i.message}" if whole_file else str(i) for i in self.issues[:max_listed]]
        more = len(self.issues) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more")
        head = (f"{len(self.issues)} problem(s) reading the data (a file that cannot be read as a whole cannot "
                "be skipped sample by sample; fix it)" if whole_file else
                f"{len(self.issues)} problem(s) in {bad} of {n_samples} sample(s) "
                "(set on_bad_sample: skip to train without them)")
        super().__init__(head + ":\n  " + "\n  ".join(lines))


def _file_error(path: Path, line: int, fld: str, msg: str) -> DataValidationError:
    """A problem with a whole data file, as the same named report (exit 2) as a sample's."""
    return DataValidationError([_issue(str(path), line, fld, msg, jsonl=True)], 0, whole_file=True)


# ---------------------------------------------------------------------------------------------
# reading


def _issue(source: str, index: int, fld: str, msg: str, sid: Any = None, jsonl: bool = False) -> SampleIssue:
    return SampleIssue(str(source), index, fld, msg, None if sid is None else str(sid), jsonl)


def _to_sample(obj: Any, source: str, index: int, jsonl: bool, issues: list[SampleIssue]) -> Sample | None:
    """Structural parse of one record; structural problems go to ``issues`` (and return None)."""
    if not isinstance(obj, dict):
        issues.append(_issue(source, index, "sample", f"expected a JSON object, got {type(obj).__name__}",
                             jsonl=jsonl))
        return None
    sid = obj.get("id", f"{Path(source).name}#{index}")
    convs = obj.get("conversations")
    if convs is None:
        issues.append(_issue(source, index, "conversations", "missing", sid, jsonl))
        return None
    if not isinstance(convs, list):
        issues.append(_issue(source, index, "conversations", f"expected a list, got {type(convs).__name__}",
                             sid, jsonl))
        return None
    image = obj.get("image")
    if image is None:
        images: list[str] = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(x, str) for x in image):
        images = list(image)
    else:
        issues.append(_issue(source, index, "image", f"expected a path or a list of paths, got {image!r}"[:200],
                             sid, jsonl))
        return None
    return Sample(id=str(sid), conversations=convs, images=images, source=str(source), index=index, jsonl=jsonl)


def text_line(path: Path, byte: int) -> int:
    """The 1-based line of byte offset ``byte`` in ``path``."""
    with open(path, "rb") as f:
        return f.read(byte).count(b"\n") + 1


def read_samples(paths: str | Path | Iterable[str | Path]) -> tuple[list[Sample], list[SampleIssue]]:
    """Read LLaVA JSON lists or JSONL files. Returns the parsed samples and the structural issues
    (records that are not samples at all), so a caller can report them with the other checks."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    samples: list[Sample] = []
    issues: list[SampleIssue] = []
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"data file not found: {path}") from None
        except UnicodeDecodeError as exc:
            line = text_line(path, exc.start)
            raise _file_error(path, line, "encoding",
                              f"not UTF-8 text ({exc.reason} at byte {exc.start}, line {line})") from None
        stripped = text.lstrip()
        if path.suffix == ".jsonl" or (stripped and not stripped.startswith("[")):
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    issues.append(_issue(path, lineno, "json", f"not valid JSON: {exc.msg} (column {exc.colno})",
                                         jsonl=True))
                    continue
                s = _to_sample(obj, str(path), lineno, True, issues)
                if s is not None:
                    samples.append(s)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _file_error(path, exc.lineno, "json",
                                  f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
            if not isinstance(data, list):
                raise _file_error(path, 1, "json", f"expected a JSON list of samples, got {type(data).__name__}")
            for i, obj in enumerate(data):
                s = _to_sample(obj, str(path), i, False, issues)
                if s is not None:
                    samples.append(s)
    return samples, issues


# ---------------------------------------------------------------------------------------------
# checks


def check_conversation(sample: Sample) -> list[SampleIssue]:
    """Roles, assistant turn, empty text, ``<image>`` placement and count."""
    out: list[SampleIssue] = []

    def add(fld: str, msg: str) -> None:
        out.append(_issue(sample.source, sample.index, fld, msg, sample.id, sample.jsonl))

    convs = sample.conversations
    if not convs:
        add("conversations", "empty")
        return out
    n_placeholders = 0
    expected = "user"
    n_assistant = 0
    for t, turn in enumerate(convs):
        fld = f"conversations[{t}]"
        if not isinstance(turn, dict):
            add(fld, f"expected an object with 'from' and 'value', got {type(turn).__name__}")
            return out
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            add(f"{fld}.value", f"expected a string, got {type(value).__name__}")
            continue
        if role in SYSTEM_ROLES:
            if t != 0:
                add(f"{fld}.from", "a system turn is only allowed first")
            elif not value.strip():
                add(f"{fld}.value", "empty system text")
            continue
        if role in USER_ROLES:
            kind = "user"
        elif role in ASSISTANT_ROLES:
            kind = "assistant"
        else:
            add(f"{fld}.from", f"unknown role {role!r}; expected human/gpt (or user/assistant, system first)")
            continue
        if kind != expected:
            add(f"{fld}.from", f"roles out of order: expected a {'human' if expected == 'user' else 'gpt'} turn, "
                               f"got {role!r}")
        expected = "assistant" if kind == "user" else "user"
        count = value.count(IMAGE_PLACEHOLDER)
        if kind == "assistant":
            n_assistant += 1
            if count:
                add(f"{fld}.value", f"{IMAGE_PLACEHOLDER} in an assistant reply")
            if not value.strip():
                add(f"{fld}.value", "empty assistant reply")
        else:
            n_placeholders += count
            if not value.replace(IMAGE_PLACEHOLDER, "").strip() and not count:
                add(f"{fld}.value", "empty user text")
    if n_assistant == 0:
        add("conversations", "no assistant (gpt) turn: nothing to learn")
    elif expected == "assistant":
        add(f"conversations[{len(convs) - 1}]", "ends with a user turn that has no reply")
    if n_placeholders != len(sample.images):
        add("image", f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the text but "
                     f"{len(sample.images)} image(s)")
    return out


def resolve_image(image_folder: str | Path | None, rel: str) -> Path:
    return Path(image_folder) / rel if image_folder is not None else Path(rel)


def check_image_paths(samples: Sequence[Sample], image_folder: str | Path | None) -> list[SampleIssue]:
    """Image paths must stay inside ``image_folder``: an absolute path or a ``..`` that climbs out of
    it reads files the data set does not own (a typo, or data from an untrusted source). Symbolic
    links inside the folder are followed as the user set them up (the path text is checked, not
    where its links point). No folder set: paths are the user's own, relative to the working folder."""
    if image_folder is None:
        return []
    root = os.path.normpath(os.path.abspath(image_folder))
    out = []
    for s in samples:
        for k, rel in enumerate(s.images):
            full = os.path.normpath(os.path.join(root, rel))
            if os.path.isabs(rel) or os.path.commonpath([root, full]) != root:
                fld = "image" if len(s.images) == 1 else f"image[{k}]"
                out.append(_issue(s.source, s.index, fld, f"{rel!r} resolves outside image_folder {image_folder} "
                                  "(set allow_images_outside_folder: true if that is intended)", s.id, s.jsonl))
    return out


def _check_one_image(path: Path, how: ImageCheck) -> str | None:
    from bunny.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image

    if not path.is_file():
        return f"image file not found: {path}"
    if how == "exists":
        return None
    if how == "open":
        from PIL import Image

        try:
            with Image.open(path) as img:
                w, h = img.size
            if w * h > DEFAULT_MAX_PIXELS:
                return f"{path}: image is {w}x{h}, over the limit of {DEFAULT_MAX_PIXELS} pixels"
        except Exception as exc:  # PIL raises many types for a bad header
            return f"{path}: cannot read image header: {exc}"
        return None
    try:
        load_image(path)
    except ImageError as exc:
        return str(exc)
    return None


def check_images(
    samples: Sequence[Sample], image_folder: str | Path | None, how: ImageCheck = "decode", workers: int = 8
) -> list[SampleIssue]:
    """Each referenced image exists (and opens / fully decodes): one issue per bad image."""
    if how == "none":
        return []
    jobs = [(s, k, resolve_image(image_folder, rel)) for s in samples for k, rel in enumerate(s.images)]
    unique = list(dict.fromkeys(p for _, _, p in jobs))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decodes without the GIL
        results = dict(zip(unique, pool.map(lambda p: _check_one_image(p, how), unique)))
    out = []
    for s, k, p in jobs:
        msg = results[p]
        if msg is not None:
            fld = "image" if len(s.images) == 1 else f"image[{k}]"
            out.append(_issue(s.source, s.index, fld, msg, s.id, s.jsonl))
    return out


@dataclass
class ValidationReport:
    """The outcome of :func:`validate`: the good samples, every issue, and the skipped samples."""

    samples: list[Sample]
    issues: list[SampleIssue] = field(default_factory=list)
    n_read: int = 0
    lengths: list[int] | None = None
    """Token length of each kept sample (when a length function was given)."""

    @property
    def n_bad(self) -> int:
        return len({i.key for i in self.issues})


def validate(
    samples: Sequence[Sample],
    *,
    image_folder: str | Path | None = None,
    image_check: ImageCheck = "decode",
    length_fn: Callable[[Sample], int] | None = None,
    max_length: int | None = None,
    read_issues: Sequence[SampleIssue] = (),
    workers: int = 8,
    allow_outside_folder: bool = False,
) -> ValidationReport:
    """Run every check on every sample; return the samples without issues, and all the issues.

    ``length_fn(sample)`` gives the token count after image expansion (it is only called for
    samples that passed the other checks, since a malformed conversation cannot be tokenized).
    """
    issues = list(read_issues)
    for s in samples:
        issues.extend(check_conversation(s))
    to_open = samples
    if not allow_outside_folder:
        outside = check_image_paths(samples, image_folder)
        issues.extend(outside)
        out_keys = {i.key for i in outside}  # their files are never opened
        to_open = [s for s in samples if (s.source, s.index) not in out_keys]
    issues.extend(check_images(to_open, image_folder, image_check, workers))
    bad = {i.key for i in issues}
    lengths: list[int] | None = [] if length_fn is not None else None
    kept: list[Sample] = []
    for s in samples:
        if (s.source, s.index) in bad:
            continue
        if length_fn is not None:
            try:
                n = int(length_fn(s))
            except ValueError as exc:  # the template refuses it (e.g. text tokenizing to the image id)
                issues.append(_issue(s.source, s.index, "conversations", str(exc), s.id, s.jsonl))
                continue
            if max_length is not None and n > max_length:
                issues.append(_issue(s.source, s.index, "conversations",
                                     f"{n} tokens after image expansion, over model_max_length {max_length}",
                                     s.id, s.jsonl))
                continue
            lengths.append(n)  # type: ignore[union-attr]
        kept.append(s)
    issues.sort(key=lambda i: (i.source, i.index))
    return ValidationReport(samples=kept, issues=issues, n_read=len(samples) + len({i.key for i in read_issues}),
                            lengths=lengths)


def apply_policy(report: ValidationReport, on_bad_sample: Literal["error", "skip"]) -> list[Sample]:
    """``error``: raise :class:`DataValidationError` listing every issue; ``skip``: log each skipped
    sample and the count, return the good ones."""
    if not report.issues:
        return report.samples
    if on_bad_sample == "error":
        raise DataValidationError(report.issues, report.n_read)
    for issue in report.issues:
        log.warning("skipping sample: %s", issue)
    log.warning("skipped %d of %d sample(s) (on_bad_sample: skip)", report.n_bad, report.n_read)
    return report.samples


def load_and_validate(
    paths: str | Path | Iterable[str | Path],
    *,
    image_folder: str | Path | None = None,
    on_bad_sample: Literal["error", "skip"] = "error",
    image_check: ImageCheck = "decode",
    length_fn: Callable[[Sample], int] | None = None,
    max_length: int | None = None,
    max_samples: int | None = None,
    allow_outside_folder: bool = False,
) -> ValidationReport:
    """Read, validate and apply the policy: the samples to train on (``report.samples``)."""
    samples, read_issues = read_samples(paths)
    if max_samples is not None:
        samples = samples[:max_samples]
    report = validate(samples, image_folder=image_folder, image_check=image_check, length_fn=length_fn,
                      max_length=max_length, read_issues=read_issues, allow_outside_folder=allow_outside_folder)
    report.samples = apply_policy(report, on_bad_sample)
    return report
