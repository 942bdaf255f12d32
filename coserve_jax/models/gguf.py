"""llama.cpp GGUF checkpoints: config from the metadata, dequantized weights, tokenizer and chat template.

A ``.gguf`` file holds everything a Hugging Face directory does (config, weights, tokenizer, chat
template) in one file, usually with quantized weights. We read it with the ``gguf`` package
(ggml's own reader: ``GGUFReader``; ``gguf.quants.dequantize`` for the block formats), and keep
the weights dequantized on the device in the requested dtype (no quantized kernels).

* **Config** (:func:`gguf_config`): ``general.architecture`` (``llama`` or ``qwen2``) and the
  ``{arch}.*`` keys (``block_count``, ``embedding_length``, ``feed_forward_length``,
  ``attention.head_count[_kv]``, ``attention.key_length``, ``attention.layer_norm_rms_epsilon``,
  ``rope.freq_base``, ``rope.dimension_count``, ``rope.scaling.type/factor``,
  ``context_length``, ``vocab_size``) become an HF-style config checked by
  :meth:`ModelConfig.from_hf_dict`; a tied LM head is the absence of ``output.weight``, biases
  are their tensors' presence, and a ``rope_freqs.weight`` tensor (llama.cpp's form of Llama
  3.1's RoPE scaling) becomes per-frequency divisors (:class:`RopeScaling` ``freq_factors``).
  ``dtype="auto"`` is the file's float type for an all-F16 / BF16 / F32 file, else float32.
* **Weights** (:func:`load_gguf_weights`): tensors are dequantized one at a time from the
  memory-mapped file and streamed onto the devices (:class:`~coserve_jax.models.loader.WeightPlacer`):
  peak host memory is the final weights plus about one float32 tensor. llama.cpp's names map
  to ours (``blk.N.attn_q`` -> ``layers.q_proj`` ...); for ``llama`` the Q and K rows are put
  back in Hugging Face order, undoing the interleaving permutation llama.cpp's converter
  (``convert_hf_to_gguf.py``, ``LlamaModel.permute``) applies for its RoPE kernel, as
  ``transformers``' GGUF loader (``LlamaTensorProcessor``) does.
* **Tokenizer** (:func:`load_gguf_tokenizer`): ``transformers``' own GGUF conversion
  (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``), chat template included.

Supported tensor types: whatever the installed ``gguf`` dequantizes (tested: F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K; also Q2_K, Q3_K, Q5_K and the IQ formats). Anything else
(an architecture, a tensor type such as Q8_1 or F64, a tensor name such as a mixture-of-experts
``ffn_gate_exps``) is an error that names it and the tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

import numpy as np

from coserve_jax.models.config import LINEAR_MODULES, ModelConfig, RopeScaling, UnsupportedConfigError
from coserve_jax.models.loader import CheckpointError, Sharding, WeightPlacer

GGUF_ARCHITECTURES = ("llama", "qwen2")
"""``general.architecture`` values we load."""

_LINEAR = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}
_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_TOP = {"token_embd.weight": "embed_tokens", "output_norm.weight": "norm", "output.weight": "lm_head"}
_IGNORED = {"rope_freqs.weight"}  # read into the config
_FILE_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}  # llama.cpp LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_BF16
assert set(_LINEAR.values()) == set(LINEAR_MODULES)


@dataclasses.dataclass(frozen=True)
class _Mapped:
    name: str  # ours
    layer: int | None
    permute: str | None  # "q" or "k": undo llama.cpp's RoPE row permutation


class GGUFFile:
    """An opened GGUF file (memory-mapped): metadata by key, tensors by name.

    Args:
        path: the ``.gguf`` file.
    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a readable GGUF file (bad magic, truncated, unsupported version).
    """

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"GGUF file {self.path!r} does not exist")
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the reader raises ValueError, struct.error, IndexError ... on bad files
            raise CheckpointError(f"{self.name} is not a readable GGUF file: {type(e).__name__}: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (scalar, string or list), or ``default`` when absent."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        """A metadata value.

        Raises:
            UnsupportedConfigError: the key is absent (named).
        """
        value = self.get(key)
        if value is None:
            raise UnsupportedConfigError(key, "required metadata key is missing", self.name)
        return value

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def has_tokenizer(self) -> bool:
        return "tokenizer.ggml.model" in self.reader.fields


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """:class:`GGUFFile` of ``path``, reused while the file is unchanged (parsing the metadata of
    a real model's file takes seconds: its vocabulary is thousands of small fields).

    Raises:
        FileNotFoundError, CheckpointError: see :class:`GGUFFile`.
    """
    path = os.path.realpath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    st = os.stat(path)
    return _open_cached(path, st.st_mtime_ns, st.st_size)


def gguf_config(path: str | os.PathLike, max_model_len: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a GGUF file, from its metadata (see the module docstring).

    Raises:
        FileNotFoundError, CheckpointError: see :class:`GGUFFile`.
        UnsupportedConfigError: an architecture other than llama / qwen2, a missing key, partial
            rotary embeddings, an unsupported RoPE scaling type, or a value
            :meth:`ModelConfig.from_hf_dict` refuses; the GGUF key is named.
    """
    f = open_gguf(path)
    arch = f.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedConfigError(
            "general.architecture", f"{arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})", f.name
        )
    a = lambda key: f"{arch}.{key}"  # noqa: E731
    hidden = int(f.require(a("embedding_length")))
    heads = int(f.require(a("attention.head_count")))
    kv_heads = int(f.get(a("attention.head_count_kv"), heads))
    head_dim = int(f.get(a("attention.key_length"), hidden // heads))
    rot = int(f.get(a("rope.dimension_count"), head_dim))
    if rot != head_dim:
        raise UnsupportedConfigError(
            a("rope.dimension_count"), f"partial rotary embeddings ({rot} of head_dim {head_dim}) are not supported", f.name
        )
    embd = f.tensors.get("token_embd.weight")
    vocab = f.get(a("vocab_size"))
    if vocab is None:
        tokens = f.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else (int(embd.shape[1]) if embd is not None else None)
    if vocab is None:
        raise UnsupportedConfigError(a("vocab_size"), "required metadata key is missing (no vocabulary either)", f.name)
    eos = f.get("tokenizer.ggml.eos_token_id")
    eot = f.get("tokenizer.ggml.eot_token_id")
    eos_ids = [int(x) for x in (eos, eot) if x is not None]
    file_type = f.get("general.file_type")
    hf = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(f.require(a("feed_forward_length"))),
        "num_hidden_layers": int(f.require(a("block_count"))),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(f.get(a("attention.layer_norm_rms_epsilon"), 1e-6)),
        "rope_theta": float(f.get(a("rope.freq_base"), 10000.0)),
        "max_position_embeddings": int(f.get(a("context_length"), 4096)),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "attention_bias": "blk.0.attn_q.bias" in f.tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in f.tensors,
        "torch_dtype": _FILE_TYPES.get(int(file_type), "float32") if file_type is not None else "float32",
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids or None,
    }
    scaling_type = f.get(a("rope.scaling.type"), "none")
    if scaling_type == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(f.require(a("rope.scaling.factor")))}
    elif scaling_type != "none":
        raise UnsupportedConfigError(
            a("rope.scaling.type"), f"{scaling_type!r} RoPE scaling is not supported (none, linear, rope_freqs)", f.name
        )
    gguf_keys = {
        "max_position_embeddings": a("context_length"), "num_key_value_heads": a("attention.head_count_kv"),
        "dtype": "general.file_type", "model_type": "general.architecture",
    }
    try:
        config = ModelConfig.from_hf_dict(hf, max_model_len=max_model_len)
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(gguf_keys.get(e.field, e.field), e.reason, f.name) from None
    freqs = f.tensors.get("rope_freqs.weight")
    if freqs is not None:
        factors = _dequantize(f, freqs).reshape(-1)
        if factors.size != head_dim // 2:
            raise CheckpointError(f"tensor 'rope_freqs.weight' in {f.name} has {factors.size} values; expected head_dim/2={head_dim // 2}")
        config = dataclasses.replace(
            config, rope_scaling=RopeScaling("freq_factors", 1.0, freq_factors=tuple(float(x) for x in factors))
        )
    return config


def _map_name(name: str) -> _Mapped | None:
    if name in _TOP:
        return _Mapped(_TOP[name], None, None)
    m = _LAYER.match(name)
    if m is None:
        return None
    layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
    if part == "attn_norm" and kind == "weight":
        return _Mapped("layers.input_norm", layer, None)
    if part == "ffn_norm" and kind == "weight":
        return _Mapped("layers.post_norm", layer, None)
    if part in _LINEAR:
        module = _LINEAR[part]
        perm = {"attn_q": "q", "attn_k": "k"}.get(part)
        return _Mapped(f"layers.{module}" + ("_bias" if kind == "bias" else ""), layer, perm)
    return None


def _gguf_name(name: str, layer: int | None) -> str:
    """Our parameter name -> the GGUF tensor name (for error messages)."""
    if layer is None:
        return {v: k for k, v in _TOP.items()}[name]
    base = name.removeprefix("layers.")
    if base == "input_norm":
        return f"blk.{layer}.attn_norm.weight"
    if base == "post_norm":
        return f"blk.{layer}.ffn_norm.weight"
    kind = "bias" if base.endswith("_bias") else "weight"
    module = base.removesuffix("_bias")
    return f"blk.{layer}.{ {v: k for k, v in _LINEAR.items()}[module] }.{kind}"


@functools.lru_cache(maxsize=None)
def _can_dequantize(qtype: int) -> bool:
    """Whether the installed ``gguf`` dequantizes this tensor type (tried on one zero block)."""
    import gguf
    from gguf import quants

    t = gguf.GGMLQuantizationType(qtype)
    if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    block, size = gguf.GGML_QUANT_SIZES[t]
    try:
        quants.dequantize(np.zeros((1, size), np.uint8), t)
    except NotImplementedError:
        return False
    return True


def _type_name(qtype) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"unknown type {int(qtype)}"


def _dequantize(f: GGUFFile, t) -> np.ndarray:
    """One tensor as float32, numpy shape = the GGUF shape reversed (``[out, in]`` for linears).

    Raises:
        CheckpointError: a tensor type the installed ``gguf`` cannot dequantize, or data that
            does not fit the tensor's shape (both named).
    """
    import gguf
    from gguf import quants

    qtype = int(t.tensor_type)
    try:
        known = _can_dequantize(qtype)
    except (ValueError, KeyError):
        known = False
    if not known:
        raise CheckpointError(
            f"tensor {t.name!r} in {f.name} has type {_type_name(qtype)}, which the gguf package cannot dequantize"
        )
    shape = tuple(int(d) for d in reversed(list(t.shape)))
    try:
        if qtype == gguf.GGMLQuantizationType.F32:
            out = np.asarray(t.data, np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            out = np.asarray(t.data, np.float16).astype(np.float32)
        else:
            out = quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(qtype))
        return np.asarray(out, np.float32).reshape(shape)
    except (ValueError, AssertionError) as e:
        raise CheckpointError(f"tensor {t.name!r} ({_type_name(qtype)}, shape {list(shape)}) in {f.name} is malformed: {e}") from None


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo ``LlamaModel.permute`` of llama.cpp's converter on the rows (axis 0) of a Q or K
    weight ``[heads * head_dim, ...]`` or bias ``[heads * head_dim]``: Hugging Face's row
    ``i * head_dim / 2 + j`` of head ``h`` (``i`` the rotate-half half) was written at row
    ``2j + i`` of that head (interleaved pairs)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_weights(
    path: str | os.PathLike, config: ModelConfig, dtype, sharding: Sharding | None = None
) -> dict[str, Any]:
    """Dequantize and stream a GGUF file's tensors onto the devices, as
    :func:`~coserve_jax.models.decoder.param_shapes` names them.

    Args:
        path: the ``.gguf`` file.
        config: its config (:func:`gguf_config`).
        dtype: jnp dtype the parameters are cast to.
        sharding: placement per parameter (default: whole on the first device).
    Returns:
        ``{name: jax.Array}``, layer-stacked for ``layers.*``.
    Raises:
        FileNotFoundError, CheckpointError: an unreadable file; a tensor whose type cannot be
            dequantized, whose name we do not know (e.g. mixture-of-experts weights), whose shape
            does not fit the config, or which is missing (each named).
    """
    f = open_gguf(path)
    placer = WeightPlacer(config, dtype, sharding, f.name, _gguf_name)
    permute = config.model_type == "llama"
    unknown = []
    for t in f.reader.tensors:
        if t.name in _IGNORED:
            continue
        mapped = _map_name(t.name)
        if mapped is None:
            unknown.append(t.name)
            continue
        if not placer.expects(mapped.name, mapped.layer):
            if mapped.layer is not None and mapped.layer >= config.num_layers:
                continue  # layers beyond the config's
            raise CheckpointError(f"tensor {t.name!r} in {f.name} is not part of a {config.model_type} model of this config")
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise CheckpointError(
            f"{f.name} holds tensor(s) a {config.model_type} decoder does not have: {', '.join(unknown[:5])}{more}"
        )
    for t in f.reader.tensors:
        mapped = _map_name(t.name)
        if mapped is None or not placer.expects(mapped.name, mapped.layer):
            continue
        w = _dequantize(f, t)
        if permute and mapped.permute is not None:
            heads = config.num_heads if mapped.permute == "q" else config.num_kv_heads
            if w.shape[0] % (2 * heads):
                raise CheckpointError(f"tensor {t.name!r} in {f.name} has {w.shape[0]} rows, not a multiple of 2 x {heads} heads")
            w = _unpermute(w, heads)
        if w.ndim == 2 and mapped.name != "embed_tokens":
            w = w.T  # [out, in] -> our [in, out]
        placer.put(mapped.name, mapped.layer, w)
        del w
    return placer.finish()


def load_gguf_tokenizer(
    path: str | os.PathLike, chat_template: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
):
    """The tokenizer (and chat template) in a GGUF file's metadata, converted by
    ``transformers`` (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``), or ``None`` when
    the file has no tokenizer.

    Args:
        chat_template: optional override (a Jinja string or ``.jinja`` file).
        cache_dir: keep the converted tokenizer there (:func:`coserve_jax.tokenizer.load_tokenizer`).
    Raises:
        FileNotFoundError, CheckpointError: see :class:`GGUFFile`.
        ValueError: a tokenizer model ``transformers`` cannot convert (named).
    """
    f = open_gguf(path)
    if not f.has_tokenizer():
        return None
    from coserve_jax.tokenizer import load_tokenizer

    return load_tokenizer(f.path, chat_template=chat_template, cache_dir=cache_dir)
