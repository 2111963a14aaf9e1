"""`bunny web` in real headless Chromium (Debian's package) driven by Playwright: attach an image,
ask, watch the answer stream in, ask a follow-up, attach a second image that continues the
conversation. Every request the page makes must stay on 127.0.0.1. BUNNY_UPDATE_SCREENSHOTS=1 also
writes the screenshot to docs/images/web.png."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _tiny import tiny_images, tiny_model_folder

from bunny.data.images import load_image
from bunny.infer.chat import ChatSession
from bunny.infer.generate import SamplingParams
from bunny.infer.loading import load_for_inference

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW_TOKENS = 48
DOCS_SHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "web.png"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (scripts/setup.sh installs it as root)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUTF8": "1", "TRANSFORMERS_VERBOSITY": "error"}


def shown(text: str) -> str:
    """Text as a browser shows it: control characters dropped, whitespace runs collapsed."""
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    folder = tiny_model_folder(tmp, name="tiny-bunny")
    port = free_port()
    log = tmp / "web.log"
    proc = subprocess.Popen([sys.executable, "-m", "bunny.cli", "web", "--model", str(folder), "--host", "127.0.0.1",
                             "--port", str(port), "--max-new-tokens", str(MAX_NEW_TOKENS)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=cli_env())
    image, image2 = tmp / "photo.png", tmp / "photo2.png"
    tiny_images(1, seed=21)[0].save(image)
    tiny_images(1, seed=22, size=(24, 36))[0].save(image2)
    gen = load_for_inference(str(folder))  # loads while the server starts
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"bunny web exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"bunny web did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield {"url": url, "image": image, "image2": image2, "gen": gen, "tmp": tmp}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


# Records every text the last answer bubble shows while it streams.
OBSERVE = """() => {
  window.__seen = [];
  const record = () => {
    const bots = document.querySelectorAll('#chat [data-testid="bot"]');
    if (bots.length) window.__seen.push(bots[bots.length - 1].innerText);
  };
  new MutationObserver(record).observe(document.querySelector('#chat'),
                                       {subtree: true, childList: true, characterData: true});
}"""
LAST_BOT = """() => { const b = document.querySelectorAll('#chat [data-testid="bot"]');
                      return b.length ? b[b.length - 1].innerText : null; }"""


def test_upload_ask_and_watch_the_answer_stream(web):
    from playwright.sync_api import sync_playwright

    session = ChatSession(web["gen"], params=SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    session.add_image(load_image(web["image"]))
    first = session.ask("What is in this picture?").text
    second = session.ask("What colour is it?").text
    session.add_image(load_image(web["image2"]))  # an upload later in the conversation continues it
    third = session.ask("And this one?").text
    offsite: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 860})

            def loopback_only(route):
                if route.request.url.startswith(("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:")):
                    route.continue_()
                else:
                    offsite.append(route.request.url)
                    route.abort()

            page.route("**/*", loopback_only)
            page.goto(web["url"], wait_until="domcontentloaded")
            page.wait_for_selector("#input textarea", timeout=60_000)
            page.evaluate(OBSERVE)
            page.set_input_files("#input input[type=file]", str(web["image"]))
            page.fill("#input textarea", "What is in this picture?")
            page.click("#input [data-testid=submit-button]")
            page.wait_for_function(f"() => ({LAST_BOT})() !== null && ({LAST_BOT})().trim().length >= "
                                   f"{len(shown(first))}", timeout=60_000)
            page.wait_for_selector("#input textarea:not([disabled])", timeout=60_000)
            assert shown(page.evaluate(LAST_BOT)) == shown(first)
            seen = [shown(t) for t in page.evaluate("window.__seen") if shown(t)]
            partial = {t for t in seen if t != shown(first)}
            assert partial and all(shown(first).startswith(t) for t in partial), seen  # it streamed
            assert page.locator("#chat [data-testid=user] img").count() == 1  # the uploaded image is shown

            page.fill("#input textarea", "What colour is it?")
            page.click("#input [data-testid=submit-button]")
            page.wait_for_function(f"() => document.querySelectorAll('#chat [data-testid=\"bot\"]').length == 2 && "
                                   f"({LAST_BOT})().trim().length >= {len(shown(second))}", timeout=60_000)
            page.wait_for_selector("#input textarea:not([disabled])", timeout=60_000)
            assert shown(page.evaluate(LAST_BOT)) == shown(second)  # the follow-up saw the conversation

            page.set_input_files("#input input[type=file]", str(web["image2"]))
            page.fill("#input textarea", "And this one?")
            page.click("#input [data-testid=submit-button]")
            page.wait_for_function(f"() => document.querySelectorAll('#chat [data-testid=\"bot\"]').length == 3 && "
                                   f"({LAST_BOT})().trim().length >= {len(shown(third))}", timeout=60_000)
            page.wait_for_selector("#input textarea:not([disabled])", timeout=60_000)
            assert shown(page.evaluate(LAST_BOT)) == shown(third)  # both images and every turn were in the prompt
            assert page.locator("#chat [data-testid=user] img").count() == 2  # the first image stays shown
            shot = web["tmp"] / "web.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not offsite, f"the page tried to reach {offsite}"
    if os.environ.get("BUNNY_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SHOT)
