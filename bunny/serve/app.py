"""An OpenAI-compatible HTTP API over a Bunny model (FastAPI).

Endpoints: ``POST /v1/chat/completions`` (plain and ``stream: true`` server-sent events, usage
counts), ``GET /v1/models``, ``GET /health``. Images come as ``image_url`` parts holding ``data:``
base64 URIs. Why so strict about input: the server must never fetch a URL or read a server-side
path a client names (unless the operator allows remote URLs), never decode an unbounded image or
an exotic format, and always answer a bad request with a JSON error body the official clients
understand, rather than dropping what it does not support.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from bunny.data.images import ImageError, load_image
from bunny.infer.generate import IMAGE_PLACEHOLDER, GenerationRequest, Generator, SamplingParams
from bunny.serve.batcher import DynamicBatcher, QueueFullError
from bunny.serve.budget import check_prompt_chars, prompt_char_limit

logger = logging.getLogger("bunny.serve")

# MIME type -> the PIL format the bytes must really be (checked on the header, before decoding).
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
               "image/gif": "GIF", "image/bmp": "BMP"}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.S)

# Request fields understood; anything else is refused by name rather than silently ignored.
KNOWN_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                "temperature", "top_p", "stop", "seed", "n", "user", "metadata", "store",
                "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs", "response_format",
                "tools", "tool_choice", "parallel_tool_calls"}


@dataclass
class ServerLimits:
    """Operator-set guards. Sizes are in bytes and pixels."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    max_messages: int = 256
    max_parts: int = 1024
    max_stop_chars: int = 256
    max_new_tokens: int = 1024
    default_max_tokens: int = 256
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0


