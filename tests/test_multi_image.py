"""Several images in one conversation, and ``--template``, through the user-facing verbs: a two-image
request through the official OpenAI client to a real `bunny serve` on 127.0.0.1, a one-shot
`bunny chat --image a --image b`, and a session that adds an image mid-conversation. Expected
answers come from the same model loaded here (greedy decoding: equal text, equal token counts)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _tiny import tiny_images, tiny_model_folder
from test_serve import KEY, cli_env, data_uri, start_server, wait_healthy

from bunny.data.images import load_image
from bunny.infer.chat import ChatSession
from bunny.infer.generate import GenerationRequest, SamplingParams
from bunny.infer.loading import load_for_inference

QUESTION = "What differs between these pictures?"
TOKENS = 12
TEMPLATE = "bunny"  # not the tiny qwen2 model's own (chatml): the override must change the prompt


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny model folder and two images; `bunny serve --template bunny` and a one-shot two-image
    `bunny chat` start together (start-up is most of their cost)."""
    tmp = tmp_path_factory.mktemp("multi")
    folder = tiny_model_folder(tmp, name="tiny-bunny")
    paths = [tmp / "a.png", tmp / "b.png"]
    tiny_images(1, seed=41)[0].save(paths[0])
    tiny_images(1, seed=42, size=(24, 36))[0].save(paths[1])
    log = tmp / "serve.log"
    server, base = start_server(["--model", str(folder), "--api-key", KEY, "--template", TEMPLATE,
                                 "--max-new-tokens", "64", "--log-level", "warning"], log)
    chat = subprocess.Popen([sys.executable, "-m", "bunny.cli", "chat", "--model", str(folder), "--image", str(paths[0]),
                             "--image", str(paths[1]), "--prompt", QUESTION, "--max-new-tokens", str(TOKENS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env())
    try:
        yield {"folder": folder, "paths": paths, "server": (server, base, log), "chat": chat,
               "gen": load_for_inference(str(folder)), "gen_t": load_for_inference(str(folder), template=TEMPLATE)}
    finally:
        for proc in (server, chat):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def ask(gen, paths, text=QUESTION, tokens=TOKENS):
    content = "".join("<image>\n" for _ in paths) + text
    req = GenerationRequest([{"role": "user", "content": content}], [load_image(p) for p in paths],
                            SamplingParams(max_new_tokens=tokens))
    return gen.generate([req])[0]


def test_two_images_through_the_openai_client(world):
    from openai import OpenAI

    proc, base, log = world["server"]
    wait_healthy(proc, base, log)
    client = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    a, b = (data_uri(p.read_bytes()) for p in world["paths"])
    content = [{"type": "image_url", "image_url": {"url": a}}, {"type": "image_url", "image_url": {"url": b}},
               {"type": "text", "text": QUESTION}]
    reply = client.chat.completions.create(model="tiny-bunny", messages=[{"role": "user", "content": content}],
                                           temperature=0, max_tokens=TOKENS)
    want = ask(world["gen_t"], world["paths"])
    assert reply.choices[0].message.content == want.text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    # both images are in the prompt: one image fewer is one image's tokens fewer
    one = ask(world["gen_t"], world["paths"][:1])
    per_image = want.prompt_tokens - one.prompt_tokens
    assert per_image == world["gen"].model.config.vision_config.image_size ** 2 // (
        world["gen"].model.config.vision_config.patch_size ** 2) + 1  # the patches, plus the "\n" after <image>
    # --template: the server prompts with bunny's template, not the model's own
    assert world["gen"].model.config.chat_template != TEMPLATE
    assert ask(world["gen"], world["paths"]).prompt_tokens != want.prompt_tokens

    # a conversation whose second user turn brings the second image (the API's multi-turn form)
    turns = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": a}},
                                          {"type": "text", "text": "What is this?"}]},
             {"role": "assistant", "content": "A picture."},
             {"role": "user", "content": [{"type": "image_url", "image_url": {"url": b}},
                                          {"type": "text", "text": "And this one?"}]}]
    reply = client.chat.completions.create(model="tiny-bunny", messages=turns, temperature=0, max_tokens=TOKENS)
    session = ChatSession(world["gen_t"], params=SamplingParams(max_new_tokens=TOKENS))
    session.add_image(load_image(world["paths"][0]))
    session.messages = [{"role": "user", "content": "<image>\nWhat is this?"},
                        {"role": "assistant", "content": "A picture."}]
    session.images, session.pending_images = session.pending_images, [load_image(world["paths"][1])]
    assert reply.choices[0].message.content == session.ask("And this one?").text


def test_chat_one_shot_with_two_images(world):
    out, err = world["chat"].communicate(timeout=180)
    assert world["chat"].returncode == 0, err.decode()[-2000:]
    assert out.decode() == ask(world["gen"], world["paths"]).text + "\n"


def test_an_image_added_mid_conversation_continues_it(world):
    gen, (a, b) = world["gen"], world["paths"]
    session = ChatSession(gen, params=SamplingParams(max_new_tokens=TOKENS))
    session.add_image(load_image(a))
    first = session.ask("What is this?").text
    session.add_image(load_image(b))
    second = session.ask("And this one?")
    assert [m["content"] for m in session.messages] == ["<image>\nWhat is this?", first, "<image>\nAnd this one?",
                                                        second.text]
    assert len(session.images) == 2 and not session.pending_images
    # the same conversation as one request: the first turn and both images are in the prompt
    req = GenerationRequest(session.messages[:3], [load_image(a), load_image(b)], SamplingParams(max_new_tokens=TOKENS))
    again = gen.generate([req])[0]
    assert (again.text, again.prompt_tokens) == (second.text, second.prompt_tokens)
    session.reset()
    assert (session.messages, session.images, session.pending_images) == ([], [], [])


@pytest.mark.parametrize("verb", ["chat", "serve", "web"])
def test_an_unknown_template_is_one_error_line(verb, world, capsys):
    from bunny.cli import main

    try:
        code = main([verb, "--model", str(world["folder"]), "--template", "no-such-template"])
    except SystemExit as exc:  # the loader's exit (status 2) after its error line
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error: --template: unknown chat template 'no-such-template'; known: bunny" in err
