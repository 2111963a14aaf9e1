"""Batched generation (bunny.infer.generate): left padding, per-row limits and stop strings, end
tokens, streaming, sampling controls, quantisation, and the multi-turn chat session."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_images, tiny_model, tiny_model_folder

from bunny.infer.chat import ChatSession
from bunny.infer.generate import GenerationRequest, Generator, SamplingParams
from bunny.infer.loading import load_for_inference, quantize_bnb

GREEDY = SamplingParams(max_new_tokens=20)


def user(text: str, image: bool = False) -> list[dict[str, str]]:
    return [{"role": "user", "content": ("<image>\n" if image else "") + text}]


@pytest.fixture(scope="module")
def gen() -> Generator:
    model, processor = tiny_model()
    return Generator(model, processor)


@pytest.fixture(scope="module")
def requests_mixed() -> list[GenerationRequest]:
    """Rows of different prompt lengths, with and without an image: left padding differs per row."""
    imgs = tiny_images(3, seed=3)
    return [
        GenerationRequest(user("What is in this picture?", True), [imgs[0]], GREEDY),
        GenerationRequest(user("describe the red car on the left of the house, and the tree"), [], GREEDY),
        GenerationRequest(user("left?", True), [imgs[1]], GREEDY),
        GenerationRequest([{"role": "system", "content": "Be short."}, *user("two images", True),
                           {"role": "assistant", "content": "ok"}, *user("and this one?", True)], imgs[1:], GREEDY),
    ]


def reference_greedy(gen: Generator, req: GenerationRequest) -> tuple[str, int]:
    """The same prompt through plain ``model.generate`` (batch of one), cut at the first end id."""
    text = gen.processor.render(req.messages)
    inputs = gen.processor(text=[text], images=req.images or None, return_tensors="pt")
    out = gen.model.generate(**inputs, max_new_tokens=req.params.max_new_tokens, do_sample=False,
                             eos_token_id=sorted(gen.end_ids), pad_token_id=gen.tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    for i, tok in enumerate(new):
        if tok in gen.end_ids:
            new = new[:i]
            break
    return gen.tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_batched_greedy_equals_one_by_one_and_plain_generate(gen, requests_mixed):
    batched = gen.generate(requests_mixed)
    assert len(batched) == len(requests_mixed)
    for req, res in zip(requests_mixed, batched):
        alone = gen.generate([req])[0]
        assert res == alone  # left padding changes nothing
        text, n = reference_greedy(gen, req)
        assert res.text == text and res.completion_tokens == n
        assert res.prompt_tokens == len(gen.processor.encode(gen.processor.render(req.messages)))
        assert res.prompt_tokens == gen.count_prompt_tokens(req)
        assert res.finish_reason == ("length" if n == req.params.max_new_tokens else "stop")
    assert len({r.text for r in batched}) == len(batched)  # the rows really are different answers


def test_rows_keep_their_own_token_limits(gen, requests_mixed):
    reqs = [GenerationRequest(r.messages, r.images, SamplingParams(max_new_tokens=n))
            for r, n in zip(requests_mixed, (3, 11, 1, 7))]
    full = gen.generate(requests_mixed)
    for req, res, long in zip(reqs, gen.generate(reqs), full):
        assert res.completion_tokens == req.params.max_new_tokens and res.finish_reason == "length"
        assert long.text.startswith(res.text)


def test_stop_strings_cut_each_row_and_stream_consistently(gen, requests_mixed):
    full = [r.text for r in gen.generate(requests_mixed)]
    stops = []
    for text in full:  # a stop string that occurs in the middle of each greedy answer
        start = next(i for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 3])
        stops.append(text[start:start + 3])
    reqs = [GenerationRequest(r.messages, r.images, SamplingParams(max_new_tokens=20, stop=(s, "never-there")))
            for r, s in zip(requests_mixed, stops)]
    reqs[3] = requests_mixed[3]  # a row without stop strings in the same batch is unaffected
    deltas: dict[int, list[str]] = {i: [] for i in range(len(reqs))}
    results = gen.generate(reqs, on_text=lambda row, d: deltas[row].append(d))
    for i, (res, text, stop) in enumerate(zip(results, full, stops)):
        if i == 3:
            assert res.text == text
        else:
            assert res.text == text[:text.index(stop)] and res.finish_reason == "stop"
            assert res.completion_tokens < 20
        assert "".join(deltas[i]) == res.text  # streamed pieces add up to the answer
        assert len(deltas[i]) > 1 or len(res.text) <= 1  # ... and came as several pieces


def test_end_token_ends_a_row_and_special_stop_strings_become_end_ids():
    model, processor = tiny_model()
    gen = Generator(model, processor)
    req = GenerationRequest(user("What is in this picture?", True), tiny_images(1), GREEDY)
    tokens = gen.processor.tokenizer.encode(gen.generate([req])[0].text, add_special_tokens=False)
    # Make the 4th generated token an end token: the answer must stop right before it.
    end_tok = tokens[3]
    assert end_tok not in tokens[:3]
    model.generation_config.eos_token_id = [end_tok]
    res = Generator(model, processor).generate([req])[0]
    assert res.finish_reason == "stop" and res.completion_tokens == 3
    assert res.text == processor.tokenizer.decode(tokens[:3])
    # A stop string that is one special token is matched as a token, not in the decoded text.
    texts, ids = gen._row_stops(SamplingParams(stop=("<|im_end|>", "\n\n")))
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert texts == ("\n\n",) and im_end in ids


def test_sampling_controls(gen, requests_mixed):
    req = requests_mixed[0]
    greedy = gen.generate([req])[0].text

    def sample(**kw):
        return gen.generate([GenerationRequest(req.messages, req.images, SamplingParams(max_new_tokens=20, **kw))])[0]

    # top_p -> 0 keeps only the most likely token: sampling becomes greedy.
    assert sample(temperature=1.0, top_p=1e-6, seed=1).text == greedy
    drawn = [sample(temperature=1.5, seed=s).text for s in range(3)]
    assert drawn[0] == sample(temperature=1.5, seed=0).text  # a seed makes sampling reproducible
    assert any(t != greedy for t in drawn)
    assert sample(repetition_penalty=5.0).text != greedy  # the tiny model repeats itself: the penalty shows


def test_batch_rules_and_bad_requests(gen, requests_mixed):
    a, b = requests_mixed[0], requests_mixed[1]
    hot = GenerationRequest(b.messages, b.images, SamplingParams(temperature=0.7))
    with pytest.raises(ValueError, match="share temperature"):
        gen.generate([a, hot])
    seeded = SamplingParams(temperature=0.7, seed=3)
    assert seeded.batch_key() is None and GREEDY.batch_key() == SamplingParams(max_new_tokens=3, stop=("x",)).batch_key()
    with pytest.raises(ValueError, match="request 1: 1 <image> placeholder"):
        gen.generate([b, GenerationRequest(a.messages, [], GREEDY)])
    with pytest.raises(ValueError, match="context of 512"):
        gen.validate(GenerationRequest(user("hello " * 300), [], SamplingParams(max_new_tokens=400)))
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"stop": "x"}, {"stop": ("",)}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_chat_session_multi_turn_and_image_switch(gen):
    img1, img2 = tiny_images(2, seed=5)
    session = ChatSession(gen, params=SamplingParams(max_new_tokens=8))
    session.set_image(img1)
    streamed: list[str] = []
    first = session.ask("What is it?", on_text=streamed.append)
    assert "".join(streamed) == first.text
    second = session.ask("And the colour?")
    expected_msgs = [*user("What is it?", True), {"role": "assistant", "content": first.text}, *user("And the colour?")]
    direct = gen.generate([GenerationRequest(expected_msgs, [img1], SamplingParams(max_new_tokens=8))])[0]
    assert second.text == direct.text and second.prompt_tokens > first.prompt_tokens
    session.set_image(img2)  # a new image starts a new conversation
    third = session.ask("What is it?")
    assert session.messages[0]["content"] == "<image>\nWhat is it?" and len(session.messages) == 2
    assert third.text == gen.generate([GenerationRequest(user("What is it?", True), [img2],
                                                         SamplingParams(max_new_tokens=8))])[0].text


def _first_logits(model, processor, req):
    inputs = processor(text=[processor.render(req.messages)], images=req.images, return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits[0, -1].float()


def test_int8_dynamic_quantisation_from_a_folder(tmp_path):
    folder = tiny_model_folder(tmp_path)
    quant = load_for_inference(str(folder), quantize="int8")
    lin = quant.model.language_model.model.layers[0].mlp.up_proj
    assert type(lin).__module__.startswith("torch.ao.nn.quantized.dynamic")
    req = GenerationRequest(user("What is in this picture?", True), tiny_images(1), GREEDY)
    ref = _first_logits(*tiny_model(), req)  # the same seeded weights, in float
    got = _first_logits(quant.model, quant.processor, req)
    assert torch.allclose(ref, got, atol=0.05 * ref.abs().max().item())  # close, not equal: int8 weights
    assert not torch.equal(ref, got)
    assert quant.generate([req])[0].completion_tokens > 0
    with pytest.raises(ValueError, match="needs CUDA"):
        load_for_inference(str(folder), quantize="int4", device="cpu")


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_layers_swap(bits):
    """The CUDA path's layer swap, run on CPU (bitsandbytes has CPU kernels); the CLI uses it on CUDA only."""
    bnb = pytest.importorskip("bitsandbytes")
    model, processor = tiny_model()
    req = GenerationRequest(user("What is in this picture?", True), tiny_images(1), GREEDY)
    ref = _first_logits(model, processor, req)
    quantize_bnb(model, bits, device="cpu", compute_dtype=torch.float32)
    layer = model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit)
    assert isinstance(model.language_model.lm_head, torch.nn.Linear)  # the head stays in float
    got = _first_logits(model, processor, req)
    assert torch.allclose(ref, got, atol=0.25 * ref.abs().max().item()) and not torch.equal(ref, got)
    assert Generator(model, processor).generate([req])[0].completion_tokens > 0



def test_cli_loader_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    import argparse

    from bunny.infer.loading import load_from_args

    args = argparse.Namespace(model=str(tmp_path / "missing"), dtype=None, device=None, quantize="none",
                              trust_remote_code=False)
    with pytest.raises(SystemExit) as exc:
        load_from_args(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and err.count("\n") == 1
