"""`bunny chat` as users run it: an interactive multi-turn session in a real terminal (a pty) with
`/image` adding a second image mid-conversation, and the same session fed through a pipe. Both
processes start together (their start-up is most of the cost) and their transcripts must match the
Python ChatSession."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from _tiny import tiny_images, tiny_model_folder

from bunny.data.images import load_image
from bunny.infer.chat import ChatSession
from bunny.infer.generate import SamplingParams
from bunny.infer.loading import load_for_inference

TOKENS = 10


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUTF8": "1", "TRANSFORMERS_VERBOSITY": "error"}


class Terminal:
    """A process on a pseudo-terminal: what it writes is read back; what we type is sent as keystrokes."""

    def __init__(self, cmd: list[str], stderr_path) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=stderr_path.open("w"), env=cli_env(),
                                     close_fds=True)
        os.close(slave)
        self.buffer = b""

    def read_until(self, marker: bytes, count: int, timeout: float = 180) -> None:
        """Read until ``marker`` has appeared ``count`` times in the whole transcript."""
        deadline = time.monotonic() + timeout
        while self.buffer.count(marker) < count:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"waited for {marker!r} x{count}; transcript:\n{self.buffer.decode(errors='replace')}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.buffer += os.read(self.master, 65536)
                except OSError:  # the process closed the terminal
                    pass

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> None:
        try:
            self.proc.wait(timeout=30)
            while select.select([self.master], [], [], 0.2)[0]:  # what it wrote before exiting
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.buffer += chunk
        finally:
            os.close(self.master)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    folder = tiny_model_folder(tmp, name="tiny-bunny")
    first, second = tmp / "first.png", tmp / "second.png"
    tiny_images(1, seed=31)[0].save(first)
    tiny_images(1, seed=32, size=(24, 36))[0].save(second)
    base = [sys.executable, "-m", "bunny.cli", "chat", "--model", str(folder), "--image", str(first),
            "--max-new-tokens", str(TOKENS)]
    term = Terminal(base, tmp / "tty.err")
    piped = subprocess.Popen(base, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    gen = load_for_inference(str(folder))
    # The expected transcript, from the same conversation in Python.
    chat = ChatSession(gen, params=SamplingParams(max_new_tokens=TOKENS))
    chat.add_image(load_image(first))
    answers = [chat.ask("What is in this picture?").text]
    chat.add_image(load_image(second))  # a second image continues the conversation
    answers += [chat.ask("Describe it.").text, chat.ask("Anything else?").text]
    assert len(chat.images) == 2 and len(chat.messages) == 6
    yield {"term": term, "piped": piped, "answers": answers, "first": first, "second": second, "tmp": tmp}
    for proc in (term.proc, piped):
        if proc.poll() is None:
            proc.kill()


def test_interactive_session_in_a_terminal(sessions):
    term, answers, second = sessions["term"], sessions["answers"], sessions["second"]
    term.read_until(b"USER: ", 1)
    term.type("What is in this picture?")
    term.read_until(b"USER: ", 2)
    term.type(f"/image {second}")
    term.read_until(b"USER: ", 3)
    term.type("Describe it.")
    term.read_until(b"USER: ", 4)
    term.type("Anything else?")
    term.read_until(b"USER: ", 5)
    term.type("/exit")
    term.close()
    assert term.proc.returncode == 0, (sessions["tmp"] / "tty.err").read_text()[-2000:]
    out = term.buffer.decode().replace("\r\n", "\n")
    assert out.startswith("Type a question; /image PATH adds an image")
    # the terminal echoes what was typed; each answer follows an ASSISTANT: prompt and ends the line
    assert f"What is in this picture?\nASSISTANT: {answers[0]}\nUSER: " in out
    assert f"/image {second}\n(image: {second}; the next question sees it)\nUSER: " in out
    assert f"Describe it.\nASSISTANT: {answers[1]}\nUSER: " in out
    assert out.endswith(f"Anything else?\nASSISTANT: {answers[2]}\nUSER: /exit\n")


def test_session_through_a_pipe(sessions):
    piped, answers, second = sessions["piped"], sessions["answers"], sessions["second"]
    script = (f"What is in this picture?\n/image {second}\n/image /no/such/file.png\n/frobnicate\n\n"
              f"{'tell me more ' * 200}\nDescribe it.\nAnything else?\n")
    out, err = piped.communicate(script.encode(), timeout=180)
    assert piped.returncode == 0, err.decode()[-2000:]
    lines = out.decode()
    assert lines.startswith(f"{answers[0]}\n(image: {second}; the next question sees it)\nerror: /no/such/file.png")
    tail = lines[lines.index("error: unknown command"):].split("\n", 2)
    assert tail[0] == "error: unknown command /frobnicate (/image PATH, /reset, /exit)"
    # a question that does not fit the model's context is refused; the conversation goes on
    assert re.fullmatch(r"error: the prompt is \d+ tokens .* context of 512 tokens \(/reset starts over\)", tail[1])
    assert tail[2] == f"{answers[1]}\n{answers[2]}\n"
    assert "USER:" not in lines and "ASSISTANT:" not in lines  # no prompts when nobody is typing
