"""A chat template's special strings become single tokens when a model is built (tokenizers trained on
the data lack ``<|im_start|>`` / ``<|im_end|>``), so training learns and generation stops on one id;
loading a folder built without them warns."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _tiny import tiny_images
from torch import nn
from transformers import AutoModelForCausalLM, SiglipVisionModel

import bunny
from bunny.backbones.tokenizer import train_tokenizer, wrap
from bunny.data.templates import get_template
from bunny.infer.generate import GenerationRequest, Generator, SamplingParams
from bunny.model.assemble import assemble_model
from bunny.model.layouts.ours import save_model
from bunny.model.special_tokens import TemplateTokenWarning, is_single_token
from bunny.model.tiny import tiny_model, tiny_text_config, tiny_vision_config

CHAT = ["USER: what is the red circle? ASSISTANT: a red circle on the left of the blue square.",
        "what colour is the car? it is green. how many dogs sit on the mat? two dogs."] * 20
MESSAGES = [{"role": "user", "content": "<image>\nwhat is it?"}]


def plain_bpe():
    """What ``bunny train`` with ``tiny:`` trains on the data: a byte-level BPE with ``<|endoftext|>`` and
    ``<image>`` only, padded with plain tokens to a multiple of 8 so a tiny model has no spare row."""
    tok = wrap(train_tokenizer(CHAT, vocab_size=300), model_max_length=512)
    tok.add_tokens([f"zzpad{i}" for i in range(-len(tok) % 8)])
    assert len(tok) % 8 == 0
    return tok


def _always(model, token_id: int) -> None:
    """Give the LLM an output head that always prefers ``token_id`` (a biased Linear)."""
    lm = model.language_model
    old = lm.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
    lm.set_output_embeddings(head)


def test_tiny_qwen2_gets_im_end_as_one_token_and_stops_on_it(tmp_path):
    tok = plain_bpe()
    n_before = len(tok)
    assert len(tok.encode("<|im_end|>", add_special_tokens=False)) > 1  # the bug's starting point
    model, processor = tiny_model(tok, family="qwen2")
    assert model.config.chat_template == "chatml"
    assert all(is_single_token(tok, s) for s in ("<|im_start|>", "<|im_end|>"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert {im_end, tok.convert_tokens_to_ids("<|im_start|>")} == {n_before, n_before + 1}
    # the embeddings grew (to a multiple of 8) and the configs follow
    emb = model.language_model.get_input_embeddings().weight
    assert emb.shape[0] == n_before + 8 == model.config.text_config.vocab_size
    assert model.language_model.get_output_embeddings().weight.shape[0] == n_before + 8
    known = [i for i in range(n_before) if i != model.config.image_token_id]
    assert torch.allclose(emb[im_end], emb[known].mean(0), atol=1e-6)
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    # the prompt's role markers are single ids too
    ids = processor(text=[processor.render(MESSAGES)], images=tiny_images(1))["input_ids"][0].tolist()
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant

    # a saved folder keeps them and loads without a warning
    folder = save_model(model, processor, tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TemplateTokenWarning)
        loaded, lproc = bunny.load_model(folder)
    assert lproc.tokenizer.convert_tokens_to_ids("<|im_end|>") == im_end

    # generation ends on the id: a head that always picks <|im_end|> stops at once (an empty reply) ...
    _always(loaded, im_end)
    inputs = lproc(text=[lproc.render(MESSAGES)], images=tiny_images(1))
    out = loaded.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == [im_end]
    gen = Generator(loaded, lproc)
    request = GenerationRequest(MESSAGES, tiny_images(1), SamplingParams(max_new_tokens=12))
    [result] = gen.generate([request])
    assert (result.completion_tokens, result.finish_reason, result.text) == (0, "stop", "")
    # ... while one that picks another token runs to the limit
    _always(loaded, 5)
    [result] = gen.generate([request])
    assert (result.completion_tokens, result.finish_reason) == (12, "length")


def test_assemble_adds_mean_rows_and_keeps_pretrained_ones(tmp_path):
    tok = plain_bpe()
    n = len(tok)
    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(tiny_text_config("qwen2", vocab_size=n, eos_token_id=tok.eos_token_id))
    lm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    SiglipVisionModel(tiny_vision_config("siglip")).save_pretrained(tmp_path / "vision")

    model, processor = assemble_model(tmp_path / "vision", tmp_path / "llm", seed=0)
    ptok = processor.tokenizer
    assert all(is_single_token(ptok, s) for s in get_template("chatml").special_tokens)
    old_in, old_out = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    new_in = model.language_model.get_input_embeddings().weight
    new_out = model.language_model.get_output_embeddings().weight
    assert new_in.shape[0] == new_out.shape[0] == n + 8 == model.config.text_config.vocab_size
    assert torch.equal(new_in[:n], old_in) and torch.equal(new_out[:n], old_out)  # pretrained rows kept
    known = [i for i in range(n) if i != model.config.image_token_id]
    for new, old in ((new_in, old_in), (new_out, old_out)):
        assert torch.allclose(new[n:], old[known].mean(0).expand(8, -1), atol=1e-6)
    eos = model.generation_config.eos_token_id
    assert ptok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def _train_cfg(tmp_path, **over):
    from bunny.train.config import TinyBackbones, TrainConfig

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": f"s{i}", "conversations": [
        {"from": "human", "value": "what is the red circle?"}, {"from": "gpt", "value": "a red circle."},
        {"from": "human", "value": "and the car?"}, {"from": "gpt", "value": "it is green."}]} for i in range(4)]))
    base = dict(stage="finetune", tune="full", template="chatml", data_path=[data], image_folder=tmp_path,
                output_dir=tmp_path / "run", model_max_length=512, cpu_threads=1, report_to=["jsonl"],
                tiny=TinyBackbones(vision=dict(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2),
                                   text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1),
                                   vocab_size=300))
    base.update(over)
    return TrainConfig(**base)


def test_training_labels_hold_im_end_as_one_id(tmp_path):
    from bunny.train.builder import build_start_model
    from bunny.train.data import build_dataset, read_raw, texts_of
    from bunny.train.distributed import DistInfo

    cfg = _train_cfg(tmp_path)
    samples, issues = read_raw(cfg)
    model, processor, _ = build_start_model(cfg, lambda: texts_of(samples))
    tok = processor.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert is_single_token(tok, "<|im_end|>") and im_end < model.config.text_config.vocab_size
    ds = build_dataset(cfg, samples, issues, processor=processor, template=get_template("chatml"), dist=DistInfo())
    item = ds[0]
    learned = [t for t in item["labels"].tolist() if t != -100]
    assert learned.count(im_end) == 2  # one id per reply, learned right after it
    assert tok.decode(learned) == "a red circle.<|im_end|>it is green.<|im_end|>"
    out = model(input_ids=item["input_ids"][None], labels=item["labels"][None])
    assert torch.isfinite(out.loss)


def _broken_folder(tmp_path):
    """A folder as bunny saved it before template tokens were added: chatml model, tokenizer without them."""
    model, processor = tiny_model(plain_bpe(), family="qwen2")
    folder = save_model(model, processor, tmp_path / "broken")
    plain_bpe().save_pretrained(folder)  # the tokenizer files of the old build
    return folder


def test_loading_a_folder_whose_tokenizer_splits_the_end_token_warns(tmp_path):
    folder = _broken_folder(tmp_path)
    with pytest.warns(TemplateTokenWarning, match=r"broken: the tokenizer splits '<\|im_start\|>', '<\|im_end\|>' "
                                                  r"of chat template 'chatml'.*end token '<\|im_end\|>' is not one"):
        model, processor = bunny.load_model(folder)
    assert not is_single_token(processor.tokenizer, "<|im_end|>")  # loading changes nothing

    # a LoRA run on it cannot add them (the run refers to the base folder): a clear error
    from bunny.train.builder import build_start_model

    cfg = _train_cfg(tmp_path, tiny=None, model_name_or_path=folder, tune="lora")
    with pytest.warns(TemplateTokenWarning), pytest.raises(ValueError, match=r"'<\|im_end\|>'.*LoRA run"):
        build_start_model(cfg, list)
    # a full fine-tune adds them (new rows saved with the model)
    cfg = _train_cfg(tmp_path, tiny=None, model_name_or_path=folder, tune="full")
    with pytest.warns(TemplateTokenWarning):
        model, processor, _ = build_start_model(cfg, list)
    assert is_single_token(processor.tokenizer, "<|im_end|>")


def test_every_template_declares_its_end_token_and_the_test_tokenizers_hold_them():
    from _tiny import tiny_tokenizer
    from _tokenizers import TEMPLATE_SPECIALS

    from bunny.data.templates import TEMPLATES

    tok = tiny_tokenizer("bytelevel")
    for name in TEMPLATES.names():
        template = get_template(name)
        if template.end_token.strip():  # plain's newline is text
            assert template.end_token in template.special_tokens, name
        assert set(template.special_tokens) <= set(TEMPLATE_SPECIALS), name  # tiny test models need no resize
        assert all(is_single_token(tok, s) for s in template.special_tokens), name
