"""The co-serving benchmark's YAML config (``configs/bench/*.yaml``), parsed with PyYAML into
frozen dataclasses; unknown keys are errors, so a typo never silently runs a default.

Layout (every section optional but ``rates``; see ``configs/bench/cpu-smoke.yaml``)::

    name: cpu-smoke
    model:      {path: DIR|FILE.gguf | config: DIR | hf_config: {...}, tokenizer: DIR, dtype, max_model_len, seed}
    lora:       {max_loras, max_lora_rank, target_modules}     # the engine's adapter pool
    engine:     {...}                                          # Engine keyword arguments
    slo:        {ttft_ms, tpot_ms, margin, ...}                # SLOConfig fields
    relative_slo: {tpot: 3.0, ttft: 10.0, batch_size, context_tokens}  # SLOs from the start-up profile (RelativeSLO)
    workload:   {trace, arrival, cv, num_requests, ...}        # WorkloadConfig fields
    rates:      [1.0, 2.0]                                     # requests/s
    policies:   {inference_only: {}, finetune_only: {}, temporal: {interval_steps: 32},
                 fixed_budget: {max_tokens: 256, max_finetune_tokens: 128}, hybrid: {}}
    finetune:   {data, columns, max_examples, eval_data, eval_examples, settings: {...}}  # settings: FinetuneConfig fields
    run:        {drain_timeout_s, finetune_only_s}

Relative paths (``model.path``, ``model.config``, ``model.tokenizer``, ``finetune.data``,
``finetune.eval_data``, ``workload.trace``) are tried as given, then under the shared data folder
(:func:`coserve_jax.bench.workload.default_data_dir`: ``--data-dir`` / ``$COSERVE_JAX_DATA_DIR``, else the nearest
``shared/data`` above the working directory or the package).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from coserve_jax.bench.workload import WorkloadConfig
from coserve_jax.configfile import ConfigError, read_yaml
from coserve_jax.configfile import strict as _strict
from coserve_jax.parallel.distributed import check_distributed
from coserve_jax.sched.policy import SLOConfig

POLICIES = ("inference_only", "finetune_only", "temporal", "fixed_budget", "hybrid")
"""The benchmark's policies, in the order they run and print."""

POLICY_OPTIONS = {
    "inference_only": ("scheduling_policy",),
    "finetune_only": (),
    "temporal": ("interval_steps", "sequences_per_iteration"),
    "fixed_budget": ("max_tokens", "max_finetune_tokens"),
    "hybrid": (),
}

