"""OpenAI's request and response shapes (``/v1/completions``, ``/v1/chat/completions``,
``/v1/fine_tuning/jobs``, vLLM's ``/v1/load_lora_adapter``), as pydantic models and builders.

Requests are validated by FastAPI against these models: a wrong type or an out-of-range value is
a 400 naming the field. Fields OpenAI has and the engine cannot honour (``logit_bias``,
penalties, ``echo``, ``tools`` ...) are rejected with a 400 saying so rather than ignored. vLLM's
sampling extensions (``top_k``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``, ``include_stop_str_in_output``) are accepted as vLLM accepts them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.serve.errors import APIError


def invalid_unicode_at(data: Any) -> str | None:
    """The path (``messages.0.content``) of the first string in ``data`` (JSON values) that is not
    valid Unicode (a lone UTF-16 surrogate, which JSON's ``\\uD800`` escapes allow), or ``None``."""
    stack = [(data, "")]
    while stack:
        x, path = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(x, dict):
            for k, v in x.items():
                stack.append((k, path))
                stack.append((v, f"{path}.{k}" if path else str(k)))
        elif isinstance(x, list):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x))
    return None


class _Body(BaseModel):
    # Unknown fields are kept (model_extra); a request that samples rejects them itself.
    model_config = ConfigDict(extra="allow")
    max_messages: ClassVar[int] = 4096
    """Most ``messages`` a body may hold, checked before the messages are validated (validating
    100k of them takes the event loop's thread for a second); the server sets ``limits.max_messages``."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("messages"), list) and len(data["messages"]) > _Body.max_messages:
            raise ValueError(f"messages: {len(data['messages'])} messages, at most {_Body.max_messages} per request")
        if isinstance(data, dict):  # null is the default, as OpenAI reads it (`"n": null` is n = 1)
            fields = cls.model_fields
            data = {k: v for k, v in data.items()
                    if not (v is None and k in fields and not fields[k].is_required() and fields[k].default is not None)}
        where = invalid_unicode_at(data)
        if where is not None:
            raise ValueError(f"{where}: not valid Unicode text (a lone UTF-16 surrogate)")
        return data


NO_EFFECT_FIELDS = frozenset({"metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                              "safety_identifier"})
"""OpenAI request fields that do not change what is generated: accepted and ignored. Any other
field the server does not know is a 400 (a sampling option silently ignored would change results)."""


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingRequest(_Body):
    model: str
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    priority: int = 0

    def check_supported(self, max_n: int, max_stop: int) -> None:
        """Raises: APIError 400 for unknown fields, values the engine does not support, or
        values over the limits."""
        unknown = sorted(set(self.model_extra or {}) - NO_EFFECT_FIELDS)
        if unknown:
            raise APIError(400, f"unknown or unsupported field(s) {unknown}", unknown[0], "unsupported_parameter")
        if self.n > max_n:
            raise APIError(400, f"n={self.n} is above this server's limit of {max_n}", "n", "invalid_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (only 0)", name, "unsupported_parameter")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias", "unsupported_parameter")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > max_stop:
            raise APIError(400, f"at most {max_stop} stop sequences", "stop", "invalid_value")
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must be non-empty strings", "stop", "invalid_value")

    def sampling_params(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        """The engine's :class:`SamplingParams` of choice ``choice`` (of ``n``): a given seed is
        offset by the choice so that the ``n`` samples differ and stay reproducible."""
        seed = None if self.seed is None else (self.seed + choice) % 2**32
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=seed,
            stop=self.stop or (), stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
        )


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions`` (OpenAI's legacy completions)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)  # None (omitted or null): 16, OpenAI's default
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (text or token ids each).

        Raises:
            APIError: 400 for an empty prompt list or an empty prompt.
        """
        p = self.prompt
        if isinstance(p, str):
            out = [p]
        elif p and all(isinstance(t, int) for t in p):
            out = [list(p)]
        else:
            out = list(p)
        if not out or any(len(x) == 0 for x in out):
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        return out

    def check_supported(self, max_n: int, max_stop: int) -> None:
        super().check_supported(max_n, max_stop)
        if self.echo:
            raise APIError(400, "echo is not supported", "echo", "unsupported_parameter")
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix", "unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", "best_of", "unsupported_parameter")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | dict[str, Any]] | None = None
    name: str | None = None

    def text(self, i: int) -> str:
        """The message's text (text parts joined).

        Raises:
            APIError: 400 for a non-text content part (images, audio).
        """
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for j, part in enumerate(self.content):
            if not isinstance(part, TextPart):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"content part of type {kind!r} is not supported (text only)", f"messages.{i}.content.{j}", "unsupported_parameter")
            out.append(part.text)
        return "".join(out)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    # vLLM's extensions
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self, max_n: int, max_stop: int) -> None:
        super().check_supported(max_n, max_stop)
        if self.tools:
            raise APIError(400, "tools are not supported", "tools", "unsupported_parameter")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", "response_format", "unsupported_parameter")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]


class TokenizeRequest(_Body):
    """``POST /tokenize`` (vLLM's ``TokenizeCompletionRequest`` / ``TokenizeChatRequest``):
    ``prompt`` text, or chat ``messages`` rendered by the model's chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def check(self) -> None:
        """Raises: APIError: 400 unless exactly one of ``prompt`` and ``messages`` is given."""
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt", "invalid_value")


class DetokenizeRequest(_Body):
    """``POST /detokenize`` (vLLM's): token ids back to text."""

    model: str | None = None
    tokens: list[int]


class LoRAConfigBody(_Body):
    """The adapter of a fine-tuning job (``peft.LoraConfig``'s names; our extension)."""

    model_config = ConfigDict(extra="forbid")
    r: int | None = None
    lora_alpha: float | None = None
    target_modules: str | list[str] | None = None
    lora_dropout: float | None = None
    use_rslora: bool | None = None
    init_lora_weights: str | None = None


class FinetuneJobCreate(_Body):
    """``POST /v1/fine_tuning/jobs``."""

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    lora: LoRAConfigBody | None = None


class LoadLoRAAdapterRequest(_Body):
    """vLLM's ``POST /v1/load_lora_adapter``."""

    lora_name: str = Field(..., min_length=1)
    lora_path: str = Field(..., min_length=1)


class UnloadLoRAAdapterRequest(_Body):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    lora_name: str = Field(..., min_length=1)


# ---- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[str], logprobs: list[float], top: list[dict[str, float]] | None, offset: int) -> dict:
    """Legacy completions' ``logprobs`` object for consecutive tokens; ``offset`` is the
    characters of text before the first."""
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float], top: list[list[tuple[str, float]]] | None) -> dict:
    """Chat's ``logprobs.content`` entries for consecutive tokens."""
    content = []
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        entry = {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
        if top is not None:
            entry["top_logprobs"] = [{"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))} for s, v in top[i]]
        content.append(entry)
    return {"content": content}


def cursor_page(items: list[dict], after: str | None, limit: int, max_limit: int = 100) -> dict:
    """OpenAI's cursor page: the items after ``after`` (an id), at most ``limit`` (1..``max_limit``).

    Raises:
        APIError: 400 for an unknown ``after`` or a ``limit`` out of range.
    """
    if after is not None:
        ids = [x["id"] for x in items]
        if after not in ids:
            raise APIError(400, f"after={after!r} is not in the list", "after", "invalid_value")
        items = items[ids.index(after) + 1:]
    if not 1 <= limit <= max_limit:
        raise APIError(400, f"limit must be in [1, {max_limit}]", "limit", "invalid_value")
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}
