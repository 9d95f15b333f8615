"""The HTTP application: OpenAI's endpoints over the engine, /health, /metrics and the chat page at /.

Every request's text is produced here, above the engine (qwen15.output_text): detokenization, stop strings (a
stop string cancels its sequence in the engine), streaming deltas. A client that disconnects — mid-stream or
while waiting for a whole reply — cancels its sequences, and the engine frees their slots at its next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen15.engine.scheduler import QueueFull
from qwen15.errors import UserError
from qwen15.output_text import OutputText
from qwen15.serve import metrics as prom
from qwen15.serve.protocol import (
    APIError,
    GenerationRequest,
    ServedModel,
    chat_logprobs,
    completion_logprobs,
    error_body,
    parse_chat,
    parse_completion,
    usage,
)
from qwen15.serve.runner import Runner

DISCONNECT_POLL = 0.25  # seconds between checks that a client waiting for a whole reply is still there


def chat_page() -> str:
    return resources.files("qwen15.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


class Choice:
    """One choice of a request as its events arrive: its text and, when asked, its tokens' log-probabilities."""

    def __init__(self, tokenizer, stops):
        self.text = OutputText(tokenizer, stops)
        self.logprobs: list[tuple[int, float, list]] = []
        self.done = False


def create_app(
    runner: Runner, served: ServedModel, *, api_key: str | None = None, max_body: int = 4 * 2**20
) -> FastAPI:
    stats = prom.ServerMetrics()

    async def lifespan(app):
        runner.start(asyncio.get_running_loop())
        yield
        runner.stop()

    app = FastAPI(title="qwen15", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.metrics = stats

    def fail(status: int, body: dict) -> JSONResponse:
        stats.count(stats.errors, status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return fail(e.status, e.body())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return fail(e.status_code, error_body(message, "invalid_request_error", None, code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return fail(500, error_body(f"internal error: {type(e).__name__}: {e}", "server_error", None, None))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise APIError(
                401, "no API key given: send the header 'Authorization: Bearer KEY'", code="invalid_api_key"
            )
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            async for _ in request.stream():  # read it away, so that the client gets to read the answer
                pass
            raise APIError(
                413, f"the request body has {declared} bytes; the limit is {max_body}", code="body_too_large"
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                async for _ in request.stream():
                    pass
                raise APIError(
                    413, f"the request body is over the limit of {max_body} bytes", code="body_too_large"
                )
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(value, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return value

    def check_engine() -> None:
        if runner.error is not None or not runner.alive:
            raise APIError(
                503, "the engine has stopped; see the server's log", type="server_error", code="engine_down"
            )

    # ------------------------------------------------------------------ routes

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(chat_page())

    @app.get("/health")
    async def health():
        if runner.error is not None or not runner.alive:
            return JSONResponse({"status": "error", "detail": repr(runner.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return PlainTextResponse(prom.render(runner, stats), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {
            "id": served.name,
            "object": "model",
            "created": served.created,
            "owned_by": "qwen15",
            "max_model_len": served.max_len,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        if name != served.name:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = parse_chat(await read_json(request), served)
        return await generate(request, req)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = parse_completion(await read_json(request), served)
        return await generate(request, req)

    # ------------------------------------------------------------------ generation

    async def generate(request: Request, req: GenerationRequest):
        check_engine()
        arrival = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()
        ids: list[int] = []
        try:
            for p, prompt in enumerate(req.prompts):
                ids += runner.submit(prompt, req.params, req.n, queue, first=p * req.n)
        except QueueFull as e:
            runner.cancel(ids)
            raise APIError(503, str(e), type="server_error", code="queue_full") from None
        except UserError as e:
            runner.cancel(ids)
            raise APIError(400, str(e), code="invalid_value") from None
        choices = [Choice(served.tokenizer, req.stops) for _ in ids]
        if req.stream:
            return StreamingResponse(
                stream(req, ids, choices, queue, arrival),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        collect = asyncio.ensure_future(collect_all(req, ids, choices, queue, arrival))
        try:
            while True:
                finished, _ = await asyncio.wait({collect}, timeout=DISCONNECT_POLL)
                if finished:
                    break
                if await request.is_disconnected():
                    collect.cancel()
                    runner.cancel(ids)
                    stats.count(stats.requests, "cancelled")
                    return Response(status_code=499)
        except asyncio.CancelledError:
            collect.cancel()
            runner.cancel(ids)
            raise
        stats.count(stats.requests, "ok")
        return JSONResponse(whole_response(req, choices))

    def take(items, req: GenerationRequest, ids: list[int], choices: list[Choice]) -> set[int]:
        """Apply one step's events; the choices that changed."""
        if items is None:
            raise APIError(
                503, f"the engine failed: {runner.error!r}", type="server_error", code="engine_down"
            )
        changed = set()
        for index, event in items:
            c = choices[index]
            if c.done:
                continue
            changed.add(index)
            if event.token is not None:
                c.text.add(event.token)
                if req.logprobs:
                    c.logprobs.append((event.token, event.logprob, event.top or []))
            if c.text.finish is not None:  # a stop string
                runner.cancel([ids[index]])
                c.done = True
            elif event.finish is not None:
                c.text.end(event.finish, event.stop_id)
                c.done = True
        return changed

    async def collect_all(req, ids, choices, queue, arrival) -> None:
        first = True
        while not all(c.done for c in choices):
            take(await queue.get(), req, ids, choices)
            if first:
                stats.ttft.observe(time.monotonic() - arrival)
                first = False

    def prompt_tokens(req: GenerationRequest) -> int:
        return sum(len(p) for p in req.prompts)

    def completion_tokens(choices: list[Choice]) -> int:
        return sum(len(c.text.ids) for c in choices)

    def whole_response(req: GenerationRequest, choices: list[Choice]) -> dict:
        tok = served.tokenizer
        out = []
        for i, c in enumerate(choices):
            finish = c.text.finish if c.text.finish in ("stop", "length") else "stop"
            if req.kind == "chat":
                item = {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text.text},
                    "logprobs": chat_logprobs(tok, c.logprobs) if req.logprobs else None,
                    "finish_reason": finish,
                }
            else:
                item = {
                    "index": i,
                    "text": c.text.text,
                    "logprobs": completion_logprobs(tok, c.logprobs) if req.logprobs else None,
                    "finish_reason": finish,
                }
            out.append(item)
        return {
            "id": req.id,
            "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": served.name,
            "choices": out,
            "usage": usage(prompt_tokens(req), completion_tokens(choices)),
        }

    async def stream(req: GenerationRequest, ids, choices, queue, arrival):
        created = int(time.time())
        chat = req.kind == "chat"
        kind = "chat.completion.chunk" if chat else "text_completion"
        offsets = [0] * len(choices)

        def event(parts: list[dict]) -> str:
            body = {"id": req.id, "object": kind, "created": created, "model": served.name, "choices": parts}
            if req.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def part(i: int, text: str, logprobs: list, finish: str | None) -> dict:
            if chat:
                item = {"index": i, "delta": {"content": text} if text or finish is None else {}}
                item["logprobs"] = (
                    chat_logprobs(served.tokenizer, logprobs) if req.logprobs and logprobs else None
                )
            else:
                item = {"index": i, "text": text}
                item["logprobs"] = (
                    completion_logprobs(served.tokenizer, logprobs, offsets[i])
                    if req.logprobs and logprobs
                    else None
                )
            item["finish_reason"] = finish
            return item

        finished = False
        try:
            if chat:
                yield event(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for i in range(len(choices))
                    ]
                )
            first = True
            while not all(c.done for c in choices):
                items = await queue.get()
                if first:
                    stats.ttft.observe(time.monotonic() - arrival)
                    first = False
                seen = {i: len(choices[i].logprobs) for i in range(len(choices))}
                try:
                    changed = take(items, req, ids, choices)
                except APIError as e:  # the engine failed: say so in the stream, which ends here
                    yield f"data: {json.dumps(e.body())}\n\n"
                    finished = True
                    return
                parts = []
                for i in sorted(changed):
                    c = choices[i]
                    delta = c.text.delta()
                    new_logprobs = c.logprobs[seen[i] :]
                    finish = None
                    if c.done:
                        finish = c.text.finish if c.text.finish in ("stop", "length") else "stop"
                    if delta or finish or new_logprobs:
                        parts.append(part(i, delta, new_logprobs, finish))
                        offsets[i] += len(delta)
                if parts:
                    yield event(parts)
            if req.include_usage:
                body = {
                    "id": req.id,
                    "object": kind,
                    "created": created,
                    "model": served.name,
                    "choices": [],
                    "usage": usage(prompt_tokens(req), completion_tokens(choices)),
                }
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
            stats.count(stats.requests, "ok")
        finally:
            if not finished:
                runner.cancel([sid for sid, c in zip(ids, choices) if not c.done] or ids)
                stats.count(stats.requests, "cancelled")

    return app
