"""Build a :class:`CausalLM` from a local Hugging Face checkpoint, or with random weights.

Loading streams: tensors are read one at a time from memory-mapped safetensors files (one shard
open at a time), converted (transposed to ``[in, out]``, cast to the requested dtype) and placed
on the device(s) with the sharding the caller chooses for that parameter, so peak host memory is
about one tensor, far below one shard. Decoder-layer tensors are written into their preallocated,
layer-stacked device array in place (a donated ``dynamic_update_slice``).

Tensor parallelism is therefore configuration: pass ``sharding(name, shape)`` returning e.g. a
``NamedSharding`` over a mesh; layer-stacked parameters get a spec whose first axis is the layer
axis, and each layer slice is placed with that spec minus its first entry.
"""

from __future__ import annotations

import functools
import json
import os
import re
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from coserve_jax.models.lora_pool import LoRAPoolConfig
from coserve_jax.models.config import LINEAR_MODULES, ModelConfig
from coserve_jax.models.decoder import CausalLM, param_shapes

Sharding = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]
"""``(parameter name, full shape) -> jax.sharding.Sharding``: where each parameter lives."""

_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_SUBKEYS = {"input_layernorm.weight": "layers.input_norm", "post_attention_layernorm.weight": "layers.post_norm"}
for _m in LINEAR_MODULES:
    _blk = "mlp" if _m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    _LAYER_SUBKEYS[f"{_blk}.{_m}.weight"] = f"layers.{_m}"
    _LAYER_SUBKEYS[f"{_blk}.{_m}.bias"] = f"layers.{_m}_bias"