class APIError(Exception):
    """An error answered with ``{"error": {...}}`` and an HTTP status, as OpenAI's API does."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "server_busy"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body, stopping as soon as it passes ``limit`` (Content-Length may lie or be absent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes, over the limit of {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _fetch_remote(url: str, where: str, limits: ServerLimits) -> tuple[bytes, str]:
    """GET an image URL (operator opted in): no redirects, a timeout, and a byte limit while reading."""
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.remote_timeout_s, follow_redirects=False) as resp:
            if resp.status_code != 200:
                raise APIError(400, f"{where}: fetching the image URL gave HTTP {resp.status_code}", param=where,
                               code="image_fetch_failed")
            mime = resp.headers.get("content-type", "").split(";")[0].strip().lower()
            data = bytearray()
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > limits.max_image_bytes:
                    raise APIError(413, f"{where}: image is over the limit of {limits.max_image_bytes} bytes",
                                   param=where, code="image_too_large")
            return bytes(data), mime
    except httpx.HTTPError as exc:
        raise APIError(400, f"{where}: could not fetch the image URL: {exc}", param=where,
                       code="image_fetch_failed") from exc


def decode_image(url: str, where: str, limits: ServerLimits) -> Image.Image:
    """An ``image_url`` (a base64 ``data:`` URI) -> RGB image, with every guard applied first."""
    m = _DATA_URI.match(url)
    if m is not None:
        mime = (m.group("mime") or "").lower()
        if mime not in IMAGE_TYPES:
            raise APIError(400, f"{where}: unsupported image type {mime or '(none)'}; allowed: "
                           + ", ".join(IMAGE_TYPES), param=where, code="unsupported_image_type")
        if not m.group("b64"):
            raise APIError(400, f"{where}: image data URIs must be base64-encoded", param=where,
                           code="invalid_image_url")
        data = m.group("data")
        if len(data) * 3 // 4 > limits.max_image_bytes:
            raise APIError(413, f"{where}: image is over the limit of {limits.max_image_bytes} bytes", param=where,
                           code="image_too_large")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise APIError(400, f"{where}: invalid base64 data", param=where, code="invalid_image") from exc
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError(400, f"{where}: remote image URLs are disabled on this server; send a data: URI",
                           param=where, code="remote_url_disabled")
        raw, mime = _fetch_remote(url, where, limits)
        if mime not in IMAGE_TYPES:
            raise APIError(400, f"{where}: the URL served {mime or 'no content type'}, not an allowed image type",
                           param=where, code="unsupported_image_type")
    else:
        raise APIError(400, f"{where}: image_url must be a data: URI (base64); server-side paths are never read",
                       param=where, code="invalid_image_url")
    # Identify the real format from the header (no pixel decoding yet): the declared type must
    # be what the bytes are, and PIL's many other decoders are never reached.
    try:
        with Image.open(io.BytesIO(raw), formats=sorted(set(IMAGE_TYPES.values()))) as probe:
            fmt, (w, h) = probe.format, probe.size
    except Image.DecompressionBombError as exc:  # PIL refuses huge headers itself: still "too large"
        raise APIError(413, f"{where}: image is over the limit of {limits.max_image_pixels} pixels ({exc})",
                       param=where, code="image_too_large") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad headers
        raise APIError(400, f"{where}: not a decodable {mime} image", param=where, code="invalid_image") from exc
    if fmt != IMAGE_TYPES[mime]:
        raise APIError(400, f"{where}: declared {mime} but the data is {fmt}", param=where, code="invalid_image")
    if w * h > limits.max_image_pixels:
        raise APIError(413, f"{where}: image is {w}x{h} pixels, over the limit of {limits.max_image_pixels}",
                       param=where, code="image_too_large")
    try:
        return load_image(raw, max_pixels=limits.max_image_pixels)
    except ImageError as exc:
        raise APIError(400, f"{where}: {exc}", param=where, code="invalid_image") from exc


def parse_messages(raw: Any, limits: ServerLimits) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """OpenAI ``messages`` -> template messages with ``<image>`` placeholders, and the images."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    if len(raw) > limits.max_messages:
        raise APIError(400, f"messages has {len(raw)} entries, over this server's limit of {limits.max_messages}",
                       param="messages", code="too_many_messages")
    n_parts = sum(len(m["content"]) for m in raw if isinstance(m, dict) and isinstance(m.get("content"), list))
    if n_parts > limits.max_parts:
        raise APIError(400, f"messages have {n_parts} content parts, over this server's limit of {limits.max_parts}",
                       param="messages", code="too_many_messages")
    messages: list[dict[str, str]] = []
    images: list[Image.Image] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = msg.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role must be system, developer, user or assistant, got {role!r}",
                           param=f"{where}.role")
        if role == "system" and i != 0:
            raise APIError(400, f"{where}: a system message is only allowed first", param=f"{where}.role")
        content = msg.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
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
                images.append(decode_image(url, pw, limits))
                pieces.append(IMAGE_PLACEHOLDER)
            else:
                raise APIError(400, f"{pw}: unsupported part type {part['type']!r} (text, image_url)", param=pw)
        messages.append({"role": role, "content": "\n".join(pieces)})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", param="messages")
    return messages, images


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"{name} must be a number in [{low}, {high}], got {value!r}", param=name)
    return float(value)


def parse_params(body: dict[str, Any], limits: ServerLimits) -> SamplingParams:
    """OpenAI sampling fields -> SamplingParams (OpenAI's defaults: temperature 1, top_p 1).

    Fields that would change the answer but are not implemented are refused, not ignored.
    """
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(400, f"unsupported request field(s): {', '.join(unknown)}", param=unknown[0])
    if body.get("n", 1) not in (1, None):
        raise APIError(400, "only n=1 is supported", param="n")
    if body.get("logprobs"):
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise APIError(400, "tools are not supported", param="tools")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise APIError(400, f"{name} is not supported; use repetition_penalty", param=name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_new_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
    if max_tokens > limits.max_new_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}, over this server's limit of {limits.max_new_tokens}",
                       param="max_tokens")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of at most 4 of them", param="stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise APIError(400, f"each stop string must be at most {limits.max_stop_chars} characters", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed")
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        stop=tuple(stop),
        seed=seed,
    )


