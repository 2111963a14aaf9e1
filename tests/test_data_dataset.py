"""Batch plan (grouping, world-size independence, resume slicing), collation, and packing exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import tiny_model
from _train_helpers import one_thread, short_instruct, world

from bunny.data.dataset import BatchPlan, Collator, SupervisedDataset
from bunny.data.samples import load_and_validate
from bunny.data.templates import IGNORE_INDEX, get_template


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield from one_thread()


def _plan(world_size, accum, b=2, n=103, **kw):
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 300, n)
    has_image = rng.random(n) < 0.7
    return BatchPlan(lengths, has_image, b, world_size, accum, seed=3, **kw)


def _steps(plan, epoch):
    """Per optimizer step: the set of samples over all ranks and accumulation steps."""
    per_rank = [plan.micro_batches(epoch, r) for r in range(plan.world_size)]
    steps = []
    for s in range(plan.steps_per_epoch):
        chunk = set()
        for r in range(plan.world_size):
            for mb in per_rank[r][s * plan.accum:(s + 1) * plan.accum]:
                chunk |= set(mb)
        steps.append(chunk)
    return steps


def test_plan_is_independent_of_world_size_and_covers_each_sample_once():
    one, two, four = _plan(1, 4), _plan(2, 2), _plan(4, 1)
    assert one.global_batch_size == two.global_batch_size == four.global_batch_size == 8
    for epoch in (0, 1):
        s1, s2, s4 = _steps(one, epoch), _steps(two, epoch), _steps(four, epoch)
        assert s1 == s2 == s4
        seen = [i for step in s1 for i in step]
        assert len(seen) == len(set(seen)) == 8 * one.steps_per_epoch  # no repeats; only the tail dropped
    assert _steps(one, 0) != _steps(one, 1)  # reshuffled each epoch


def test_plan_groups_modality_and_length():
    plan = _plan(1, 1, b=4, n=400)
    batches = plan.global_batches(0)
    mixed = [b for b in batches if len(set(plan.has_image[b])) > 1]
    assert len(mixed) <= 1  # only the tail batch may mix images and text-only samples

    def padding(p):
        return sum(int(p.lengths[b].max() * len(b) - p.lengths[b].sum()) for b in p.global_batches(0))

    ungrouped = _plan(1, 1, b=4, n=400, group_by_length=False, group_by_modality=False)
    assert padding(plan) < 0.3 * padding(ungrouped)


def test_plan_resume_slices_the_same_batches():
    plan = _plan(2, 3)
    for rank in (0, 1):
        full = plan.micro_batches(0, rank)
        assert plan.micro_batches(0, rank, start_step=2) == full[2 * 3:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _plan(4, 4, n=20)


@pytest.fixture(scope="module")
def tiny_and_data():
    model, processor = tiny_model(vision="siglip", family="qwen2", vision_overrides={"image_size": 32, "patch_size": 8})
    template = get_template("chatml")
    w = world()
    tok = processor.tokenizer
    report = load_and_validate(short_instruct(), image_folder=w / "images")
    ds = SupervisedDataset(report.samples, tokenizer=tok, template=template,
                           image_token_id=processor.image_token_id, num_image_tokens=processor.num_image_tokens,
                           image_folder=w / "images", image_processor=processor.image_processor, image_mode="pad")
    return model, processor, ds


def test_collator_pads_and_packs_the_same_tokens(tiny_and_data):
    _, processor, ds = tiny_and_data
    items = [ds[i] for i in range(6)]
    padded = Collator(processor.tokenizer.pad_token_id)(items)
    packed = Collator(processor.tokenizer.pad_token_id, pack=True, pack_length=sum(len(i["input_ids"]) for i in items))(
        items)
    assert packed["input_ids"].shape[0] == 1 and packed["attention_mask"] is None
    assert padded["n_targets"] == packed["n_targets"] == sum(int(t) for t in ds.targets[:6])
    assert torch.equal(padded["pixel_values"], packed["pixel_values"])
    row, pos = packed["input_ids"][0], packed["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) == 6
    for k, it in enumerate(items):  # each sample intact, in order, positions restarting at 0
        n = len(it["input_ids"])
        assert torch.equal(row[starts[k]:starts[k] + n], it["input_ids"])
        assert packed["labels"][0, starts[k]] == IGNORE_INDEX  # never predicted across samples
    # rows capped at pack_length: more rows, padding is a separate segment without labels
    capped = Collator(processor.tokenizer.pad_token_id, pack=True, pack_length=max(len(i["input_ids"]) for i in items))(
        items)
    assert capped["input_ids"].shape[0] > 1 and capped["n_targets"] == packed["n_targets"]


@pytest.mark.parametrize("supervised_only", [False, True])
def test_packed_loss_equals_unpacked_loss(tiny_and_data, supervised_only):
    model, processor, ds = tiny_and_data
    items = [ds[i] for i in range(8)]
    losses, grads = [], []
    for collator in (Collator(processor.tokenizer.pad_token_id),
                     Collator(processor.tokenizer.pad_token_id, pack=True, pack_length=512)):
        b = collator(items)
        model.zero_grad()
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b.get("position_ids"),
                    pixel_values=b["pixel_values"], labels=b["labels"], use_cache=False,
                    supervised_logits_only=supervised_only, num_items_in_batch=b["n_targets"])
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append(model.mm_projector[0].weight.grad.clone())
    assert losses[0] > 1.0
    assert abs(losses[0] - losses[1]) < 1e-5
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dataset_measures_lengths_and_targets(tiny_and_data):
    _, processor, ds = tiny_and_data
    ids, labels = ds.encode(0)
    assert ds.lengths[0] == len(ids)
    assert ds.targets[0] == sum(1 for x in labels[1:] if x != IGNORE_INDEX)
    item = ds[0]
    assert item["pixel_values"].shape == (1, 3, 32, 32)
    assert int((item["input_ids"] == processor.image_token_id).sum()) == processor.num_image_tokens
