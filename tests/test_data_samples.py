"""LLaVA JSON/JSONL reading and validation: every problem reported at once, with file/index/field."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from bunny.data.samples import DataValidationError, load_and_validate, read_samples


def _img(path, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(path)


def _good(i, image=True):
    s = {"id": f"s{i}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + "What?"},
                                          {"from": "gpt", "value": "A thing."}]}
    if image:
        s["image"] = f"img/{i}.png"
    return s


@pytest.fixture
def folder(tmp_path):
    for i in range(4):
        _img(tmp_path / "img" / f"{i}.png")
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    noise.save(tmp_path / "img" / "full.png")
    data = (tmp_path / "img" / "full.png").read_bytes()
    (tmp_path / "img" / "truncated.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    (tmp_path / "img" / "text.png").write_text("not an image")
    return tmp_path


def test_every_problem_is_reported_with_file_index_and_field(folder):
    bad = [
        _good(0),
        {**_good(1), "image": "img/missing.png"},                                            # missing image
        {**_good(2), "image": "img/truncated.png"},                                          # truncated file
        {"id": "roles", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
        {"id": "noreply", "conversations": [{"from": "human", "value": "only a question"}]},
        {**_good(3), "image": ["img/0.png", "img/1.png"]},                                   # 1 <image>, 2 images
        {"id": "empty", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
        {"id": "imgreply", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}]},
        {"id": "unknown", "conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "long", "conversations": [{"from": "human", "value": "q " * 50}, {"from": "gpt", "value": "a"}]},
        "not an object",
        {"id": "noconv"},
        {**_good(0, image=False), "image": "img/text.png"},                                  # image, no <image>
    ]
    path = folder / "data.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataValidationError) as info:
        load_and_validate(path, image_folder=folder, length_fn=lambda s: len(str(s.conversations)), max_length=120)
    issues = {(i.index, i.field) for i in info.value.issues}
    expected = {
        (1, "image"), (2, "image"), (3, "conversations[0].from"), (4, "conversations"), (5, "image"),
        (6, "conversations[1].value"), (7, "conversations[1].value"), (8, "conversations[0].from"),
        (9, "conversations"), (10, "sample"), (11, "conversations"), (12, "image"),
    }
    assert expected <= issues, expected - issues
    assert all(i.index != 0 for i in info.value.issues)  # the good sample has none
    msg = str(info.value)
    assert f"{path}[1] (id s1) image: image file not found" in msg
    assert "truncated.png" in msg and "roles out of order" in msg and "no assistant" in msg
    assert "1 <image> placeholder(s) in the text but 2 image(s)" in msg
    assert "over model_max_length 120" in msg


def test_jsonl_names_lines_and_skip_policy_logs_each(folder, caplog):
    lines = [json.dumps(_good(0)), "{broken json", "", json.dumps({**_good(1), "image": "img/nope.png"}),
             json.dumps(_good(2, image=False))]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="bunny.data.samples"):
        report = load_and_validate(path, image_folder=folder, on_bad_sample="skip")
    assert [s.id for s in report.samples] == ["s0", "s2"]
    assert report.n_bad == 2
    text = caplog.text
    assert f"{path}:2 json: not valid JSON" in text
    assert f"{path}:4 (id s1) image: image file not found" in text
    assert "skipped 2 of 4 sample(s)" in text


def test_read_accepts_json_list_multi_image_and_system_turn(folder):
    data = [{"id": "m", "image": ["img/0.png", "img/1.png"],
             "conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": "<image> and <image>: same?"},
                               {"from": "gpt", "value": "No."}, {"from": "human", "value": "Sure?"},
                               {"from": "gpt", "value": "Yes."}]},
            _good(3, image=False)]
    (folder / "d.json").write_text(json.dumps(data))
    samples, issues = read_samples(folder / "d.json")
    assert not issues and samples[0].images == ["img/0.png", "img/1.png"] and not samples[1].has_image
    report = load_and_validate(folder / "d.json", image_folder=folder)
    assert len(report.samples) == 2 and not report.issues


def test_image_check_modes(folder):
    (folder / "d.json").write_text(json.dumps([{**_good(0), "image": "img/truncated.png"}]))
    # header-only check cannot see truncation; full decode does
    assert not load_and_validate(folder / "d.json", image_folder=folder, image_check="open").issues
    with pytest.raises(DataValidationError, match="truncated.png"):
        load_and_validate(folder / "d.json", image_folder=folder, image_check="decode")


def test_whole_file_errors_are_clear(tmp_path):
    (tmp_path / "bad.json").write_text("[{]")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON at line 1"):
        read_samples(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"a": 1}\n')
    samples, issues = read_samples(tmp_path / "obj.json")  # one object: read as JSONL
    assert not samples and issues[0].field == "conversations"
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_samples(tmp_path / "nope.json")


def test_image_paths_outside_the_image_folder_are_refused_unless_allowed(folder):
    images = folder / "img"
    _img(folder / "secret.png")  # beside the image folder, not in it
    (images / "sub").mkdir()
    data = [{**_good(0), "image": "../secret.png"}, {**_good(1), "image": str(folder / "secret.png")},
            {**_good(2), "image": "sub/../2.png"}, {**_good(3), "image": "3.png"}]
    (folder / "d.json").write_text(json.dumps(data))
    for check in ("decode", "none"):  # even with no image check at all
        with pytest.raises(DataValidationError) as exc:
            load_and_validate(folder / "d.json", image_folder=images, image_check=check)
        bad = {(i.index, i.field) for i in exc.value.issues}
        assert bad == {(0, "image"), (1, "image")}, exc.value
        assert "'../secret.png' resolves outside image_folder" in str(exc.value)
        assert "allow_images_outside_folder" in str(exc.value)
    report = load_and_validate(folder / "d.json", image_folder=images, allow_outside_folder=True)
    assert len(report.samples) == 4 and not report.issues
    report = load_and_validate(folder / "d.json", image_folder=images, on_bad_sample="skip")
    assert [s.id for s in report.samples] == ["s2", "s3"]
