"""Model configuration read from a Hugging Face checkpoint's ``config.json``.

One :class:`ModelConfig` describes every decoder we support: Llama 2, Llama 3 / 3.1 / 3.2
(``transformers.LlamaConfig``), Qwen2 / Qwen2.5 (``Qwen2Config``) and Mistral (``MistralConfig``).
Both config layouts that ``transformers`` writes are understood: the 4.x layout (``rope_theta`` and
``rope_scaling`` at top level) and the 5.x layout (``rope_parameters``).

Anything in the file that would change what the network computes and that we do not implement
raises :class:`UnsupportedConfigError` naming the field, rather than silently computing something
else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")


class UnsupportedConfigError(ValueError):
    """A ``config.json`` field holds a value this implementation does not compute.

    Attributes:
        field: the dotted name of the offending field, e.g. ``"rope_scaling.rope_type"`` (or a
            GGUF metadata key such as ``"general.architecture"``).
        source: where the field is (``"config.json"``, or a GGUF file's name).
    """

    def __init__(self, field: str, message: str, source: str = "config.json"):
        self.field = field
        self.source = source
        self.reason = message
        super().__init__(f"{source} field '{field}': {message}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (``transformers.modeling_rope_utils``).

    Attributes:
        rope_type: ``"linear"``, ``"llama3"`` or ``"freq_factors"``.
        factor: frequency divisor (``linear`` and ``llama3``).
        low_freq_factor, high_freq_factor, original_max_position_embeddings: ``llama3`` only
            (Llama 3.1 report, section 3; ``_compute_llama3_parameters`` in transformers).
        freq_factors: ``freq_factors`` only: one divisor per rotary frequency (``head_dim // 2``
            floats), as llama.cpp applies a GGUF file's ``rope_freqs.weight`` tensor (its
            converter stores Llama 3.1's scaling that way).
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder; hashable, so it can be a static jit argument.

    Attributes:
        model_type: ``"llama"``, ``"qwen2"`` or ``"mistral"``.
        vocab_size, hidden_size, intermediate_size: sizes in elements.
        num_layers, num_heads, num_kv_heads, head_dim: attention layout (GQA when
            ``num_kv_heads < num_heads``).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: ``None`` for plain RoPE, else a :class:`RopeScaling`.
        max_position_embeddings: the checkpoint's trained context, in tokens.
        max_model_len: the longest sequence this instance will run, in tokens (<= the above).
        qkv_bias: q/k/v projections have a bias (Qwen2 always; Llama when ``attention_bias``).
        o_bias: o projection has a bias (Llama ``attention_bias``).
        mlp_bias: gate/up/down projections have a bias (Llama ``mlp_bias``).
        tie_word_embeddings: the LM head reuses the embedding matrix.
        dtype: the checkpoint's dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
        initializer_range: std of the normal init used by :func:`init_random`.
        bos_token_id: may be ``None``.
        eos_token_ids: tuple of ids that end generation (``eos_token_id`` may be an int or list).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    max_model_len: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        """Width of the q projection output, ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the k (and v) projection output, ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    def module_dims(self, module: str) -> tuple[int, int]:
        """(input width, output width) of a linear module of a decoder layer.

        Args:
            module: one of ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``.
        Raises:
            KeyError: unknown module name.
        """
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]

    def num_params(self) -> int:
        """Number of base-model parameters (elements), embeddings and LM head included."""
        per_layer = sum(a * b for a, b in (self.module_dims(m) for m in LINEAR_MODULES))
        per_layer += 2 * self.hidden_size
        if self.qkv_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.o_bias:
            per_layer += self.hidden_size
        if self.mlp_bias:
            per_layer += 2 * self.intermediate_size + self.hidden_size
        total = self.num_layers * per_layer + self.vocab_size * self.hidden_size + self.hidden_size
        if not self.tie_word_embeddings:
            total += self.vocab_size * self.hidden_size
        return total

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_model_len: int | None = None) -> "ModelConfig":
        """Read ``config.json`` from a checkpoint directory (or the file itself).

        Raises:
            FileNotFoundError: no ``config.json`` there.
            UnsupportedConfigError: see :meth:`from_hf_dict`.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json in {path!r}: expected a Hugging Face checkpoint directory")
        with open(file, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f), max_model_len=max_model_len)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], max_model_len: int | None = None) -> "ModelConfig":
        """Build a config from the parsed ``config.json`` of a Llama / Qwen2 / Mistral checkpoint.

        Args:
            d: the JSON object.
            max_model_len: longest sequence to run (tokens); defaults to ``max_position_embeddings``.
        Raises:
            UnsupportedConfigError: naming the field, for an unknown ``model_type``, an activation
                other than SiLU, an unknown ``rope_scaling`` type, a sliding window that would be in
                effect within ``max_model_len``, a quantized checkpoint, or a missing required field.
        """
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                "model_type", f"{model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def req(key: str) -> Any:
            if d.get(key) is None:
                raise UnsupportedConfigError(key, "required field is missing")
            return d[key]

        if d.get("quantization_config"):
            raise UnsupportedConfigError("quantization_config", "quantized checkpoints are not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError("hidden_act", f"{act!r} is not supported (only 'silu')")

        hidden = int(req("hidden_size"))
        heads = int(req("num_attention_heads"))
        kv_heads = int(d.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise UnsupportedConfigError(
                "num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}"
            )
        head_dim = int(d.get("head_dim") or hidden // heads)
        max_pos = int(d.get("max_position_embeddings", 4096))
        model_len = int(max_model_len or max_pos)
        if model_len > max_pos:
            raise UnsupportedConfigError(
                "max_position_embeddings", f"max_model_len={model_len} exceeds the checkpoint's {max_pos}"
            )

        _check_sliding_window(d, model_type, model_len)
        theta, scaling = _parse_rope(d)

        dtype = d.get("dtype") or d.get("torch_dtype") or "bfloat16"
        if dtype not in DTYPES:
            raise UnsupportedConfigError("dtype", f"{dtype!r} is not supported ({', '.join(DTYPES)})")

        eos = d.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)

        attention_bias = bool(d.get("attention_bias", False))
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False  # Qwen2Attention: bias on q/k/v only
        elif model_type == "mistral":
            qkv_bias = o_bias = mlp_bias = False
        else:
            qkv_bias = o_bias = attention_bias
            mlp_bias = bool(d.get("mlp_bias", False))

        return cls(
            model_type=model_type,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_layers=int(req("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            max_model_len=model_len,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            dtype=dtype,
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven linear modules of a decoder layer, in Hugging Face naming; LoRA may target any subset."""


