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


def read_peft(path: str | os.PathLike) -> LoRAWeights:
    """Read a PEFT LoRA adapter directory.

    Raises:
        FileNotFoundError: ``adapter_config.json`` or ``adapter_model.safetensors`` is absent.
        AdapterFormatError: not a LoRA adapter, an unsupported feature (DoRA, ``modules_to_save``,
            bias, ...), a tensor on a module other than the seven linear ones, an ``A`` without
            its ``B``, or a rank that disagrees with the config; each names the field or tensor.
    """
    path = os.fspath(path)
    cfg_file, w_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for f in (cfg_file, w_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"PEFT adapter {path!r} has no {os.path.basename(f)}")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
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
