"""The server's YAML config (``configs/serve/*.yaml``) with command-line overrides.

Layout (every key optional; see ``configs/serve/tiny.yaml``)::

    host: 127.0.0.1
    port: 8000
    api_key: null               # Bearer key for every endpoint but /health (or $COSERVE_API_KEY): project "default", admin
    api_keys_file: null         # YAML/JSON list of {key, project, admin}: one project (tenant) per key
    served_model_name: null     # the base model's name in the API (default: the checkpoint dir's name)
    output_dir: coserve-output  # uploaded files, job checkpoints and exported adapters
    database_url: null          # SQLAlchemy URL of the server's state (default: SQLite, <output_dir>/coserve.db)
    model:    {path, tokenizer, chat_template, dtype, max_model_len, seed}   # ModelSection
    engine:   {...}             # Engine keyword arguments (max_num_seqs, scheduling_policy, ...)
    limits:   {...}             # Limits
    finetune: {...}             # FinetuneDefaults
    log_level: info             # debug, info, warning, error (ours and uvicorn's loggers)
    disable_log_requests: false # true: no access-log line per HTTP request (vLLM's flag)
    disable_log_stats: false    # true: no periodic stats line (vLLM's flag)
    log_stats_interval_s: 10    # seconds between stats lines while there is work
    timeout_graceful_shutdown_s: 10
    timeout_header_s: 10        # a connection's request headers must arrive within this (slowloris)
    timeout_keep_alive_s: 5     # an idle keep-alive connection is closed after this (uvicorn's)
    lora_modules: {name: path}  # PEFT adapters loaded at start-up (vLLM's --lora-modules)
    lora_roots: [dir, ...]      # where POST /v1/load_lora_adapter may read (none: admin keys only, anywhere)
    tokenizer_workers: 4        # tokenizer copies: requests tokenize in parallel, one slow request holds one

Precedence: defaults < the YAML file < command-line flags (``--port``, ``--model`` ...) <
``--set KEY=VALUE`` overrides (:func:`coserve_jax.configfile.apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Mapping, Sequence

from coserve_jax.configfile import ConfigError, apply_overrides, read_yaml, set_key, strict
from coserve_jax.parallel.distributed import check_distributed

MiB = 1 << 20

# Engine arguments the server sets itself (from the model section).
RESERVED_ENGINE_KEYS = ("model", "tokenizer", "dtype", "max_model_len")

SERVER_ENGINE_DEFAULTS = dict(compile_in_background=True)
"""Engine settings the server changes from the engine's defaults, for every model."""