def _usage(result: Any) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class RequestPreparer:
    """Raw body -> (body, GenerationRequest), every check applied, cheapest first (runs in a worker
    thread: JSON and image decoding are CPU work). The prompt's length in characters is checked
    before its tokens are counted (see :mod:`bunny.serve.budget`)."""

    def __init__(self, generator: Generator, model_id: str, limits: ServerLimits) -> None:
        self.generator, self.model_id, self.limits = generator, model_id, limits
        self.char_limit = prompt_char_limit(generator.max_positions, generator.tokenizer)

    def __call__(self, raw: bytes) -> tuple[dict[str, Any], GenerationRequest]:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        if body.get("model") not in (None, self.model_id):
            raise APIError(404, f"model {body.get('model')!r} is not served here; this server serves "
                           f"{self.model_id!r}", param="model", code="model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise APIError(400, "stream must be true or false", param="stream")
        params = parse_params(body, self.limits)
        messages, images = parse_messages(body.get("messages"), self.limits)
        request = GenerationRequest(messages, images, params)
        try:
            check_prompt_chars(messages, self.char_limit, self.generator.max_positions)
            self.generator.validate(request)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_prompt") from exc
        return body, request


@dataclass
class _Reply:
    """The fields every response body and stream chunk of one completion shares."""

    model_id: str
    rid: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, result: Any) -> dict[str, Any]:
        return {
            "id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result),
        }

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None,
              usage: dict[str, int] | None = None) -> str:
        obj: dict[str, Any] = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.model_id, "choices": [] if delta is None else
                               [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"


async def _complete(job: Any, reply: _Reply) -> dict[str, Any]:
    """Wait for the whole answer (a client that goes away cancels its generation)."""
    try:
        kind, value = await job.events.get()
        while kind == "text":
            kind, value = await job.events.get()
    except asyncio.CancelledError:
        job.cancel()
        raise
    if kind == "error":
        raise APIError(500, f"generation failed: {value}")
    return reply.completion(value)


async def _stream(job: Any, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, text deltas, the finish chunk (and usage), ``[DONE]``."""
    finished = False
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield reply.chunk({"content": value})
            elif kind == "error":
                err = APIError(500, f"generation failed: {value}").body()
                yield f"data: {json.dumps(err)}\n\n"
                break
            else:
                yield reply.chunk({}, value.finish_reason)
                if include_usage:
                    yield reply.chunk(None, usage=_usage(value))
                break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away: stop generating for it
            job.cancel()


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answered as OpenAI's ``{"error": {...}}`` body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error", exc_info=exc)
        return APIError(500, f"internal error ({type(exc).__name__}); see the server log").response()


def _install_auth(app: FastAPI, api_key: str | None) -> None:
    """``Authorization: Bearer KEY`` on ``/v1/*`` when a key is set (compared in constant time)."""

    @app.middleware("http")
    async def _auth(request: Request, call_next):  # noqa: ANN001, ANN202
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                code="invalid_api_key").response()
        return await call_next(request)


def create_app(batcher: DynamicBatcher, model_id: str, api_key: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI application; ``batcher`` owns the model."""
    limits = limits or ServerLimits()
    prepare = RequestPreparer(batcher.generator, model_id, limits)
    # Parsing (JSON, base64, image decoding, tokenizing) is CPU work done off the event loop, in a
    # few threads of its own: more would not parse faster on a small CPU, and every extra thread
    # grows the process's memory by a malloc arena.
    parsers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bunny-parse")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        parsers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="bunny", version="1", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    _install_error_handlers(app)
    _install_auth(app, api_key)
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, **batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "bunny"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):  # noqa: ANN202
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise APIError(400, "content-type must be application/json")
        raw = await _read_body(request, limits.max_body_bytes)
        body, gen_request = await asyncio.get_running_loop().run_in_executor(parsers, prepare, raw)
        stream = bool(body.get("stream", False))
        try:
            job = batcher.submit(gen_request, stream=stream)
        except QueueFullError as exc:
            raise APIError(503, str(exc), code="queue_full", headers={"Retry-After": "1"}) from exc
        reply = _Reply(model_id)
        if not stream:
            return await _complete(job, reply)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        return StreamingResponse(_stream(job, reply, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
