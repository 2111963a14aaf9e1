"""A Gradio chat page: upload images, ask, watch the answer stream in.

Uploads continue the conversation: an image attached to a later message joins the earlier ones and
the next answer sees them all, with the whole conversation ("New conversation" starts over).

The page keeps one :class:`bunny.infer.chat.ChatSession` per browser session (``gr.State``), so
the conversation logic is the same code ``bunny chat`` uses. Generation runs in a worker thread
and the page is updated from a queue, because Gradio streams by iterating a Python generator.
Answers are shown as plain text (no Markdown/HTML rendering): what the model wrote is what the
user sees.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

from bunny.data.images import ImageError, load_image
from bunny.infer.chat import ChatSession
from bunny.infer.generate import Generator, SamplingParams

TITLE = "bunny"
# Gradio reports usage to a remote server unless told not to; this page talks to nobody but its user.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def build_page(generator: Generator, params: SamplingParams | None = None, max_image_pixels: int = 4096 * 4096):
    """The ``gr.Blocks`` page (not launched)."""
    import gradio as gr

    params = params or SamplingParams(max_new_tokens=256)

    def respond(message: dict[str, Any] | None, history: list[dict[str, Any]] | None, session: ChatSession | None
                ) -> Iterator[tuple[Any, list[dict[str, Any]], ChatSession]]:
        session = session or ChatSession(generator, params=params)
        text = ((message or {}).get("text") or "").strip()
        files = (message or {}).get("files") or []
        history = list(history or [])
        for f in files:
            path = f if isinstance(f, str) else f.get("path")
            try:
                image = load_image(path, max_pixels=max_image_pixels)
            except ImageError as exc:
                history.append({"role": "assistant", "content": f"Could not use that image: {exc}"})
                yield gr.MultimodalTextbox(value=None), history, session
                return
            session.add_image(image)  # the conversation goes on; the next question sees this image too
            history.append({"role": "user", "content": {"path": path}})
        if not text:
            yield gr.MultimodalTextbox(value=None), history, session
            return
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": ""})
        deltas: queue.Queue[str | None] = queue.Queue()
        error: list[BaseException] = []

        def work() -> None:
            try:
                session.ask(text, on_text=deltas.put)
            except Exception as exc:  # noqa: BLE001 - shown on the page
                error.append(exc)
            finally:
                deltas.put(None)

        threading.Thread(target=work, daemon=True).start()
        answer = ""
        while (delta := deltas.get()) is not None:
            answer += delta
            history[-1] = {"role": "assistant", "content": answer}
            yield gr.MultimodalTextbox(value=None, interactive=False), history, session
        if error:
            history[-1] = {"role": "assistant", "content": f"Generation failed: {error[0]}"}
        elif not answer:
            history[-1] = {"role": "assistant", "content": "(empty answer)"}
        yield gr.MultimodalTextbox(value=None, interactive=True), history, session

    def clear() -> tuple[list, None]:
        return [], None

    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(f"## {TITLE} · {generator.model_id}\nAttach images with the paperclip, then ask about them. "
                    "Images attached later join the conversation.")
        chatbot = gr.Chatbot(height=480, elem_id="chat", label=generator.model_id, render_markdown=False,
                             sanitize_html=True)
        box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", elem_id="input", show_label=False,
                                   placeholder="Ask about the images…", sources=["upload"])
        reset = gr.Button("New conversation", elem_id="reset")
        state = gr.State(None)
        box.submit(respond, [box, chatbot, state], [box, chatbot, state])
        reset.click(clear, None, [chatbot, state])
    return page
