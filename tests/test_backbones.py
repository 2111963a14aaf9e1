"""The demo's small backbones: trained from the world, saved as ordinary Hugging Face folders that the
recipe's real code paths (AutoModel, the curation embedder, the vision encoder registry, the LLM
family table, assemble_model) open like google/siglip-so400m and microsoft/phi-2 folders."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from bunny.backbones import BackboneSettings, build_backbones, corpus
from bunny.backbones.language import LMSettings
from bunny.backbones.vision import (
    FactHeads,
    VisionSettings,
    _auc,
    batch,
    batch_views,
    build_model,
    cell_targets,
    copy_loss,
    fact_loss,
    sigmoid_loss,
)
from bunny.data.synthetic.scenes import render, sample_scene

TINY = BackboneSettings(
    vocab_size=400,
    tokenizer_scenes=150,
    vision=VisionSettings(hidden_size=32, layers=2, heads=2, intermediate_size=64, text_hidden_size=32,
                          text_layers=1, steps=12, batch_size=16, warmup=2),
    lm=LMSettings(hidden_size=32, layers=2, heads=4, intermediate_size=64, steps=12, batch_size=4, warmup=2,
                  turns=2, probe_questions=14),
)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    return build_backbones(tmp_path_factory.mktemp("bb"), TINY, log=None)


def test_siglip_starts_at_the_siglip_papers_scale_and_bias(backbones):
    from transformers import AutoTokenizer

    model = build_model(AutoTokenizer.from_pretrained(backbones.tokenizer), TINY.vision)
    # transformers 5 starts both at 0, where the sigmoid loss learns nothing in hundreds of steps
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == pytest.approx(-10.0)


def test_tokenizer_corpus_covers_the_chat_format():
    text = "".join(corpus(8, 0))
    assert "USER:" in text and "ASSISTANT:" in text and "<|endoftext|>" in text and "background" in text


def test_sigmoid_loss_is_siglips_own(backbones):
    from transformers import AutoTokenizer, SiglipModel

    model = SiglipModel.from_pretrained(backbones.vision).eval()
    tok = AutoTokenizer.from_pretrained(backbones.vision)
    pixels, ids, _, _ = batch(tok, np.random.default_rng(0), TINY.vision)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        ours = sigmoid_loss(model.get_image_features(pixel_values=pixels).pooler_output,
                            model.get_text_features(input_ids=ids).pooler_output,
                            model.logit_scale, model.logit_bias)
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def test_folders_open_with_the_auto_classes(backbones):
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
        PhiForCausalLM,
        SiglipModel,
    )

    siglip = AutoModel.from_pretrained(backbones.vision)
    assert isinstance(siglip, SiglipModel)  # both towers: curation embeds images and captions with it
    assert siglip.config.vision_config.image_size == 48 and siglip.config.vision_config.patch_size == 16
    proc = AutoImageProcessor.from_pretrained(backbones.vision)
    assert proc(images=[render(sample_scene(np.random.default_rng(0)), 48)], return_tensors="pt")[
        "pixel_values"].shape == (1, 3, 48, 48)
    lm = AutoModelForCausalLM.from_pretrained(backbones.lm)
    assert isinstance(lm, PhiForCausalLM)  # microsoft/phi-2's architecture, so the `phi-2` family takes it
    tok = AutoTokenizer.from_pretrained(backbones.lm)
    assert tok.eos_token == "<|endoftext|>" and tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    assert tok.tokenize(" red circle") == ["Ġred", "Ġcircle"]


def test_training_figures_are_recorded_and_losses_fall(backbones):
    f = backbones.figures
    assert f["tokenizer"]["vocab_size"] == TINY.vocab_size
    v, lm = f["vision"], f["lm"]
    assert v["sigmoid_loss_last"] < v["sigmoid_loss_first"]
    assert v["attribute_loss_last"] < v["attribute_loss_first"]
    assert lm["loss_last"] < lm["loss_first"]
    assert set(lm["probe"]) >= {"color", "count", "mean"} and 0 <= lm["probe"]["mean"] <= 1
    assert len(v["losses"]) == TINY.vision.steps and len(lm["losses"]) == TINY.lm.steps
    # the probe ladder's curation rung: every figure the demo's calibration and report read
    for k in ("retrieval_top1", "pair_auc", "blank_auc", "match_auc", "attr_shape", "attr_color"):
        assert 0.0 <= v[k] <= 1.0, k
    assert v["dup_cos_p5"] <= v["dup_cos_p10"] <= v["dup_cos_p50"] <= 1.0 + 1e-6
    assert v["cpu_seconds"] > 0 and v["threads"] >= 1


def test_second_build_is_a_cache_hit_and_other_settings_are_not(backbones, tmp_path):
    t = time.perf_counter()
    again = build_backbones(backbones.root.parent, TINY, log=None)
    assert again.reused and again.root == backbones.root and time.perf_counter() - t < 1.0
    assert again.figures == backbones.figures
    other = BackboneSettings.from_dict({**_as_dict(TINY), "seed": 1})
    assert other.key() != TINY.key()


def _as_dict(s):
    from dataclasses import asdict

    return asdict(s)


def test_the_recipe_code_paths_take_the_folders(backbones):
    from PIL import Image

    from bunny.curate.embed import Embedder
    from bunny.model.assemble import assemble_model
    from bunny.model.vision import VISION_ENCODERS

    emb = Embedder(backbones.vision)
    img = render(sample_scene(np.random.default_rng(1)), 48)
    v = emb.images([img, Image.new("RGB", (48, 48))])
    t = emb.texts(["a large red circle at the top left on snow", "image"])
    assert v.shape == t.shape == (2, TINY.vision.hidden_size) and np.isfinite(v).all()
    enc = VISION_ENCODERS.get("siglip").from_pretrained(backbones.vision)
    assert enc.num_tokens == 9  # 48 px / 16 px patches: one token per grid cell
    model, processor = assemble_model(backbones.vision, backbones.lm)
    assert model.config.llm_family == "phi-2" and processor.chat_template == "bunny"
    text = processor.render([{"role": "user", "content": "<image>\nWhat color is the circle?"}])
    inputs = processor(text=[text], images=[img], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_lm_image_slot_holds_each_cells_words(backbones):
    """The LM learns from conversations whose ``<image>`` is side**2 slots, each the sum of the word
    embeddings of its cell (object, background, place): what stage 1 then teaches the projector to
    produce from the vision tower's patch tokens."""
    from transformers import AutoTokenizer

    from bunny.backbones.language import SlotCoder, build_model, render_bunny, slot_words
    from bunny.data.synthetic.scenes import Obj, Scene

    scene = Scene("snow", (Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 2, 1)), 3)
    words = slot_words(scene, 3)
    assert words[0] == ["large", "red", "circle", "snow", "top", "left"]
    assert words[4] == ["snow", "center"] and words[7] == ["small", "blue", "square", "snow", "bottom"]
    tok = AutoTokenizer.from_pretrained(backbones.lm)
    coder = SlotCoder(tok, 3)
    conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]
    ids, labels, slots = coder.encode(render_bunny(conv), scene)
    at = [i for i, t in enumerate(ids) if t == coder.image_id]
    assert len(at) == 9 and at == list(range(at[0], at[0] + 9)) and all(labels[i] == -100 for i in at)
    assert tok.decode([t for t in labels if t != -100]).strip() == "red<|endoftext|>"
    model = build_model(tok, TINY.lm)
    batch_ids, _, _, slot_ids = coder.collate([(ids, labels, slots)])
    emb = coder.embed(model, batch_ids, slot_ids)
    table = model.get_input_embeddings().weight
    for k in (0, 4, 7):
        want = sum(table[t] for w in words[k] for t in coder.word_ids(w))
        assert torch.allclose(emb[0, at[k]], want, atol=1e-5)
    assert torch.equal(emb[0, : at[0]], table[batch_ids[0, : at[0]]])  # the text around stays itself