def _check_sliding_window(d: Mapping[str, Any], model_type: str, model_len: int) -> None:
    """Raise if sliding-window attention would change any result within ``model_len`` tokens."""
    window = d.get("sliding_window")
    if model_type == "qwen2":
        layer_types = d.get("layer_types") or []
        if d.get("use_sliding_window") or "sliding_attention" in layer_types:
            field = "use_sliding_window" if d.get("use_sliding_window") else "layer_types"
            if window is not None and model_len <= int(window):
                return  # the window never cuts anything off
            raise UnsupportedConfigError(
                field, f"sliding-window attention (window {window}) is not supported; "
                f"pass max_model_len <= {window} to run within the window"
            )
        return
    if window is not None and int(window) < model_len:
        raise UnsupportedConfigError(
            "sliding_window", f"sliding-window attention (window {window} < max_model_len {model_len}) "
            f"is not supported; pass max_model_len <= {window}"
        )


def _parse_rope(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Return (rope_theta, scaling) from either the transformers 4.x or 5.x config layout."""
    params = d.get("rope_parameters")
    if isinstance(params, Mapping) and params:
        field = "rope_parameters"
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = dict(params)
    else:
        field = "rope_scaling"
        theta = float(d.get("rope_theta", 10000.0))
        scaling = dict(d.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{field}.rope_type", f"{rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    if "factor" not in scaling:
        raise UnsupportedConfigError(f"{field}.factor", f"required for rope_type {rope_type!r}")
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise UnsupportedConfigError(f"{field}.{key}", "required for rope_type 'llama3'")
    return theta, RopeScaling(
        "llama3",
        float(scaling["factor"]),
        float(scaling["low_freq_factor"]),
        float(scaling["high_freq_factor"]),
        int(scaling["original_max_position_embeddings"]),
    )