_TOP_KEYS = {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
_TRANSPOSED = {f"layers.{m}" for m in LINEAR_MODULES} | {"lm_head"}


class CheckpointError(ValueError):
    """A checkpoint's tensors do not fit its config: missing tensors, wrong shapes or dtypes."""


def resolve_dtype(dtype, config: ModelConfig):
    """``"auto"`` (the checkpoint's dtype), a name or a jnp dtype -> a jnp dtype.

    Raises:
        ValueError: a dtype other than float32, bfloat16, float16.
    """
    name = config.dtype if dtype in (None, "auto") else jnp.dtype(dtype).name
    if name not in _FLOAT_DTYPES.values():
        raise ValueError(f"dtype {name!r} is not supported (float32, bfloat16, float16)")
    return jnp.dtype(name)


def default_sharding() -> Sharding:
    """Every parameter whole on the first device."""
    device = jax.devices()[0]
    return lambda name, shape: jax.sharding.SingleDeviceSharding(device)


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint directory, in load order.

    Reads ``model.safetensors.index.json`` when present (sharded checkpoint), else expects
    ``model.safetensors``.

    Raises:
        FileNotFoundError: no such directory, no safetensors weights (a PyTorch ``.bin``-only
            checkpoint is named as such), or a shard listed in the index is absent.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = list(dict.fromkeys(weight_map.values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        bins = [f for f in os.listdir(path) if f.endswith(".bin")]
        hint = f" (found PyTorch pickles {bins}; convert them to safetensors)" if bins else ""
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}{hint}")
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"shard(s) {missing} listed in {index!r} are missing")
    return [os.path.join(path, f) for f in files]


def _hf_key(key: str) -> tuple[str, int | None] | None:
    """Map a Hugging Face tensor name to (our parameter name, layer index or None)."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key], None
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in _LAYER_SUBKEYS:
        return _LAYER_SUBKEYS[m.group(2)], int(m.group(1))
    return None


def _layer_slice_sharding(s: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a layer-stacked parameter placed with ``s``."""
    if isinstance(s, jax.sharding.NamedSharding):
        spec = tuple(s.spec)
        if spec and spec[0] is not None:
            raise ValueError(f"layer-stacked parameters cannot be sharded on the layer axis (spec {s.spec})")
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return s


@functools.lru_cache(maxsize=None)
def _filler(shape: tuple[int, ...], dtype, value: float, sharding: jax.sharding.Sharding):
    return jax.jit(lambda: jnp.full(shape, value, dtype), out_shardings=sharding)


def _zeros(shape, dtype, sharding: jax.sharding.Sharding) -> jax.Array:
    """A zero array created directly on its devices (no host copy)."""
    return _filler(tuple(shape), jnp.dtype(dtype), 0.0, sharding)()


def _set_layer(stack: jax.Array, layer: int, value: jax.Array) -> jax.Array:
    return _SET_LAYER(stack, jnp.int32(layer), value)


_SET_LAYER = jax.jit(lambda stack, i, v: jax.lax.dynamic_update_index_in_dim(stack, v, i, 0), donate_argnums=0)


class WeightPlacer:
    """Puts host tensors onto the devices as a checkpoint streams them, as :func:`param_shapes`
    names them, and checks that every expected tensor came (any checkpoint format).

    Each :meth:`put` casts one tensor (already in our layout: linear weights ``[in, out]``) to
    ``dtype`` and places it with ``sharding``; a decoder-layer tensor is written into its
    preallocated layer-stacked device array in place, so host memory holds one tensor at a time.

    Args:
        config: decides which tensors are expected, and their shapes.
        dtype: jnp dtype the parameters are cast to.
        sharding: placement per parameter (default: whole on the first device).
        source: the checkpoint's name in error messages.
        describe: ``(name, layer) -> the tensor's name in the checkpoint`` for error messages.
    """

    def __init__(self, config: ModelConfig, dtype, sharding: Sharding | None, source: str,
                 describe: Callable[[str, int | None], str]):
        self.shapes = param_shapes(config)
        self.dtype = dtype
        self.sharding = sharding or default_sharding()
        self.source = source
        self.describe = describe
        self.expected: set[tuple[str, int | None]] = set()
        for name in self.shapes:
            if name.startswith("layers."):
                self.expected.update((name, i) for i in range(config.num_layers))
            else:
                self.expected.add((name, None))
        self.out: dict[str, jax.Array] = {}
        self.seen: set[tuple[str, int | None]] = set()

    def expects(self, name: str, layer: int | None) -> bool:
        """Whether ``(name, layer)`` is a parameter of this config."""
        return (name, layer) in self.expected

    def shape_of(self, name: str, layer: int | None) -> tuple[int, ...]:
        """The shape :meth:`put` takes for ``(name, layer)`` (one layer's for stacked ones)."""
        full = self.shapes[name]
        return tuple(full[1:] if layer is not None else full)

    def put(self, name: str, layer: int | None, host: np.ndarray) -> None:
        """Place one tensor (our layout) on the devices.

        Raises:
            CheckpointError: a shape other than :meth:`shape_of` (both named).
        """
        want = self.shape_of(name, layer)
        if tuple(host.shape) != want:
            raise CheckpointError(
                f"tensor {self.describe(name, layer)!r} in {self.source} has shape {list(host.shape)} (in our "
                f"[in, out] layout), but the model config implies {list(want)}"
            )
        full = self.shapes[name]
        host = np.ascontiguousarray(host.astype(self.dtype))
        target = self.sharding(name, full)
        if layer is None:
            self.out[name] = jax.device_put(host, target)
        else:
            if name not in self.out:
                self.out[name] = _zeros(full, self.dtype, target)
            value = jax.device_put(host, _layer_slice_sharding(target))
            self.out[name] = _set_layer(self.out[name], layer, value)
        self.seen.add((name, layer))

    def finish(self) -> dict[str, jax.Array]:
        """``{name: array}``, layer-stacked for ``layers.*``.

        Raises:
            CheckpointError: tensors that never came (the first 8 named).
        """
        missing = sorted(self.expected - self.seen, key=lambda nl: (nl[0], -1 if nl[1] is None else nl[1]))
        if missing:
            shown = ", ".join(self.describe(n, l) for n, l in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise CheckpointError(f"checkpoint {self.source} is missing {len(missing)} tensor(s): {shown}{more}")
        return self.out


def load_weights(
    path: str | os.PathLike, config: ModelConfig, dtype, sharding: Sharding | None = None
) -> dict[str, jax.Array]:
    """Stream a safetensors checkpoint's tensors onto the devices, as :func:`param_shapes` names them.

    Args:
        path: checkpoint directory.
        config: its :class:`ModelConfig` (decides which tensors are expected, and their shapes).
        dtype: jnp dtype the parameters are cast to.
        sharding: placement per parameter (default: whole on the first device).
    Returns:
        ``{name: array}`` with layer-stacked arrays for ``layers.*``.
    Raises:
        FileNotFoundError: see :func:`checkpoint_files`.
        CheckpointError: a missing tensor, a tensor of the wrong shape, or one of a non-float
            dtype (e.g. a quantized checkpoint), each named.
    """
    placer = WeightPlacer(config, dtype, sharding, repr(os.fspath(path)), _hf_name)
    cpu = jax.local_devices(backend="cpu")[0]
    for file in checkpoint_files(path):
        with jax.default_device(cpu), safe_open(file, framework="flax") as f:
            for key in f.keys():
                mapped = _hf_key(key)
                if mapped is None or not placer.expects(*mapped):
                    continue  # rotary inv_freq buffers, a tied lm_head copy, layers beyond num_layers
                name, layer = mapped
                info = f.get_slice(key)
                src_dtype, src_shape = info.get_dtype(), tuple(info.get_shape())
                if src_dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(
                        f"tensor {key!r} in {os.path.basename(file)} has dtype {src_dtype}; "
                        f"expected one of {sorted(_FLOAT_DTYPES)} (quantized checkpoints are not supported)"
                    )
                want = placer.shape_of(name, layer)
                if name in _TRANSPOSED:
                    want = want[::-1]
                if src_shape != tuple(want):
                    raise CheckpointError(
                        f"tensor {key!r} in {os.path.basename(file)} has shape {list(src_shape)}, "
                        f"but config.json implies {list(want)}"
                    )
                host = np.asarray(f.get_tensor(key))
                placer.put(name, layer, host.T if name in _TRANSPOSED else host)
                del host
    return placer.finish()


def _hf_name(name: str, layer: int | None) -> str:
    if layer is None:
        return {v: k for k, v in _TOP_KEYS.items()}[name]
    sub = {v: k for k, v in _LAYER_SUBKEYS.items()}[name]
    return f"model.layers.{layer}.{sub}"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its ``.gguf`` suffix, or its ``GGUF`` magic bytes)."""
    path = os.fspath(path)
    if path.lower().endswith(".gguf"):
        return True
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_config(path: str | os.PathLike, max_model_len: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint directory (``config.json``) or a ``.gguf`` file
    (its metadata, :func:`coserve_jax.models.gguf.gguf_config`).

    Raises:
        FileNotFoundError: no such checkpoint. UnsupportedConfigError, CheckpointError: see
        :meth:`ModelConfig.from_hf_dict` and :func:`~coserve_jax.models.gguf.gguf_config`.
    """
    if is_gguf(path):
        from coserve_jax.models.gguf import gguf_config

        return gguf_config(path, max_model_len=max_model_len)
    return ModelConfig.from_pretrained(path, max_model_len=max_model_len)


def _build(config: ModelConfig, dtype, lora: LoRAPoolConfig | None, sharding: Sharding, base_init) -> CausalLM:
    def param_init(name, shape, dt):
        if name.startswith("lora."):
            return _zeros(shape, dt, sharding(name, shape))
        return base_init(name, tuple(shape), dt)

    return CausalLM(config, dtype=dtype, param_init=param_init, lora=lora)


def load_model(
    path: str | os.PathLike,
    *,
    dtype="auto",
    lora: LoRAPoolConfig | None = None,
    sharding: Sharding | None = None,
    max_model_len: int | None = None,
) -> CausalLM:
    """Load a Llama / Qwen2 / Mistral checkpoint into a :class:`CausalLM`.

    Args:
        path: a local directory with ``config.json`` and safetensors weights (single or
            sharded), or a llama.cpp ``.gguf`` file (:mod:`coserve_jax.models.gguf`; its
            quantized tensors are dequantized to ``dtype``).
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a jnp dtype.
        lora: adapter pool shape, or ``None`` for no adapters. The pool starts empty (all zeros).
        sharding: per-parameter placement (names as :func:`param_shapes` and ``lora.{module}.A|B|scaling``).
        max_model_len: longest sequence to run, in tokens (default: the checkpoint's context).
    Raises:
        FileNotFoundError, UnsupportedConfigError, CheckpointError: see
        :meth:`ModelConfig.from_pretrained` and :func:`load_weights` (or
        :func:`coserve_jax.models.gguf.load_gguf_weights`).
    """
    config = load_config(path, max_model_len=max_model_len)
    dtype = resolve_dtype(dtype, config)
    sharding = sharding or default_sharding()
    if is_gguf(path):
        from coserve_jax.models.gguf import load_gguf_weights

        weights = load_gguf_weights(path, config, dtype, sharding)
    else:
        weights = load_weights(path, config, dtype, sharding)
    return _build(config, dtype, lora, sharding, lambda name, shape, dt: weights.pop(name))


def init_random(
    config: ModelConfig,
    seed: int = 0,
    *,
    dtype="auto",
    lora: LoRAPoolConfig | None = None,
    sharding: Sharding | None = None,
) -> CausalLM:
    """A :class:`CausalLM` of the config's real shapes with random weights (for benchmarks).

    Weights are normal with std ``config.initializer_range`` (as ``LlamaPreTrainedModel._init_weights``),
    norms are ones, biases and the LoRA pool zeros. Each parameter is generated directly on its
    devices with its sharding, so an 8B model never passes through host memory. The same seed
    gives the same weights.
    """
    dtype = resolve_dtype(dtype, config)
    sharding = sharding or default_sharding()
    root = jax.random.key(seed)

    def base_init(name, shape, dt):
        target = sharding(name, shape)
        if name.endswith("norm"):
            return _filler(tuple(shape), jnp.dtype(dt), 1.0, target)()
        if name.endswith("_bias"):
            return _zeros(shape, dt, target)
        key = jax.random.fold_in(root, zlib.crc32(name.encode()))
        gen = jax.jit(
            lambda k: (config.initializer_range * jax.random.normal(k, shape, jnp.float32)).astype(dt),
            out_shardings=target,
        )
        return gen(key)

    return _build(config, dtype, lora, sharding, base_init)


def init_abstract(config: ModelConfig, *, dtype="auto", lora: LoRAPoolConfig | None = None) -> CausalLM:
    """A :class:`CausalLM` whose parameters are ``jax.ShapeDtypeStruct`` only (no memory used).

    For lowering and compiling at full model shape without allocating weights, e.g.
    ``jax.jit(f).lower(nnx.state(model), ...)`` and ``compiled.memory_analysis()``.
    """
    dtype = resolve_dtype(dtype, config)
    return nnx.eval_shape(
        lambda: CausalLM(config, dtype=dtype, param_init=lambda n, s, dt: jnp.zeros(s, dt), lora=lora)
    )
