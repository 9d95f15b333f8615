"""OpenAI's wire format: request bodies checked into generation requests, and the response and error shapes.

Status codes, as they apply: 422 when the JSON is not a request of this endpoint's shape (a required field
missing, a field of the wrong type), 400 when it is but a value is not allowed (out of range, unknown role,
more than the context holds, malformed JSON), 404 an unknown model, 413 a body over the size limit, 401 a wrong
or missing API key, 503 a full queue. Every error body is {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field

from qwen15.engine.sampler import MAX_LOGPROBS
from qwen15.engine.scheduler import SequenceParams
from qwen15.errors import UserError
from qwen15.sampling import SamplingParams

MAX_N = 16
MAX_STOPS = 16
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered to the client (and the server carries on)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ServedModel:
    """What the endpoints need to know about the model behind them."""

    name: str
    tokenizer: object
    max_len: int  # prompt + completion tokens of one sequence
    chat_sampling: SamplingParams
    completion_sampling: SamplingParams
    chat_stop_ids: frozenset[int]
    completion_stop_ids: frozenset[int]
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class GenerationRequest:
    kind: str  # "chat" or "completion"
    prompts: list[list[int]]
    n: int
    params: SequenceParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    id: str = ""

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        self.id = prefix + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------------------------------------- fields

_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array"}


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _field(body: dict, key: str, kind, *, required: bool = False, param: str | None = None):
    """body[key] checked against kind: str, bool, int, float (int accepted), list, dict, or a tuple of them."""
    param = param or key
    if body.get(key) is None:
        if required:
            raise APIError(
                422, f"missing required parameter '{param}'", param=param, code="missing_required_parameter"
            )
        return None
    value = body[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if k is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if k is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if k not in (int, float) and isinstance(value, k):
            return value
    want = " or ".join(_TYPE_NAMES.get(k, "an object") for k in kinds)
    raise APIError(
        422,
        f"invalid type for '{param}': expected {want}, got {_type_name(value)}",
        param=param,
        code="invalid_type",
    )


def _value_error(param: str, message: str) -> APIError:
    return APIError(400, f"'{param}': {message}", param=param, code="invalid_value")


def check_model(body: dict, served: ServedModel) -> None:
    name = _field(body, "model", str)
    if name is not None and name != served.name:
        raise APIError(
            404,
            f"the model '{name}' does not exist; this server serves '{served.name}' (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _sampling(body: dict, base: SamplingParams) -> SamplingParams:
    temperature = _field(body, "temperature", float)
    top_p = _field(body, "top_p", float)
    top_k = _field(body, "top_k", int)
    penalty = _field(body, "repetition_penalty", float)
    if temperature is not None and not 0 <= temperature <= 2:
        raise _value_error("temperature", f"must be between 0 and 2 (0 = greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise _value_error("top_p", f"must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < -1:
        raise _value_error("top_k", f"must be >= 0 (0 or -1 = off), got {top_k}")
    if penalty is not None and not penalty > 0:
        raise _value_error("repetition_penalty", f"must be > 0 (1 = off), got {penalty}")
    for key in ("presence_penalty", "frequency_penalty"):
        value = _field(body, key, float)
        if value:
            raise _value_error(key, "is not supported; use repetition_penalty (1 = off)")
    return SamplingParams(
        temperature=base.temperature if temperature is None else temperature,
        top_k=base.top_k if top_k is None else max(0, top_k),
        top_p=base.top_p if top_p is None else top_p,
        repetition_penalty=base.repetition_penalty if penalty is None else penalty,
    )


def _stops(body: dict) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list))
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOPS:
        raise _value_error("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            raise APIError(
                422, f"invalid type for 'stop[{i}]': expected a string", param="stop", code="invalid_type"
            )
    return tuple(s for s in stops if s)


def _unsupported(body: dict) -> None:
    if body.get("tools") or body.get("functions"):
        raise _value_error("tools", "tool calling is not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise _value_error("response_format", "only {'type': 'text'} is supported")
    if body.get("echo"):
        raise _value_error("echo", "is not supported")
    if body.get("suffix") is not None:
        raise _value_error("suffix", "is not supported")
    best_of = _field(body, "best_of", int)
    if best_of is not None and best_of != (_field(body, "n", int) or 1):
        raise _value_error("best_of", "is not supported (only best_of = n)")


def _common(
    body: dict, served: ServedModel, kind: str, prompts: list[list[int]], logprobs: int | None, stop_ids
) -> GenerationRequest:
    n = _field(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise _value_error("n", f"must be between 1 and {MAX_N}, got {n}")
    stream = bool(_field(body, "stream", bool))
    options = _field(body, "stream_options", dict)
    if options is not None and not stream:
        raise _value_error("stream_options", "is only allowed with stream: true")
    include_usage = bool(
        options and _field(options, "include_usage", bool, param="stream_options.include_usage")
    )
    base = served.chat_sampling if kind == "chat" else served.completion_sampling
    sampling = _sampling(body, base)
    seed = _field(body, "seed", int)
    if seed is not None and not 0 <= seed < 2**63:
        raise _value_error("seed", "must be a non-negative 64-bit integer")
    if seed is None and not sampling.greedy:
        seed = secrets.randbelow(2**31)  # every sequence draws from its own generator (same on every TP rank)
    max_tokens = _field(body, "max_completion_tokens", int) if kind == "chat" else None
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int)
    param = "max_tokens"
    longest = max(map(len, prompts))
    for ids in prompts:
        if not ids:
            raise _value_error("prompt" if kind == "completion" else "messages", "the prompt is empty")
        if len(ids) >= served.max_len:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens, but this server's context is {served.max_len} tokens "
                "(prompt and completion together); shorten it",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
    if max_tokens is None:
        max_tokens = served.max_len - longest
    elif max_tokens < 1:
        raise _value_error(param, f"must be at least 1, got {max_tokens}")
    elif longest + max_tokens > served.max_len:
        raise APIError(
            400,
            f"this server's context is {served.max_len} tokens, but {longest + max_tokens} were requested "
            f"({longest} in the prompt, {max_tokens} in the completion); lower max_tokens",
            param=param,
            code="context_length_exceeded",
        )
    extra_stop = _field(body, "stop_token_ids", list)
    if extra_stop:
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in extra_stop):
            raise APIError(
                422, "'stop_token_ids' must be integers", param="stop_token_ids", code="invalid_type"
            )
        stop_ids = stop_ids | frozenset(extra_stop)
    _unsupported(body)
    params = SequenceParams(
        max_tokens=max_tokens, sampling=sampling, stop_ids=frozenset(stop_ids), seed=seed, logprobs=logprobs
    )
    return GenerationRequest(
        kind, prompts, n, params, _stops(body), stream, include_usage, logprobs=logprobs is not None
    )


# ---------------------------------------------------------------------------------------------- the endpoints


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        if message["role"] == "assistant":
            return ""
        raise APIError(
            422,
            f"missing required parameter 'messages[{i}].content'",
            param=f"messages[{i}].content",
            code="missing_required_parameter",
        )
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(
            422,
            f"invalid type for 'messages[{i}].content': expected a string or an array of parts",
            param=f"messages[{i}].content",
            code="invalid_type",
        )
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _value_error(
                f"messages[{i}].content", "only text parts ({'type': 'text', 'text': ...}) are supported"
            )
        texts.append(part["text"])
    return "".join(texts)


def parse_chat(body: dict, served: ServedModel) -> GenerationRequest:
    check_model(body, served)
    messages = _field(body, "messages", list, required=True)
    if not messages:
        raise _value_error("messages", "must contain at least one message")
    conversation = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(
                422,
                f"invalid type for 'messages[{i}]': expected an object",
                param=f"messages[{i}]",
                code="invalid_type",
            )
        role = _field(m, "role", str, required=True, param=f"messages[{i}].role")
        if role not in ROLES:
            raise _value_error(
                f"messages[{i}].role", f"unknown role '{role}'; expected one of {', '.join(ROLES)}"
            )
        conversation.append({"role": "system" if role == "developer" else role, "content": _content(m, i)})
    try:
        ids = served.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    except UserError as e:
        raise _value_error("messages", str(e)) from None
    logprobs = None
    if _field(body, "logprobs", bool):
        logprobs = _field(body, "top_logprobs", int) or 0
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise _value_error("top_logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {logprobs}")
    elif _field(body, "top_logprobs", int) is not None:
        raise _value_error("top_logprobs", "needs logprobs: true")
    return _common(body, served, "chat", [ids], logprobs, served.chat_stop_ids)


def parse_completion(body: dict, served: ServedModel) -> GenerationRequest:
    check_model(body, served)
    prompt = _field(body, "prompt", (str, list), required=True)
    if isinstance(prompt, str):
        prompts = [served.tokenizer.encode(prompt)]
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [served.tokenizer.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError(
            422,
            "invalid type for 'prompt': expected a string, an array of strings, or token ids",
            param="prompt",
            code="invalid_type",
        )
    vocab = len(served.tokenizer)
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise _value_error("prompt", f"token ids must be in [0, {vocab})")
    logprobs = _field(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise _value_error("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {logprobs}")
    return _common(body, served, "completion", prompts, logprobs, served.completion_stop_ids)


# ---------------------------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> dict:
    """{"content": [...]} for (token, logprob, top alternatives) triples."""
    content = []
    for token, logprob, top in entries:
        text, raw = token_text(tokenizer, token)
        alternatives = []
        for t, lp in top:
            s, b = token_text(tokenizer, t)
            alternatives.append({"token": s, "logprob": lp, "bytes": b})
        content.append({"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alternatives})
    return {"content": content}


def completion_logprobs(tokenizer, entries, offset: int = 0) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for token, logprob, top in entries:
        text, _ = token_text(tokenizer, token)
        tokens.append(text)
        logprobs.append(logprob)
        tops.append({token_text(tokenizer, t)[0]: lp for t, lp in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