TINY_ENGINE_DEFAULTS = dict(
    max_num_seqs=16, max_num_batched_tokens=128, num_kv_pages=256, token_buckets=(32, 128),
    max_loras=4, max_lora_rank=16, finetune_max_seq_len=512, finetune_seq_buckets=(128, 512), max_finetune_tokens=64,
)
"""Engine settings of the built-in tiny model (small step shapes: quick to compile on a CPU)."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """What the server serves.

    Attributes:
        path: a local Hugging Face checkpoint directory, a llama.cpp ``.gguf`` file (its
            tokenizer and chat template come from its metadata), or ``None`` for the built-in
            tiny model (random weights; :mod:`coserve_jax.models.tiny`).
        tokenizer: a tokenizer directory or ``.gguf`` file (default: the checkpoint's; for the tiny model, the
            built-in byte-level tokenizer; a given tokenizer sizes the tiny model's vocabulary).
        chat_template: a Jinja template or ``.jinja`` file replacing the tokenizer's.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        max_model_len: context length in tokens (default: the checkpoint's; 1024 for tiny).
        seed: the tiny model's random weights.
        hf_overrides: ``config.json`` fields replacing the tiny model's (vLLM's
            ``--hf-overrides``; e.g. ``{num_attention_heads: 8, num_key_value_heads: 2}`` for
            ``tensor_parallel_size`` 8). The tiny model only.
    """

    path: str | None = None
    tokenizer: str | None = None
    chat_template: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    hf_overrides: dict | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request limits; a request over one gets a 400 or 413 and nothing else is affected.

    Attributes:
        max_body_bytes: largest JSON request body (413 above).
        max_upload_bytes: largest uploaded file (``POST /v1/files``; 413 above).
        max_tokens: largest ``max_tokens`` a request may ask for (also the default of chat
            requests that give none, capped by the context left).
        max_prompt_tokens: longest prompt in tokens (default: the context length - 1).
        max_n: most choices (``n``) per request, and most prompts per completion request.
        max_messages: most messages in a chat request.
        max_seqs_per_request: most sequences one request makes (``n`` x prompts).
        max_seqs_per_project: most sequences of one project in the engine at once; its other
            requests wait in the server (default ``None``: the engine's ``max_num_seqs``).
        step_memory_bytes: with the reference attention (CPU), the attention scratch a step may
            take: a request whose prompt + ``max_tokens`` would need a wider gather is a 400
            (default ``None``: half the memory free when the server started).
        max_stop: most stop strings per request.
    """

    max_body_bytes: int = 4 * MiB
    max_upload_bytes: int = 256 * MiB
    max_tokens: int = 4096
    max_prompt_tokens: int | None = None
    max_n: int = 16
    max_stop: int = 8
    max_messages: int = 4096
    max_seqs_per_request: int = 64
    max_seqs_per_project: int | None = None
    step_memory_bytes: int | None = None

    def __post_init__(self):
        for k in ("max_body_bytes", "max_upload_bytes", "max_tokens", "max_n", "max_stop", "max_messages", "max_seqs_per_request"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"limits.{k} must be an integer >= 1, got {getattr(self, k)!r}")
        if self.max_seqs_per_project is not None and (not isinstance(self.max_seqs_per_project, int) or self.max_seqs_per_project < 1):
            raise ValueError(f"limits.max_seqs_per_project must be an integer >= 1, got {self.max_seqs_per_project!r}")
        if self.step_memory_bytes is not None and (not isinstance(self.step_memory_bytes, int) or self.step_memory_bytes < 1):
            raise ValueError(f"limits.step_memory_bytes must be an integer >= 1, got {self.step_memory_bytes!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"limits.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens!r}")


