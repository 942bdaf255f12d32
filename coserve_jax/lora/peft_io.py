"""Hugging Face PEFT LoRA adapter files: read and write, as plain numpy.

The format is what ``peft.PeftModel.save_pretrained`` writes for a causal LM:
``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``use_rslora``,
``rank_pattern``, ``alpha_pattern``, ``target_modules`` ...) and ``adapter_model.safetensors``
with tensors ``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight``
(``[r, in]``) and ``...lora_B.weight`` (``[out, r]``).

The scaling of a module is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, Kalajdzievski 2023),
with ``r`` and ``alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` when given
(``peft.tuners.lora.LoraModel._create_and_replace``; pattern keys match by
``peft.utils.other.get_pattern_key``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from coserve_jax.models.config import LINEAR_MODULES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
_MLP = ("gate_proj", "up_proj", "down_proj")


class AdapterFormatError(ValueError):
    """A PEFT adapter directory that cannot be read, or uses a feature we do not implement."""


MAX_CONFIG_BYTES = 1 << 20
"""Largest ``adapter_config.json`` read (bytes)."""
MAX_HEADER_BYTES = 100 << 20
"""Largest safetensors header read (bytes; safetensors' own limit is 100 MB)."""
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}


@dataclasses.dataclass(frozen=True)
class PeftLimits:
    """What an adapter must fit, checked before any tensor data is read: at most ``max_rank``,
    layers ``< num_layers``, and each module's ``(in, out)`` from ``module_dims``."""

    max_rank: int
    num_layers: int
    module_dims: dict


def _read_config(cfg_file: str) -> dict:
    size = os.path.getsize(cfg_file)
    if size > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"adapter_config.json is {size} bytes (at most {MAX_CONFIG_BYTES})")
    with open(cfg_file, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterFormatError(f"adapter_config.json is not UTF-8 text (byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise AdapterFormatError(f"adapter_config.json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"adapter_config.json must hold a JSON object, got a {type(cfg).__name__}")

    def positive(name, value, kind):
        ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int) and value > 0
        if not ok:
            raise AdapterFormatError(f"adapter_config.json field '{name}' must be a positive {kind.__name__}, got {value!r}")

    positive("r", cfg.get("r", 8), int)
    positive("lora_alpha", cfg.get("lora_alpha", 8), float)
    for field, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict):
            raise AdapterFormatError(f"adapter_config.json field '{field}' must be an object")
        for k, v in pattern.items():
            positive(f"{field}.{k}", v, kind)
    tm = cfg.get("target_modules")
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(x, str) for x in tm))):
        raise AdapterFormatError(f"adapter_config.json field 'target_modules' must be a string or a list of strings, got {tm!r}")
    return cfg


