"""Requests of the OpenAI API, validated into what a batch needs, and OpenAI's error JSON.

Validation is by hand rather than by a schema library because every refusal must say, in OpenAI's
error shape, which field is at fault and why. A field safegen does not implement is refused by name
rather than ignored, since a client that asked for it would otherwise get an answer that silently
differs from what it asked for; but the values of such a field that change nothing (`top_p: 1`,
`presence_penalty: 0`, a `user` id, a message's `name`: NEUTRAL below) are accepted, since clients
send them by default. An explicit `null` means "not given", for every field, as in OpenAI's API.
A string that is not Unicode text (a lone surrogate such as "\ud800", which JSON can spell) is
refused with the path of the field that holds it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Union

MAX_SEED = 2**32 - 1
# `developer` is OpenAI's newer name for `system` (its reasoning models' instructions): the same here.
CHAT_ROLES = ("system", "developer", "user", "assistant")
ROLE_AS = {"developer": "system"}
MAX_STOP = 4  # OpenAI's own limit on `stop` sequences

# The fields each endpoint implements. `max_completion_tokens` is the chat API's newer name for
# `max_tokens`; `safegen` holds this server's extension (policy, budget, refine).
COMMON_FIELDS = ("model", "max_tokens", "temperature", "n", "seed", "stop", "stream", "stream_options", "safegen")
CHAT_FIELDS = ("messages", "max_completion_tokens", *COMMON_FIELDS)
COMPLETION_FIELDS = ("prompt", *COMMON_FIELDS)
EXTENSION_FIELDS = ("policy", "budget", "refine")
MESSAGE_FIELDS = ("role", "content", "name", "refusal")
STREAM_OPTION_FIELDS = ("include_usage", "include_obfuscation")

# Fields safegen does not implement, with the values that ask for nothing (OpenAI's defaults, which
# many clients send explicitly): accepted with those values, refused by name with any other.
# `user` identifies the end user to OpenAI; any string is accepted and none is used (nor logged).
NEUTRAL = {
    "top_p": (1,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "echo": (False,),
    "best_of": (1,),
    "logit_bias": ({},),
    "parallel_tool_calls": (True, False),  # with no tools it means nothing
    "user": str,
}


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        # A message or param may quote the client's own text, which may not be Unicode (a lone
        # surrogate): escaped, so that the error itself always encodes.
        message, param = _printable(message), None if param is None else _printable(param)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad(param: Optional[str], message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond each, a 400 that names the limit."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: Optional[int] = 2048  # None: only the context limits a prompt
    max_tokens: int = 512
    max_n: int = 8
    # The model's context: a prompt plus the request's own max_tokens must fit in it (None: unknown).
    context: Optional[int] = None


@dataclass(frozen=True)
class Extension:
    """The `safegen` object of a request: which of the server's policies, the refinement budget
    (a cap on denoiser rows, x plain sampling; at most the server's) and whether to refine."""

    policy: str
    budget: Optional[float]
    refine: bool


@dataclass
class GenerationRequest:
    """A validated request: `prompts` are chat-message lists (chat) or strings (completions)."""

    kind: str  # "chat" | "completion"
    model: str
    prompts: list[Union[str, list]]
    max_tokens: int
    temperature: float
    n: int
    seed: int
    seed_given: bool
    stop: list[str]
    stream: bool
    extension: Extension
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


@dataclass(frozen=True)
class ServerDefaults:
    """What a request that leaves a field out gets, and what it may choose from."""

    model: str
    max_tokens: int
    temperature: float
    policies: tuple[str, ...]  # as named on the command line; the first is the default
    budget: Optional[float]  # the server's cap
    refine: bool


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _neutral(name: str, value) -> bool:
    accepted = NEUTRAL.get(name)
    if accepted is str:
        return isinstance(value, str)
    # 1 == True in Python: a field whose neutral value is a number must not take a boolean, and back.
    return accepted is not None and any(type(value) is type(a) or (_is_number(value) and _is_number(a))
                                        for a in accepted if value == a)


def check_fields(body, allowed: tuple[str, ...], where: str = "", neutral: bool = False) -> dict:
    """The object `body` without its null fields; an error naming the first field not in `allowed`
    (or, with `neutral`, not one of NEUTRAL's fields at a value that changes nothing)."""
    if not isinstance(body, dict):
        raise bad(where or None, "must be a JSON object", "invalid_type")
    given = {k: v for k, v in body.items() if v is not None}
    for key, value in given.items():
        if key in allowed:
            continue
        name = f"{where}.{key}" if where else key
        if neutral and key in NEUTRAL:
            if _neutral(key, value):
                continue
            wanted = "a string" if NEUTRAL[key] is str else " or ".join(json.dumps(v) for v in NEUTRAL[key])
            raise APIError(400, f"{name}: this server does not implement {key!r}; it accepts only {wanted} "
                           f"(which changes nothing), not {value!r}", param=name, code="unsupported_value")
        raise APIError(400, f"{name}: this server does not support the field {key!r}; supported: "
                       f"{', '.join(allowed)}", param=name, code="unsupported_field")
    return {k: v for k, v in given.items() if k in allowed}


def check_text(data, limit: int = 10_000) -> None:
    """Refuses (400, naming the field) a string or key that is not Unicode text: JSON's escapes can
    spell a lone surrogate, which no tokenizer or UTF-8 encoder takes. Iterative, so that depth
    costs no stack."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise bad(path or None, f"is not valid Unicode text (a lone surrogate at character {e.start})",
                          "invalid_text") from None
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((f"{path}.{k}" if path else str(k), k))
                stack.append((f"{path}.{k}" if path else str(k), v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))


def _messages(value) -> list:
    if not isinstance(value, list) or not value:
        raise bad("messages", "must be a non-empty list of {role, content} messages", "invalid_type")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        m = check_fields(m, MESSAGE_FIELDS, where)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, not {role!r}")
        if "name" in m and not isinstance(m["name"], str):
            raise bad(f"{where}.name", "must be a string", "invalid_type")
        if "refusal" in m:  # an earlier refused answer sent back as history: its text is what was said
            if role != "assistant" or not isinstance(m["refusal"], str):
                raise bad(f"{where}.refusal", "is a string, in assistant messages only", "invalid_type")
            if content is None:
                content = m["refusal"]
        if isinstance(content, list):  # content parts: only text ones mean something here
            parts = []
            for j, part in enumerate(content):
                part = check_fields(part, ("type", "text"), f"{where}.content[{j}]")
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}]", "only {\"type\": \"text\", \"text\": ...} parts are supported")
                parts.append(part["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise bad(f"{where}.content", "must be a string or a list of text parts", "invalid_type")
        out.append({"role": ROLE_AS.get(role, role), "content": content})
    return out


def _prompts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise bad("prompt", "must be a string or a non-empty list of strings (token-id prompts are not supported)",
              "invalid_type")


def _stop(value) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "must be a non-empty string or a list of them", "invalid_type")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} sequences, got {len(stops)}")
    return stops


def _extension(value, defaults: ServerDefaults) -> Extension:
    ext = check_fields(value, EXTENSION_FIELDS, "safegen")
    policy = ext.get("policy", defaults.policies[0])
    if policy not in defaults.policies:
        raise bad("safegen.policy", f"{policy!r} is not one of this server's policies: {', '.join(defaults.policies)}")
    budget = ext.get("budget", defaults.budget)
    if budget is not None and (not _is_number(budget) or not math.isfinite(budget) or budget < 1):
        raise bad("safegen.budget", f"must be a number >= 1 (a multiple of plain sampling's cost), not {budget!r}")
    if defaults.budget is not None and budget > defaults.budget:
        raise bad("safegen.budget", f"{budget} is above this server's cap of {defaults.budget}")
    refine = ext.get("refine", defaults.refine)
    if not isinstance(refine, bool):
        raise bad("safegen.refine", f"must be true or false, not {refine!r}", "invalid_type")
    return Extension(policy=policy, budget=None if budget is None else float(budget), refine=refine)


def parse(kind: str, body, defaults: ServerDefaults, limits: Limits, new_seed) -> GenerationRequest:
    """The request `body` (parsed JSON) of a chat ("chat") or completions ("completion") call,
    validated; `new_seed()` draws the seed of a request that gives none. Raises APIError."""
    body = check_fields(body, CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS, neutral=True)
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model", "is required: the served model's id (GET /v1/models)", "missing_field")
    if model != defaults.model:
        raise APIError(404, f"model: {model!r} is not served here; this server serves {defaults.model!r}",
                       param="model", code="model_not_found")
    if kind == "chat":
        if "messages" not in body:
            raise bad("messages", "is required", "missing_field")
        prompts = [_messages(body["messages"])]
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise bad("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        max_tokens_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        if "prompt" not in body:
            raise bad("prompt", "is required", "missing_field")
        prompts = _prompts(body["prompt"])
        max_tokens_name = "max_tokens"
    max_tokens = body.get(max_tokens_name, defaults.max_tokens)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise bad(max_tokens_name, f"must be a positive integer, not {max_tokens!r}")
    if max_tokens > limits.max_tokens:
        raise bad(max_tokens_name, f"{max_tokens} is above this server's limit of {limits.max_tokens} tokens",
                  "limit_exceeded")
    n = body.get("n", 1)
    if not _is_int(n) or n < 1:
        raise bad("n", f"must be a positive integer, not {n!r}")
    if n > limits.max_n:
        raise bad("n", f"{n} is above this server's limit of {limits.max_n} choices", "limit_exceeded")
    # n > 1 asks for different choices: with no temperature given, a greedy server default would give
    # n copies of one answer, so such a request samples at OpenAI's default temperature, 1.
    temperature = body.get("temperature", defaults.temperature if n == 1 or defaults.temperature > 0 else 1.0)
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise bad("temperature", f"must be a number from 0 to 2, not {temperature!r}")
    if n > 1 and temperature == 0:
        raise bad("n", f"n={n} at temperature 0 (greedy) would give {n} identical choices; set a temperature > 0")
    rows = len(prompts) * n
    if rows > limits.max_n:
        raise bad("prompt", f"{len(prompts)} prompts x n={n} is {rows} samples, above this server's limit "
                  f"of {limits.max_n}", "limit_exceeded")
    seed_given = "seed" in body
    seed = body["seed"] if seed_given else new_seed()
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED - rows + 1:
        raise bad("seed", f"must be an integer from 0 to {MAX_SEED - rows + 1} (sample i gets seed + i), not {seed!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", f"must be true or false, not {stream!r}", "invalid_type")
    options = check_fields(body.get("stream_options", {}), STREAM_OPTION_FIELDS, "stream_options")
    for name, value in options.items():
        if not isinstance(value, bool):
            raise bad(f"stream_options.{name}", f"must be true or false, not {value!r}", "invalid_type")
    return GenerationRequest(
        kind=kind, model=model, prompts=prompts, max_tokens=max_tokens, temperature=float(temperature), n=n,
        seed=seed, seed_given=seed_given, stop=_stop(body["stop"]) if "stop" in body else [], stream=stream,
        extension=_extension(body.get("safegen", {}), defaults),
        include_usage=stream and options.get("include_usage", False))