@dataclasses.dataclass(frozen=True)
class FinetuneDefaults:
    """How OpenAI fine-tuning requests map onto :class:`~coserve_jax.finetune.config.FinetuneConfig`.

    Attributes:
        base_learning_rate: the learning rate that ``learning_rate_multiplier`` scales.
        save_steps: checkpoint every this many optimizer steps (``None``: at the end, and at
            shutdown).
        export_adapter: write a finished job's adapter as a PEFT directory under
            ``output_dir/jobs/<id>/adapter``.
        sample_priority: the request priority (vLLM's: lower is served first) of the Tinker
            API's ``sample`` calls; the OpenAI routes' requests default to 0, so by default an
            RL loop's sampling gives way to chat traffic (set 0 to serve them alike).
    """

    base_learning_rate: float = 1e-4
    save_steps: int | None = None
    export_adapter: bool = True
    sample_priority: int = 1


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The whole server config (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_keys_file: str | None = None
    served_model_name: str | None = None
    output_dir: str = "coserve-output"
    database_url: str | None = None
    model: ModelSection = ModelSection()
    engine: dict = dataclasses.field(default_factory=dict)
    limits: Limits = Limits()
    finetune: FinetuneDefaults = FinetuneDefaults()
    log_level: str = "info"
    disable_log_requests: bool = False
    disable_log_stats: bool = False
    log_stats_interval_s: float = 10.0
    timeout_graceful_shutdown_s: float = 10.0
    timeout_header_s: float = 10.0
    timeout_keep_alive_s: float = 5.0
    lora_modules: dict | None = None
    lora_roots: list | None = None
    tokenizer_workers: int = 4

    def database(self) -> str:
        """The SQLAlchemy URL of the server's database: ``database_url``, or SQLite in the output directory."""
        from coserve_jax.serve.db import sqlite_url

        return self.database_url or sqlite_url(os.path.join(self.output_dir, "coserve.db"))

    @property
    def is_tiny(self) -> bool:
        return self.model.path is None

    def engine_kwargs(self) -> dict:
        """Engine keyword arguments: the server's defaults (``compile_in_background``: answer
        as soon as the largest shapes are compiled), the tiny model's (for the tiny model), then
        the ``engine`` section."""
        return {**SERVER_ENGINE_DEFAULTS, **(TINY_ENGINE_DEFAULTS if self.is_tiny else {}), **self.engine}


def parse_config(data: Mapping[str, Any], where: str = "config") -> ServeConfig:
    """A :class:`ServeConfig` from a mapping.

    Raises:
        ConfigError: unknown keys (named), engine keys the server sets or the engine lacks, bad values.
    """
    from coserve_jax.engine import Engine

    sections = {"model": ModelSection, "limits": Limits, "finetune": FinetuneDefaults}
    top = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (allowed: {sorted(top)})")
    engine = data.get("engine") or {}
    if not isinstance(engine, Mapping):
        raise ConfigError(f"{where}: engine: expected a mapping")
    known = set(inspect.signature(Engine.__init__).parameters) - {"self"} - set(RESERVED_ENGINE_KEYS)
    bad = sorted(set(engine) & set(RESERVED_ENGINE_KEYS))
    if bad:
        raise ConfigError(f"{where}: engine keys {bad} are set in the model section")
    bad = sorted(set(engine) - known)
    if bad:
        raise ConfigError(f"{where}: unknown engine keys {bad} (Engine arguments: {sorted(known)})")
    try:
        check_distributed(engine.get("distributed"))
    except ValueError as e:
        raise ConfigError(f"{where}: engine.distributed: {e}") from None
    kw = {k: v for k, v in data.items() if k not in sections and k != "engine"}
    for name, cls in sections.items():
        kw[name] = strict(cls, data.get(name), f"{where}: {name}")
    try:
        cfg = ServeConfig(engine=dict(engine), **kw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    if cfg.model.hf_overrides is not None and (cfg.model.path is not None or not isinstance(cfg.model.hf_overrides, Mapping)):
        raise ConfigError(f"{where}: model.hf_overrides is a mapping of config.json fields, for the built-in tiny model only")
    if cfg.lora_modules is not None and not (
        isinstance(cfg.lora_modules, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in cfg.lora_modules.items())
    ):
        raise ConfigError(f"{where}: lora_modules is a mapping of adapter names to PEFT directories")
    if cfg.lora_roots is not None and not (isinstance(cfg.lora_roots, list) and all(isinstance(r, str) and r for r in cfg.lora_roots)):
        raise ConfigError(f"{where}: lora_roots is a list of directories")
    if not isinstance(cfg.tokenizer_workers, int) or isinstance(cfg.tokenizer_workers, bool) or cfg.tokenizer_workers < 1:
        raise ConfigError(f"{where}: tokenizer_workers must be an integer >= 1, got {cfg.tokenizer_workers!r}")
    for k in ("timeout_header_s", "timeout_keep_alive_s", "timeout_graceful_shutdown_s"):
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"{where}: {k} must be a number > 0, got {v!r}")
    if not isinstance(cfg.port, int) or not 0 <= cfg.port < 65536:
        raise ConfigError(f"{where}: port must be an integer in [0, 65536), got {cfg.port!r}")
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None) -> ServeConfig:
    """Read ``path`` (``None``: defaults only), set ``values`` (``{dotted key: value}``, e.g. from
    command-line flags), apply ``KEY=VALUE`` overrides, validate.

    Raises:
        FileNotFoundError: no such file. ConfigError: invalid YAML or contents.
    """
    data = read_yaml(path) if path is not None else {}
    for key, value in (values or {}).items():
        set_key(data, key, value)
    where = os.fspath(path) if path is not None else "config"
    return parse_config(apply_overrides(data, overrides), where)
