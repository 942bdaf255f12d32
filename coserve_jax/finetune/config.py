"""Settings of a finetuning job: the adapter (:class:`LoRAConfig`) and the training
(:class:`FinetuneConfig`).

Names and defaults follow what users know: ``peft.LoraConfig`` for the adapter (``r``,
``lora_alpha``, ``lora_dropout``, ``target_modules``, ``init_lora_weights``, ``use_rslora``) and
``transformers.TrainingArguments`` for training (``learning_rate``, ``lr_scheduler_type``,
``warmup_steps``, ``max_grad_norm``, ``gradient_accumulation_steps``, ``num_train_epochs``,
``max_steps``, ``seed``, ``save_steps``, ``save_total_limit``). The one difference: a micro-batch is
one sequence, so ``gradient_accumulation_steps`` is the number of sequences per optimizer step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from coserve_jax.finetune.data import TRUNCATION_MODES
from coserve_jax.models.config import LINEAR_MODULES

INITS = ("kaiming", "gaussian")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The adapter a job trains (``peft.LoraConfig`` fields and defaults; ``target_modules``
    defaults to PEFT's choice for Llama / Qwen2 / Mistral, ``q_proj`` and ``v_proj``;
    ``"all-linear"`` takes all seven).

    Attributes:
        r: rank (at most the engine's ``max_lora_rank``).
        lora_alpha: alpha; the scaling is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        target_modules: linear modules to adapt (subset of the engine pool's modules).
        lora_dropout: dropout probability on the LoRA branch's input, in ``[0, 1)``.
        init_lora_weights: ``"kaiming"`` (PEFT's default ``True``: A ~ Kaiming-uniform with
            ``a = sqrt(5)``, i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0) or ``"gaussian"`` (A ~ N(0, 1/r);
            B = 0). B = 0 makes the new adapter start equal to the base model.
        use_rslora: rank-stabilized scaling.
    Raises:
        ValueError: out-of-range values or unknown modules.
    """

    r: int = 8
    lora_alpha: float = 8.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    init_lora_weights: str = "kaiming"
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        if self.target_modules == ("all-linear",):
            object.__setattr__(self, "target_modules", LINEAR_MODULES)
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.init_lora_weights not in INITS:
            raise ValueError(f"init_lora_weights must be one of {INITS}, got {self.init_lora_weights!r}")
        bad = [m for m in self.target_modules if m not in LINEAR_MODULES]
        if bad or not self.target_modules:
            raise ValueError(f"target_modules {list(self.target_modules)} must be a non-empty subset of {list(LINEAR_MODULES)}")
        object.__setattr__(self, "target_modules", tuple(m for m in LINEAR_MODULES if m in self.target_modules))

    @property
    def scaling(self) -> float:
        """``alpha / r`` or ``alpha / sqrt(r)`` (rsLoRA)."""
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Training settings of a job.

    Attributes:
        lora: the adapter (:class:`LoRAConfig`).
        optimizer: ``"adamw"`` (``optax.adamw``) or ``"sgd"`` (``optax.sgd``).
        learning_rate: peak learning rate.
        lr_scheduler_type: ``"linear"`` (warm-up, then linear decay to 0 at the last step),
            ``"cosine"`` (warm-up, then cosine decay to 0) or ``"constant"`` (warm-up, then flat).
        warmup_steps: optimizer steps of linear warm-up from 0.
        weight_decay: AdamW's decoupled weight decay.
        adam_beta1, adam_beta2, adam_epsilon: AdamW's moments.
        momentum: SGD momentum (0: plain SGD).
        max_grad_norm: clip the global gradient norm to this (``None`` or 0: no clipping).
        gradient_accumulation_steps: sequences per optimizer step; the loss is the mean over
            the target tokens of those sequences.
        num_train_epochs: passes over the data (ignored when ``max_steps`` is set).
        max_steps: optimizer steps to run (the data repeats as needed), or ``None``.
        seed: adapter initialisation, data order and dropout masks.
        shuffle: reshuffle the data every epoch (else file order).
        train_on_prompt: loss on prompt tokens too (default: completion / assistant tokens only).
        columns: field names for prompt-completion records (``{"prompt": "question",
            "completion": "answer"}`` reads GSM8K).
        chat_template: render Alpaca / prompt-completion records as a one-turn conversation
            through the tokenizer's chat template (chat records always are).
        packing: pack consecutive examples of an accumulation group into training sequences of
            up to ``min(finetune_max_seq_len, max_finetune_tokens)`` tokens, the engine's (TRL's ``packing``, with attention
            kept within each example as TRL's padding-free packing does, so the gradient is
            exactly the unpacked one); ``False``: one example a sequence.
        truncation: a record longer than the engine's ``finetune_max_seq_len``:
            ``"keep_start"`` (truncated, keeping the start, and counted; TRL's
            ``truncation_mode``) or ``"error"`` (the data is refused).
        eval_steps: with an evaluation set, compute the validation loss every this many
            optimizer steps (``None``: only at the end); always at the end too.
        checkpoint_dir: where orbax checkpoints go (``None``: no checkpoints).
        save_steps: checkpoint every this many optimizer steps (and always at the end).
        save_total_limit: checkpoints kept.
        resume: continue from the latest checkpoint in ``checkpoint_dir`` if there is one.
    Raises:
        ValueError: out-of-range values.
    """

    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    momentum: float = 0.0
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int | None = None
    seed: int = 0
    shuffle: bool = True
    train_on_prompt: bool = False
    columns: Mapping[str, str] | None = None
    chat_template: bool = False
    packing: bool = True
    truncation: str = "keep_start"
    eval_steps: int | None = None
    checkpoint_dir: str | os.PathLike | None = None
    save_steps: int | None = None
    save_total_limit: int = 2
    resume: bool = True

    def __post_init__(self):
        if isinstance(self.lora, Mapping):
            object.__setattr__(self, "lora", LoRAConfig(**self.lora))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        checks = {
            "warmup_steps": self.warmup_steps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "momentum": 0 <= self.momentum < 1,
            "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
            "num_train_epochs": self.num_train_epochs > 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "save_steps": self.save_steps is None or self.save_steps >= 1,
            "eval_steps": self.eval_steps is None or self.eval_steps >= 1,
            "save_total_limit": self.save_total_limit >= 1,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("out of range: " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FinetuneConfig":
        """From a plain mapping (YAML / JSON), with ``lora`` a nested mapping.

        Raises:
            ValueError: unknown keys (named) or bad values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown finetuning setting(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("lora"), Mapping):
            lnames = {f.name for f in dataclasses.fields(LoRAConfig)}
            lunknown = sorted(set(d["lora"]) - lnames)
            if lunknown:
                raise ValueError(f"unknown LoRA setting(s) {lunknown}; known: {sorted(lnames)}")
            lora = dict(d["lora"])
            if "target_modules" in lora and not isinstance(lora["target_modules"], str):
                lora["target_modules"] = tuple(lora["target_modules"])
            d["lora"] = LoRAConfig(**lora)
        return cls(**d)
