"""An OpenAI-compatible HTTP API over a Bunny model (FastAPI).

Endpoints: ``POST /v1/chat/completions`` (plain and ``stream: true`` server-sent events, usage
counts), ``GET /v1/models``, ``GET /health``. Images come as ``image_url`` parts holding ``data:``
base64 URIs. Why so strict about input: the server must never fetch a URL or read a server-side
path a client names (unless the operator allows remote URLs), never decode an unbounded image,
and always answer a bad request with a JSON error body the official clients understand.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from bunny.data.images import ImageError, load_image
from bunny.infer.generate import IMAGE_PLACEHOLDER, GenerationRequest, SamplingParams
from bunny.serve.batcher import DynamicBatcher, QueueFullError

ALLOWED_IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


@dataclass
class ServerLimits:
    """Operator-set guards. Sizes are in bytes and pixels."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    max_new_tokens: int = 1024
    allow_remote_images: bool = False


class APIError(Exception):
    """An error answered with ``{"error": {...}}`` and an HTTP status, as OpenAI's API does."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "request_too_large", 503: "server_busy"}.get(self.status, "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body, stopping as soon as it passes ``limit`` (Content-Length may lie or be absent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_image(url: str, where: str, limits: ServerLimits) -> Image.Image:
    m = _DATA_URI.match(url)
    if m is None:
        if url.startswith(("http://", "https://")):
            raise APIError(400, f"{where}: remote image URLs are disabled on this server; send a data: URI",
                           param=where, code="remote_url_disabled")
        raise APIError(400, f"{where}: image_url must be a data: URI (base64); server-side paths are never read",
                       param=where, code="invalid_image_url")
    mime = (m.group("mime") or "").lower()
    if mime not in ALLOWED_IMAGE_TYPES:
        raise APIError(400, f"{where}: unsupported image type {mime or '(none)'}; allowed: "
                       + ", ".join(ALLOWED_IMAGE_TYPES), param=where, code="unsupported_image_type")
    if not m.group("b64"):
        raise APIError(400, f"{where}: image data URIs must be base64-encoded", param=where)
    data = m.group("data")
    if len(data) * 3 // 4 > limits.max_image_bytes:
        raise APIError(413, f"{where}: image is over the limit of {limits.max_image_bytes} bytes", param=where)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"{where}: invalid base64 data", param=where) from exc
    try:
        return load_image(raw, max_pixels=limits.max_image_pixels)
    except ImageError as exc:
        if "over the limit" in str(exc):
            raise APIError(413, f"{where}: {exc}", param=where) from exc
        raise APIError(400, f"{where}: {exc}", param=where, code="invalid_image") from exc


def parse_messages(raw: Any, limits: ServerLimits) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """OpenAI ``messages`` -> template messages with ``<image>`` placeholders, and the images."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    messages: list[dict[str, str]] = []
    images: list[Image.Image] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = msg.get("role")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role must be system, user or assistant, got {role!r}", param=f"{where}.role")
        content = msg.get("content")
        if isinstance(content, str):
            if IMAGE_PLACEHOLDER in content:
                raise APIError(400, f"{where}.content: send images as image_url parts, not {IMAGE_PLACEHOLDER}",
                               param=f"{where}.content")
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        pieces: list[str] = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(part, dict) or "type" not in part:
                raise APIError(400, f"{pw} must be an object with a type", param=pw)
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise APIError(400, f"{pw}.text must be a string", param=pw)
                if IMAGE_PLACEHOLDER in text:
                    raise APIError(400, f"{pw}: send images as image_url parts, not {IMAGE_PLACEHOLDER}", param=pw)
                pieces.append(text)
            elif part["type"] == "image_url":
                if role != "user":
                    raise APIError(400, f"{pw}: images are accepted in user messages only", param=pw)
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str):
                    raise APIError(400, f"{pw}.image_url.url must be a string", param=pw)
                if len(images) >= limits.max_images:
                    raise APIError(400, f"{pw}: at most {limits.max_images} images per request", param=pw)
                images.append(_decode_image(url, pw, limits))
                pieces.append(IMAGE_PLACEHOLDER)
            else:
                raise APIError(400, f"{pw}: unsupported part type {part['type']!r} (text, image_url)", param=pw)
        messages.append({"role": role, "content": "\n".join(pieces)})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", param="messages")
    return messages, images


def parse_params(body: dict[str, Any], limits: ServerLimits) -> SamplingParams:
    """OpenAI sampling fields -> SamplingParams (OpenAI's defaults: temperature 1, top_p 1)."""
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or min(256, limits.max_new_tokens)
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    try:
        max_tokens = int(max_tokens)
        if max_tokens > limits.max_new_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}, over the limit of {limits.max_new_tokens}",
                           param="max_tokens")
        seed = body.get("seed")
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0),
            top_p=float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0),
            repetition_penalty=float(body.get("repetition_penalty") or 1.0),
            stop=tuple(stop),
            seed=int(seed) if seed is not None else None,
        )
    except (TypeError, ValueError) as exc:
        raise APIError(400, f"invalid sampling parameter: {exc}") from exc


def create_app(batcher: DynamicBatcher, model_id: str, api_key: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI application; ``batcher`` owns the model."""
    limits = limits or ServerLimits()
    app = FastAPI(title="bunny", version="1")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):  # noqa: ANN001
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return APIError(401, "missing or invalid API key", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "queued": batcher.queued}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "bunny"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):  # noqa: ANN202
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise APIError(400, "content-type must be application/json")
        raw = await _read_body(request, limits.max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        messages, images = parse_messages(body.get("messages"), limits)
        params = parse_params(body, limits)
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        try:
            job = batcher.submit(GenerationRequest(messages, images, params), stream=stream)
        except QueueFullError as exc:
            raise APIError(503, str(exc), code="queue_full") from exc
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if not stream:
            kind, value = await job.events.get()
            while kind == "text":
                kind, value = await job.events.get()
            if kind == "error":
                raise APIError(500, f"generation failed: {value}")
            return {
                "id": rid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": value.text},
                             "finish_reason": value.finish_reason}],
                "usage": {"prompt_tokens": value.prompt_tokens, "completion_tokens": value.completion_tokens,
                          "total_tokens": value.prompt_tokens + value.completion_tokens},
            }

        def chunk(delta: dict[str, Any], finish: str | None, usage: dict[str, int] | None = None,
                  choices: bool = True) -> str:
            obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield chunk({"content": value}, None)
                elif kind == "error":
                    yield f"data: {json.dumps({'error': {'message': f'generation failed: {value}', 'type': 'server_error'}})}\n\n"
                    break
                else:
                    yield chunk({}, value.finish_reason)
                    if include_usage:
                        usage = {"prompt_tokens": value.prompt_tokens, "completion_tokens": value.completion_tokens,
                                 "total_tokens": value.prompt_tokens + value.completion_tokens}
                        yield chunk({}, None, usage=usage, choices=False)
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