RESERVED_ENGINE_KEYS = ("scheduling_policy", "policy_options", "slo", "measure_steps", "tokenizer", "max_loras", "max_lora_rank")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model runs: a real checkpoint, or random weights of a real shape (nothing is downloaded).

    Attributes:
        path: a local checkpoint with its weights: a Hugging Face directory or a llama.cpp
            ``.gguf`` file (e.g. ``models/smollm2_135m_instruct/SmolLM2-135M-Instruct.Q4_1.gguf``
            under the shared data folder); its tokenizer comes with it.
        config: a directory with a Hugging Face ``config.json`` (e.g. ``configs/models/llama-3.1-8b``):
            random weights of that shape.
        hf_config: an inline Hugging Face config dict (instead of ``config``).
        tokenizer: a tokenizer directory (needed for finetuning on text and ShareGPT prompts;
            default with ``path``: the checkpoint's).
        vocab_from_tokenizer: set ``vocab_size`` to the tokenizer's length (a tiny model that
            reads real text).
        dtype: ``float32``, ``bfloat16`` ...
        max_model_len: context length in tokens (default: the config's).
        seed: seeds the random weights.
    """

    path: str | None = None
    config: str | None = None
    hf_config: dict | None = None
    tokenizer: str | None = None
    vocab_from_tokenizer: bool = False
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0

    def __post_init__(self):
        if sum(x is not None for x in (self.path, self.config, self.hf_config)) != 1:
            raise ValueError("give exactly one of model.path, model.config and model.hf_config")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """The engine's adapter pool (the finetuning job's adapter takes a slot)."""

    max_loras: int = 2
    max_lora_rank: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
    """The finetuning job that co-serves.

    Attributes:
        data: a training file (``.jsonl``/``.json``, read by
            :func:`coserve_jax.finetune.data.tokenize_record`), or ``"synthetic"`` (random token
            ids, no tokenizer needed; for smoke runs).
        columns: prompt / completion field names (GSM8K: ``question`` / ``answer``).
        max_examples: records read (the first ones; records longer than the engine's
            ``finetune_max_seq_len`` are skipped).
        synthetic_tokens: length of each synthetic example.
        eval_data: a held-out file read like ``data`` (e.g. ``finetune/gsm8k/test.jsonl``), or
            ``None``: then every summary row gets ``eval_loss_before`` (the base model's
            validation loss on it) and ``eval_loss_after`` (the run's adapter at its end), and
            ``summary.md`` shows sample answers.
        eval_examples: records of ``eval_data`` used (the first ones).
        num_sample_answers: questions of ``eval_data`` answered by the base model and by the
            hybrid run's adapter in ``summary.md``.
        settings: :class:`~coserve_jax.finetune.config.FinetuneConfig` fields (``lora`` a dict;
            ``chat_template`` and ``train_on_prompt`` also shape how the records are tokenized).
    """

    data: str = "finetune/gsm8k/train.jsonl"
    columns: dict | None = dataclasses.field(default_factory=lambda: {"prompt": "question", "completion": "answer"})
    max_examples: int = 2000
    synthetic_tokens: int = 128
    eval_data: str | None = None
    eval_examples: int = 64
    num_sample_answers: int = 3
    settings: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Timing of the runs.

    Attributes:
        drain_timeout_s: after the last arrival, how long unfinished requests may take before
            they are aborted (and count as SLO misses).
        finetune_only_s: length of the finetuning-only run that measures peak finetuning
            throughput (the denominator of ``finetune_progress``).
    """

    drain_timeout_s: float = 120.0
    finetune_only_s: float = 30.0


@dataclasses.dataclass(frozen=True)
class RelativeSLO:
    """SLOs stated as multiples of this machine's own step times, from the engine's start-up
    profile (its fitted latency model), so a benchmark means the same on a slow or busy machine
    as on a fast one. They replace ``slo.tpot_ms`` / ``slo.ttft_ms`` (either may be ``None``:
    that one stays absolute).

    Attributes:
        tpot: TPOT SLO = ``tpot`` x the predicted decode step of ``batch_size`` sequences, each
            attending ``context_tokens`` tokens.
        ttft: TTFT SLO = ``ttft`` x the predicted prefill step of a whole token budget
            (``max_num_batched_tokens`` tokens of one sequence).
        batch_size: decoding sequences of the TPOT reference step (default: ``max_num_seqs``).
        context_tokens: KV length of each of them (default: ``workload.max_prompt_tokens``).
    """

    tpot: float | None = 3.0
    ttft: float | None = 10.0
    batch_size: int | None = None
    context_tokens: int | None = None

    def __post_init__(self):
        for name in ("tpot", "ttft"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"relative_slo.{name} must be a number > 0 or null, got {v!r}")
        for name in ("batch_size", "context_tokens"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"relative_slo.{name} must be an integer >= 1 or null, got {v!r}")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A whole benchmark (see the module docstring)."""

    name: str
    rates: tuple[float, ...]
    model: ModelSpec
    lora: LoRASpec = LoRASpec()
    engine: dict = dataclasses.field(default_factory=dict)
    slo: SLOConfig = SLOConfig()
    relative_slo: RelativeSLO | None = None
    workload: WorkloadConfig = WorkloadConfig()
    policies: dict = dataclasses.field(default_factory=lambda: {p: {} for p in POLICIES})
    finetune: FinetuneSpec = FinetuneSpec()
    run: RunSpec = RunSpec()

    @property
    def policy_names(self) -> list[str]:
        """The configured policies in :data:`POLICIES` order."""
        return [p for p in POLICIES if p in self.policies]


def parse_config(data: Mapping[str, Any], where: str = "config") -> BenchConfig:
    """A :class:`BenchConfig` from a parsed YAML mapping.

    Raises:
        ConfigError: unknown keys, missing ``rates`` or ``model``, bad values.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    top = {"name", "model", "lora", "engine", "slo", "relative_slo", "workload", "rates", "policies", "finetune", "run"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {unknown} (allowed: {sorted(top)})")
    rates = data.get("rates")
    if not rates or not isinstance(rates, list) or not all(isinstance(r, (int, float)) and r > 0 for r in rates):
        raise ConfigError(f"{where}: 'rates' must be a non-empty list of request rates > 0 (requests/s)")
    if "model" not in data:
        raise ConfigError(f"{where}: 'model' is required")
    engine = dict(data.get("engine") or {})
    bad = sorted(set(engine) & set(RESERVED_ENGINE_KEYS))
    if bad:
        raise ConfigError(f"{where}: engine keys {bad} are set by the benchmark (use model, lora, slo, policies)")
    try:
        check_distributed(engine.get("distributed"))
    except ValueError as e:
        raise ConfigError(f"{where}: engine.distributed: {e}") from None
    policies = data.get("policies")
    if policies is None:
        policies = {p: {} for p in POLICIES}
    if not isinstance(policies, Mapping) or not policies:
        raise ConfigError(f"{where}: 'policies' must be a mapping of policy name to options")
    for name, opts in policies.items():
        if name not in POLICIES:
            raise ConfigError(f"{where}: unknown policy {name!r} (known: {list(POLICIES)})")
        extra = sorted(set(opts or {}) - set(POLICY_OPTIONS[name]))
        if extra:
            raise ConfigError(f"{where}: policy {name!r} has unknown options {extra} (allowed: {list(POLICY_OPTIONS[name])})")
    if any(p in policies for p in ("temporal", "fixed_budget", "hybrid")) and "finetune_only" not in policies:
        raise ConfigError(f"{where}: co-serving policies need 'finetune_only' (the finetune_progress baseline)")
    return BenchConfig(
        name=str(data.get("name", "bench")),
        rates=tuple(float(r) for r in rates),
        model=_strict(ModelSpec, data["model"], f"{where}: model"),
        lora=_strict(LoRASpec, data.get("lora"), f"{where}: lora"),
        engine=engine,
        slo=_strict(SLOConfig, data.get("slo"), f"{where}: slo"),
        relative_slo=None if data.get("relative_slo") is None else _strict(RelativeSLO, data["relative_slo"], f"{where}: relative_slo"),
        workload=_strict(WorkloadConfig, data.get("workload"), f"{where}: workload"),
        policies={k: dict(v or {}) for k, v in policies.items()},
        finetune=_strict(FinetuneSpec, data.get("finetune"), f"{where}: finetune"),
        run=_strict(RunSpec, data.get("run"), f"{where}: run"),
    )


def load_config(path: str | os.PathLike) -> BenchConfig:
    """Read and validate a bench config file.

    Raises:
        FileNotFoundError: no such file. ConfigError: invalid YAML or contents.
    """
    return parse_config(read_yaml(path), os.fspath(path))
