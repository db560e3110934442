"""The OpenAI API's request bodies (pydantic), its error shape, and stop strings.

Fields OpenAI defines that this server does not implement are accepted only at their
neutral value (n=1, echo=false, no logprobs, no penalties, ...); anything else, and any
unknown field, is a 400 that names it, never a silently different answer. Extensions (as
vLLM names them): top_k, stop_token_ids, ignore_eos.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from .sampling import SamplingParams

GREEDY_BELOW = 1e-5     # temperatures under this are greedy (as vLLM does): no overflow in logits / T

__all__ = ["APIError", "CompletionRequest", "ChatRequest", "StopStrings", "ValidationError",
           "error_body", "validation_message"]


class APIError(Exception):
    """An error reply: HTTP status plus OpenAI's {"error": {...}} body."""
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": APIError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the first problem pydantic found."""
    err = e.errors()[0]
    param = ".".join(str(x) for x in err.get("loc", ()) if not str(x).startswith(("function-", "list[", "str", "int")))
    msg = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        msg = "this server does not support the parameter"
    return (f"{param}: {msg}" if param else msg), (param or None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=-1)              # 0 or -1: off
    seed: StrictInt | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted only at OpenAI's neutral values
    n: int = 1
    presence_penalty: float = 0
    frequency_penalty: float = 0
    logit_bias: dict | None = None
    logprobs: Union[bool, int, None] = None

    @model_validator(mode="after")
    def _check(self):
        unsupported = {"n": self.n != 1, "presence_penalty": self.presence_penalty != 0,
                       "frequency_penalty": self.frequency_penalty != 0,
                       "logit_bias": bool(self.logit_bias),
                       "logprobs": self.logprobs is not None and self.logprobs is not False}
        for name, bad in unsupported.items():
            if bad:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported by this server")
        stops = self.stop_strings
        if any(not s for s in stops) or len(stops) > 16:
            raise ValueError("stop: up to 16 non-empty strings")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_tokens: int, stop_ids=()) -> SamplingParams:
        temperature = float(self.temperature) if self.temperature >= GREEDY_BELOW else 0.0
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                  top_k=max(self.top_k, 0), top_p=float(self.top_p), seed=self.seed,
                                  stop_ids=tuple(self.stop_token_ids or ()) + tuple(stop_ids),
                                  ignore_eos=self.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e)) from None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    max_tokens: StrictInt | None = Field(16, ge=1)
    echo: Literal[False] = False
    best_of: Literal[None, 1] = None
    suffix: Literal[None, ""] = None

    @property
    def single_prompt(self) -> Union[str, list[int]]:
        """The one prompt (a batch of one is unwrapped); several prompts are a 400."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"one prompt per request (got {len(p)})", "prompt")
            p = p[0]
        if not p:
            raise APIError(400, "the prompt is empty", "prompt")
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict], None] = None
    name: str | None = None

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):        # content parts: text only
            bad = [p.get("type") for p in content if p.get("type") != "text" or not isinstance(p.get("text"), str)]
            if bad:
                raise APIError(400, f"only text content parts are supported, got {bad[0]!r}", "messages")
            content = "".join(p["text"] for p in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class StopStrings:
    """Finds stop strings in streamed text. `push(text)` returns (text safe to send, hit):
    text that could still begin a stop string is held back until it cannot; at a hit the
    text before the stop string is returned and the rest dropped."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0        # the longest tail of buf that begins some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
