"""Adding a part touches only its own file: a projector, a vision encoder and a benchmark registered
here (as a new file would register them) work end to end and show up wherever the registry is read.
Each test takes its part out of the registry again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import tiny_images, tiny_model
from torch import nn

import bunny
from bunny.data.synthetic import bench as synthetic_bench
from bunny.eval import cli_eval
from bunny.eval.api import build_tasks
from bunny.eval.tasks import TASKS, Doc, Task, paper_order, parse_task_names
from bunny.model.layouts.ours import save_model
from bunny.model.projectors import PROJECTORS, ProjectorMixin
from bunny.model.vision import VISION_ENCODERS, detect_vision_encoder
from bunny.model.vision.clip import ClipEncoder

PACKAGE = Path(bunny.__file__).parent


class QueryResampler(ProjectorMixin, nn.Module):
    """A resampler: ``config.resampler_queries`` learned queries attend over the image tokens, so the
    token count is the config's, not the encoder's."""

    def __init__(self, vision_dim: int, text_dim: int, queries: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, vision_dim) * 0.02)
        self.out = nn.Linear(vision_dim, text_dim)

    @classmethod
    def build(cls, config, vision_dim: int, text_dim: int) -> nn.Module:
        return cls(vision_dim, text_dim, int(config.resampler_queries))

    @classmethod
    def num_tokens(cls, config, n_in: int) -> int:
        return int(config.resampler_queries)

    def num_output_tokens(self, n_in: int) -> int:
        return self.queries.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.queries @ x.transpose(1, 2), dim=-1)  # [B, Q, N]
        return self.out(weights @ x)


@pytest.fixture
def resampler():
    PROJECTORS.register("test_resampler", QueryResampler)
    yield "test_resampler"
    PROJECTORS.unregister("test_resampler")


def test_a_projector_that_sets_its_own_token_count(resampler, tmp_path):
    model, processor = tiny_model(projector_type=resampler, resampler_queries=3)
    assert model.config.num_image_tokens == 3 and processor.num_image_tokens == 3
    assert model.vision_tower.num_tokens == 16  # the encoder's count is not what reaches the LLM
    inputs = processor(text=["<image>\nWhat is this?"], images=tiny_images(1), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 3
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1]
    # the folder round-trips: the kind is found by name again, the weights load strictly
    model2, processor2 = bunny.load_model(save_model(model, processor, tmp_path / "m"))
    assert model2.config.resampler_queries == 3
    with torch.no_grad():
        assert torch.allclose(model2(**inputs).logits, logits, atol=1e-5)


def test_unknown_projector_lists_registered_kinds_and_forms(resampler):
    with pytest.raises(KeyError, match="test_resampler.*mlp\\{N\\}x_gelu"):
        tiny_model(projector_type="no_such_projector")


class ClipLikeEncoder(ClipEncoder):
    """A new encoder family: here a CLIP tower under another config model_type."""

    config_model_types = ("test_cliplike_vision",)


@pytest.fixture
def encoder():
    VISION_ENCODERS.register("test_cliplike", ClipLikeEncoder)
    yield "test_cliplike"
    VISION_ENCODERS.unregister("test_cliplike")


def test_an_encoder_is_detected_from_its_class_data_and_builds(encoder, tmp_path):
    folder = tmp_path / "vision"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "test_cliplike_vision"}))
    assert detect_vision_encoder(folder) == encoder
    model, processor = tiny_model(vision=encoder)
    assert isinstance(model.vision_tower, ClipLikeEncoder)
    inputs = processor(text=["<image>\nhi"], images=tiny_images(1), return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


class CountingBench(Task):
    """A new benchmark: two questions whose answer is a number."""

    name = "test_counting"
    option_names = {"limit": "answer only the first N questions"}

    def _load(self) -> list[Doc]:
        return [Doc(question_id=i, prompt=f"<image>\nHow many? ({i})", target=str(i)) for i in range(2)]

    def _score(self, docs: list[Doc], texts: dict[str, str]) -> dict:
        right = sum(texts.get(d.key, "").strip() == d.target for d in docs)
        return {"accuracy": 100.0 * right / len(docs)}


@pytest.fixture
def benchmark():
    TASKS.register("test_counting", CountingBench)
    yield "test_counting"
    TASKS.unregister("test_counting")


def test_a_benchmark_joins_all_and_the_cli_help(benchmark, tmp_path):
    assert paper_order()[:8] == ("mme", "mmbench", "seed", "mmmu", "vqav2", "gqa", "sqa", "pope")
    assert paper_order()[-1] == benchmark and parse_task_names("all")[-1] == benchmark
    help_text = cli_eval.description()
    assert benchmark in help_text.split("tasks: ")[1].split("\n")[0]
    assert f"{benchmark}.limit: answer only the first N questions" in help_text
    (task,) = build_tasks(benchmark, tmp_path)
    assert task.score({0: "0", 1: "7"})["accuracy"] == 50.0


def test_benchmark_and_writer_files_are_discovered():
    task_files = {p.stem for p in (PACKAGE / "eval" / "tasks").glob("*.py")} - {"__init__", "base"}
    assert task_files <= set(TASKS.names())
    writer_files = {p.stem for p in (PACKAGE / "data" / "synthetic" / "bench").glob("*.py")} - {"__init__", "common"}
    assert set(synthetic_bench.TASKS) == writer_files
    assert [synthetic_bench.writer(t).ORDER for t in synthetic_bench.TASKS] == list(range(len(writer_files)))