def test_lookup_targets_point_question_words_at_their_slots_and_the_reply_at_the_words(backbones):
    """The supervised hops: "circle" -> the circle's slot, "left" -> the left column's slots, the position
    that predicts the reply -> the question's fact words; in a multiple-choice question, each option's
    last word -> its letter and the reply position -> the right option. Never the reply itself."""
    from transformers import AutoTokenizer

    from bunny.backbones.language import SlotCoder, render_bunny
    from bunny.data.synthetic.scenes import Obj, Scene

    scene = Scene("snow", (Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 2, 1)), 3)
    tok = AutoTokenizer.from_pretrained(backbones.lm)
    coder = SlotCoder(tok, 3)
    conv = [{"from": "human", "value": "<image>\nWhat color is the circle at the left?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "two"},
            {"from": "human", "value": "Where is the square?\nA. top left\nB. bottom\nAnswer with the option's letter."},
            {"from": "gpt", "value": "B"}]
    ids, labels, _ = coder.encode(render_bunny(conv), scene)
    first = ids.index(coder.image_id)
    targets = coder.lookup_targets(ids, labels, scene)

    def show(keys):
        return [k - first if ids[k] == coder.image_id else tok.decode([ids[k]]).strip() for k in keys]

    words = [(tok.decode([ids[q]]).strip(), sorted(show(keys))) for layer, head, q, keys in targets if (layer, head) == (0, 0)]
    assert words[:2] == [("circle", [0]), ("left", [0, 3, 6])]
    assert ("square", [7]) in words and ("bottom", [6, 7, 8]) in words
    letters = [(tok.decode([ids[q]]).strip(), show(keys)) for layer, head, q, keys in targets if (layer, head) == (0, 1)]
    assert letters == [("left", ["A"]), ("bottom", ["B"])]
    reads = [(q, show(keys)) for layer, head, q, keys in targets if layer == 1]
    assert [r[1] for r in reads] == [["circle", "left"], ["square"]]  # the count question names no fact
    for q, _ in reads:
        assert labels[q] == -100 and labels[q + 1] != -100  # q predicts the first reply token
    (choose,) = [(q, show(keys)) for layer, head, q, keys in targets if layer == -1]
    assert choose[1] == ["bottom"] and choose[0] == reads[1][0]
    assert coder.lookup_targets(ids, labels, None) == []


def test_background_and_option_span_hops():
    """With ``background``, "background" reads every slot and the background's name reads the slots when
    it is this scene's; with ``option_span``, an option of several words has its last word read the
    whole option, so "top left" and "bottom left" are told apart where the reply picks one."""
    from transformers import AutoTokenizer

    from bunny.backbones.language import SlotCoder, render_bunny
    from bunny.backbones.ship import SHIPPED_DIR
    from bunny.data.synthetic.scenes import Obj, Scene
    from bunny.demo import DemoConfig

    scene = Scene("snow", (Obj("circle", "red", "large", 0, 0),), 3)
    tok = AutoTokenizer.from_pretrained(SHIPPED_DIR / DemoConfig().backbones.key() / "tokenizer")  # names are one token
    conv = [{"from": "human", "value": "<image>\nWhat kind of background does the image have?\nA. sand\nB. snow\n"
                                       "Answer with the option's letter."}, {"from": "gpt", "value": "B"},
            {"from": "human", "value": "Where is the circle?\nA. bottom left\nB. top left\nAnswer with the option's letter."},
            {"from": "gpt", "value": "B"}]

    def hops(coder):
        ids, labels, _ = coder.encode(render_bunny(conv), scene)
        first = ids.index(coder.image_id)

        def show(keys):
            return sorted(k - first if ids[k] == coder.image_id else tok.decode([ids[k]]).strip() for k in keys)
        return [(layer, head, tok.decode([ids[q]]).strip(), show(keys)) for layer, head, q, keys in
                coder.lookup_targets(ids, labels, scene)]

    old, new = hops(SlotCoder(tok, 3)), hops(SlotCoder(tok, 3, background=True, option_span=True))
    assert not any(w in ("background", "snow", "sand") for layer, head, w, _ in old if (layer, head) == (0, 0))
    assert (0, 0, "background", list(range(9))) in new and (0, 0, "snow", list(range(9))) in new
    assert not any(w == "sand" for layer, head, w, _ in new if (layer, head) == (0, 0))  # not this scene's
    reads = [keys for layer, head, _, keys in new if layer == 1]
    assert reads[0] == ["background"] and reads[1] == ["circle"]
    spans = [(w, keys) for layer, head, w, keys in new if (layer, head) == (0, 2)]
    assert spans == [("left", ["bottom", "left"]), ("left", ["left", "top"])]
    assert not any((layer, head) == (0, 2) for layer, head, _, _ in old)
    picks = [keys for layer, head, _, keys in new if layer == -1]
    assert picks == [["snow"], ["left"]]


def test_readout_supervises_only_the_multiple_choice_heads_value_path():
    """``lm.readout_weight``: at a multiple-choice reply, the last layer's head 0 alone must name the
    letter. Its gradient reaches that head's value rows and no other head's; a batch with no multiple
    choice adds nothing; the readout needs the lookup hops it reads (a named error without them)."""
    from transformers import AutoTokenizer

    from bunny.backbones.language import HeadReadout, SlotCoder, build_model, render_bunny, train_language
    from bunny.backbones.ship import SHIPPED_DIR
    from bunny.data.synthetic.scenes import Obj, Scene
    from bunny.demo import DemoConfig

    tok = AutoTokenizer.from_pretrained(SHIPPED_DIR / DemoConfig().backbones.key() / "tokenizer")
    s = LMSettings(hidden_size=32, layers=2, heads=4, intermediate_size=64, readout_weight=1.0)
    model = build_model(tok, s)
    coder = SlotCoder(tok, 3, background=True, option_span=True)
    scene = Scene("snow", (Obj("circle", "red", "large", 0, 0),), 3)
    mc = [{"from": "human", "value": "<image>\nWhat color is the circle?\nA. blue\nB. red\n"
                                     "Answer with the option's letter."}, {"from": "gpt", "value": "B"}]
    short = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]
    readout = HeadReadout(model)
    for conv, has_mc in ((mc, True), (short, False)):
        ids, labels, slots = coder.encode(render_bunny(conv), scene)
        targets = [coder.lookup_targets(ids, labels, scene)]
        ids_t, att, lab, slot_ids = coder.collate([(ids, labels, slots)])
        model.zero_grad()
        model(inputs_embeds=coder.embed(model, ids_t, slot_ids), attention_mask=att)
        loss = readout.loss(lab, targets)
        if not has_mc:
            assert loss is None
            continue
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        v = model.model.layers[-1].self_attn.v_proj.weight.grad.view(4, 8, 32)  # heads x head_dim x hidden
        assert v[0].abs().sum() > 0 and v[1:].abs().sum() == 0
        assert model.model.layers[0].self_attn.v_proj.weight.grad.abs().sum() > 0  # through the option's words
    with pytest.raises(ValueError, match="lookup_aux"):
        train_language(tok, None, LMSettings(hidden_size=32, layers=2, heads=4, intermediate_size=64,
                                             readout_weight=1.0, lookup_aux=0.0), stop_after=1)