def check_safetensors_header(w_file: str, limits: PeftLimits | None = None) -> dict:
    """Read and check a safetensors file's header without reading tensor data: the header length
    and JSON, every tensor's dtype, shape and byte range against the file's size, and (with
    ``limits``) its name, layer and shape against the pool. Returns the header.

    Raises:
        AdapterFormatError: naming the tensor or the field at fault.
    """
    size = os.path.getsize(w_file)
    with open(w_file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFormatError(f"{WEIGHTS_NAME} is {size} bytes: too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise AdapterFormatError(f"{WEIGHTS_NAME}: header length {n} exceeds the file ({size} bytes) or {MAX_HEADER_BYTES}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterFormatError(f"{WEIGHTS_NAME}: the header is not JSON: not a safetensors file") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{WEIGHTS_NAME}: the header is not a JSON object")
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
            raise AdapterFormatError(f"tensor {key!r}: unknown dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise AdapterFormatError(f"tensor {key!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            raise AdapterFormatError(f"tensor {key!r}: data_offsets {offsets!r} lie outside the file's {data} data bytes")
        nbytes = math.prod(shape) * _ST_DTYPES[info["dtype"]]
        if offsets[1] - offsets[0] != nbytes:
            raise AdapterFormatError(f"tensor {key!r}: shape {shape} of {info['dtype']} needs {nbytes} bytes, "
                                     f"data_offsets give {offsets[1] - offsets[0]}")
        if limits is None:
            continue
        m = _KEY.match(key)
        if not m or m.group(3) not in limits.module_dims:
            raise AdapterFormatError(f"tensor {key!r}: not a LoRA weight of a module this server's pool covers "
                                     f"({', '.join(limits.module_dims)})")
        layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
        if layer >= limits.num_layers:
            raise AdapterFormatError(f"tensor {key!r}: layer {layer}, the model has {limits.num_layers}")
        d_in, d_out = limits.module_dims[module]
        if len(shape) != 2 or (ab == "A" and shape[1] != d_in) or (ab == "B" and shape[0] != d_out):
            want = f"[r, {d_in}]" if ab == "A" else f"[{d_out}, r]"
            raise AdapterFormatError(f"tensor {key!r}: shape {shape}, expected {want}")
        r = shape[0] if ab == "A" else shape[1]
        if r > limits.max_rank:
            raise AdapterFormatError(f"tensor {key!r}: rank {r} exceeds this server's max_lora_rank={limits.max_rank}")
    return header


def module_path(layer: int, module: str) -> str:
    """PEFT's name of a target module relative to the base model: ``model.layers.{i}.self_attn.q_proj``."""
    block = "mlp" if module in _MLP else "self_attn"
    return f"model.layers.{layer}.{block}.{module}"


@dataclasses.dataclass
class LoRAModule:
    """One LoRA pair on one linear module.

    Attributes:
        a: float32 ``[in, rank]`` (PEFT ``lora_A.weight`` transposed).
        b: float32 ``[rank, out]`` (PEFT ``lora_B.weight`` transposed).
        alpha: ``lora_alpha`` of this module.
    """

    a: np.ndarray
    b: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        """LoRA rank r (columns of ``a``)."""
        return int(self.a.shape[1])


@dataclasses.dataclass
class LoRAWeights:
    """A whole LoRA adapter on host memory.

    Attributes:
        modules: ``{(layer, module_name): LoRAModule}``.
        use_rslora: scaling is ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        base_model_name_or_path: recorded in the PEFT config when exported.
    """

    modules: dict[tuple[int, str], LoRAModule]
    use_rslora: bool = False
    base_model_name_or_path: str | None = None

    def scaling(self, key: tuple[int, str]) -> float:
        """The factor the LoRA output of module ``key`` is multiplied by."""
        m = self.modules[key]
        return m.alpha / (math.sqrt(m.rank) if self.use_rslora else m.rank)

    @property
    def target_modules(self) -> list[str]:
        """Module names present, in ``LINEAR_MODULES`` order."""
        names = {m for _, m in self.modules}
        return [m for m in LINEAR_MODULES if m in names]

    @property
    def max_rank(self) -> int:
        """The largest rank over all modules (0 for an empty adapter)."""
        return max((m.rank for m in self.modules.values()), default=0)


def _pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """``peft.utils.other.get_pattern_key``: the first pattern key that matches ``name``'s suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "adapters that also train whole modules (modules_to_save) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) does not apply to Llama-family models",
    "lora_bias": "LoRA B bias is not supported",
    "layer_replication": "layer replication is not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable token indices are not supported",
}


def read_peft(path: str | os.PathLike, limits: PeftLimits | None = None) -> LoRAWeights:
    """Read a PEFT LoRA adapter directory. Its two files must lie in the directory (a symbolic
    link out of it is refused); the config and the safetensors header are checked before any
    tensor data is read (:func:`check_safetensors_header`).

    Args:
        path: the adapter directory.
        limits: what the adapter must fit (rank, layers, module shapes), checked on the header.
    Raises:
        FileNotFoundError: ``adapter_config.json`` or ``adapter_model.safetensors`` is absent.
        AdapterFormatError: a file linked from outside the directory, a config that is not a
            UTF-8 JSON object with valid fields, a malformed safetensors header, not a LoRA
            adapter, an unsupported feature (DoRA, ``modules_to_save``, bias, ...), a tensor on
            a module other than the seven linear ones, an ``A`` without its ``B``, a rank that
            disagrees with the config, or (``limits``) a tensor that does not fit; each names the
            field or tensor.
    """
    path = os.fspath(path)
    cfg_file, w_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    real_dir = os.path.realpath(path)
    for f in (cfg_file, w_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"PEFT adapter {path!r} has no {os.path.basename(f)}")
        if os.path.dirname(os.path.realpath(f)) != real_dir:
            raise AdapterFormatError(f"{os.path.basename(f)} is a link to a file outside the adapter directory")
    cfg = _read_config(cfg_file)
    check_safetensors_header(w_file, limits)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"adapter_config.json field 'peft_type': {cfg.get('peft_type')!r} is not 'LORA'")
    for field, why in _UNSUPPORTED.items():
        if cfg.get(field):
            raise AdapterFormatError(f"adapter_config.json field '{field}': {why}")
    if cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"adapter_config.json field 'bias': {cfg['bias']!r} is not supported (only 'none')")
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    # framework="flax" (on the host CPU) because numpy has no bfloat16 for safetensors to return.
    with jax.default_device(jax.local_devices(backend="cpu")[0]), safe_open(w_file, framework="flax") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if not m or m.group(3) not in LINEAR_MODULES:
                raise AdapterFormatError(
                    f"tensor {key!r}: only LoRA on {', '.join(LINEAR_MODULES)} of the decoder layers is supported"
                )
            value = np.asarray(f.get_tensor(key)).astype(np.float32)
            halves.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = value

    modules: dict[tuple[int, str], LoRAModule] = {}
    for (layer, name), ab in sorted(halves.items()):
        where = module_path(layer, name)
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{where}: lora_{'B' if 'A' in ab else 'A'}.weight is missing")
        a, b = ab["A"].T, ab["B"].T  # -> [in, r], [r, out]
        key_r = _pattern_key(rank_pattern, where)
        want_r = int(rank_pattern[key_r]) if key_r is not None else r
        if a.shape[1] != want_r or b.shape[0] != want_r:
            raise AdapterFormatError(
                f"{where}: lora_A {list(ab['A'].shape)} / lora_B {list(ab['B'].shape)} do not have rank {want_r} "
                "from adapter_config.json"
            )
        key_a = _pattern_key(alpha_pattern, where)
        mod_alpha = float(alpha_pattern[key_a]) if key_a is not None else alpha
        modules[(layer, name)] = LoRAModule(np.ascontiguousarray(a), np.ascontiguousarray(b), mod_alpha)
    if not modules:
        raise AdapterFormatError(f"PEFT adapter {path!r} holds no LoRA tensors")
    return LoRAWeights(modules, bool(cfg.get("use_rslora", False)), cfg.get("base_model_name_or_path"))


def peft_config(
    weights: LoRAWeights, num_layers: int, base_model_name_or_path: str | None = None, training: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``adapter_config.json`` contents describing ``weights`` exactly (for ``peft`` to reload).

    Args:
        training: ``peft.LoraConfig`` fields of how the adapter was trained, recorded as given
            (``lora_dropout``; ``init_lora_weights``: ``True`` for Kaiming-uniform A, ``"gaussian"``).
    """
    ranks = Counter(m.rank for m in weights.modules.values())
    alphas = Counter(m.alpha for m in weights.modules.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rank_pattern = {module_path(l, n): m.rank for (l, n), m in sorted(weights.modules.items()) if m.rank != r}
    alpha_pattern = {module_path(l, n): m.alpha for (l, n), m in sorted(weights.modules.items()) if m.alpha != alpha}
    covered = {n: {l for (l, nn) in weights.modules if nn == n} for n in weights.target_modules}
    if all(len(layers) == num_layers for layers in covered.values()):
        targets: list[str] = weights.target_modules
    else:
        targets = [module_path(l, n) for (l, n) in sorted(weights.modules)]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or weights.base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": targets,
        "use_rslora": weights.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        **(training or {}),
    }


def write_peft(
    weights: LoRAWeights, path: str | os.PathLike, num_layers: int, base_model_name_or_path: str | None = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Write ``weights`` as a PEFT adapter directory, atomically (``training``: as :func:`peft_config`).

    The files are written to a temporary directory beside ``path`` and moved into place only when
    complete, so a crash never leaves a half-written adapter at ``path`` (an existing one is
    replaced only after the new one is whole).
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        tensors = {}
        for (layer, name), m in sorted(weights.modules.items()):
            prefix = f"base_model.model.{module_path(layer, name)}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(m.a.T.astype(np.float32))
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(m.b.T.astype(np.float32))
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(peft_config(weights, num_layers, base_model_name_or_path, training), f, indent=2)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=parent)
            os.rename(path, os.path.join(old, "adapter"))
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