def test_lookup_loss_is_low_when_attention_is_on_the_targets():
    from bunny.backbones.language import lookup_loss

    att = torch.full((1, 2, 6, 6), 1 / 6)
    targets = [[(0, 0, 4, [1, 2]), (-1, 1, 5, [4])]]
    uniform = lookup_loss((att, att.clone()), targets)
    focused = att.clone()
    focused[0, 0, 4] = torch.tensor([0, 0.5, 0.5, 0, 0, 0])
    sharp = att.clone()
    sharp[0, 1, 5] = torch.tensor([0, 0, 0, 0, 1.0, 0])
    assert lookup_loss((focused, sharp), targets) < 1e-4 < uniform
    assert lookup_loss((att, att), [[]]) is None


def test_balanced_lookup_loss_weighs_each_hop_kind_the_same():
    """Three easy hops on target and one missed: the plain mean hides the miss behind the many easy
    terms, the balanced mean gives the missed kind half the weight."""
    import math

    from bunny.backbones.language import lookup_loss

    att = torch.full((1, 2, 6, 6), 1 / 6)
    att[0, 0, 1:4] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    targets = [[(0, 0, 1, [0]), (0, 0, 2, [0]), (0, 0, 3, [0]), (0, 1, 5, [4])]]
    missed = -math.log(1 / 6 + 1e-6)
    assert float(lookup_loss((att,), targets)) == pytest.approx(missed / 4, rel=1e-4)
    assert float(lookup_loss((att,), targets, balance=True)) == pytest.approx(missed / 2, rel=1e-4)


def test_shipped_backbones_are_intact_and_still_made_by_the_command():
    """`bunny backbones --check`: the shipped files match their manifest, the tokenizer retrains to the
    same vocabulary and the first steps of each model's training reproduce the shipped fingerprints."""
    from bunny.backbones.cli import check_shipped, settings_from
    from bunny.backbones.ship import SHIPPED_DIR

    settings = settings_from([])
    assert (SHIPPED_DIR / settings.key() / "backbones.json").is_file(), "the demo's default set is shipped"
    assert check_shipped(settings, log=None) == []
    size = sum(p.stat().st_size for p in (SHIPPED_DIR / settings.key()).rglob("*") if p.is_file())
    assert size < 10 * 2**20


def test_auc_is_the_mann_whitney_statistic():
    pos, neg = torch.tensor([0.9, 0.8, 0.3]), torch.tensor([0.7, 0.3, 0.1, 0.0])
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert _auc(pos, neg) == pytest.approx(float(brute))
    assert _auc(torch.tensor([2.0]), torch.tensor([1.0, 0.0])) == 1.0


def test_copies_are_crawler_copies_and_the_copy_loss_prefers_them(backbones):
    """``batch_views`` gives each image a re-encoded copy (1 px shift, brightness, JPEG): close to its
    own image in pixels, far from the others; the copy loss is low when copies embed like originals."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbones.tokenizer)
    s = VisionSettings(**{**_as_dict(TINY.vision), "batch_size": 8, "hard_negative_share": 0.5})
    pixels, copies, ids, tgt, caps = batch_views(tok, np.random.default_rng(0), s)
    assert pixels.shape == copies.shape == (8, 3, 48, 48) and ids.shape[0] == len(caps) == 8
    own = (pixels - copies).abs().mean((1, 2, 3))
    other = (pixels - copies.roll(1, 0)).abs().mean((1, 2, 3))
    assert (own < other).all()
    assert batch_views(tok, np.random.default_rng(0), VisionSettings(**{**_as_dict(s), "copy_weight": 0.0}))[1] is None
    e = torch.randn(8, 16)
    assert copy_loss(e, e + 0.01 * torch.randn(8, 16), 0.05) < 0.1 < copy_loss(e, torch.randn(8, 16), 0.05)


def test_fact_heads_read_both_towers_with_one_set_of_weights():
    """One head reads the scene's facts from the image and the caption embedding: the same directions in
    both, which is what aligns the towers early. A head fitted to one embedding scores the other."""
    from bunny.data.synthetic.scenes import sample_scene as draw

    rng = np.random.default_rng(0)
    tgt = cell_targets([draw(rng) for _ in range(4)], 3)
    heads = FactHeads(16, 3)
    emb = torch.randn(4, 16, requires_grad=True)
    loss = fact_loss(heads, emb, tgt)
    loss.backward()
    assert emb.grad.abs().sum() > 0 and heads.cells.weight.grad.abs().sum() > 0
    pred = heads(emb.detach())
    assert pred["shape"].shape == (4, 9, 5) and pred["color"].shape == (4, 9, 7) and pred["background"].shape == (4, 4)
