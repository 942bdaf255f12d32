"""Adapter slots of a model's LoRA pool: load, unload, look up, export.

An adapter is addressed by name; its adapter index (what each token carries) is its slot + 1.
Loading writes one slot of every pool stack with a jitted, donated ``dynamic_update_slice``
whose slot argument is traced, so adapter churn changes array values only: neither the model's
forward nor the writer recompiles for another slot or another adapter.

Everything is validated before the first write, so an adapter that does not fit leaves the
pool exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from coserve_jax.executable_cache import ExecutableCache, compile_ahead
from coserve_jax.lora.peft_io import LoRAModule, LoRAWeights, module_path, read_peft, write_peft
from coserve_jax.models.decoder import CausalLM
from coserve_jax.parallel.rules import fetch


class AdapterError(ValueError):
    """An adapter that cannot be loaded into this pool, or an unknown adapter name."""


@dataclasses.dataclass(frozen=True)
class _SlotInfo:
    name: str
    ranks: dict[tuple[int, str], int]
    alphas: dict[tuple[int, str], float]
    use_rslora: bool
    base_model_name_or_path: str | None


def _write_slot_impl(stack: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, value.astype(stack.dtype), slot, axis=1)


_write_slot = jax.jit(_write_slot_impl, donate_argnums=0)


def _write_stacks_impl(stacks: dict, slot, values: dict) -> dict:
    return {m: tuple(_write_slot_impl(s, slot, v) for s, v in zip(stacks[m], values[m])) for m in stacks}


_write_stacks = jax.jit(_write_stacks_impl, donate_argnums=0)


class AdapterManager:
    """Names <-> slots of a :class:`CausalLM`'s LoRA pool.

    Args:
        model: a model built with a ``lora=LoRAPoolConfig(...)`` pool.
        executable_cache: where the compiled weight writer is kept between processes
            (:class:`~coserve_jax.executable_cache.ExecutableCache`), or ``None``.
    Raises:
        ValueError: the model has no LoRA pool.
    """

    def __init__(self, model: CausalLM, executable_cache: ExecutableCache | None = None):
        if model.lora is None:
            raise ValueError("the model has no LoRA pool: build it with lora=LoRAPoolConfig(...)")
        self.model = model
        self.pool_config = model.lora.config
        self._slots: list[_SlotInfo | None] = [None] * self.pool_config.max_loras
        self.versions: list[int] = [0] * (self.pool_config.max_loras + 1)
        """Per adapter index (slot + 1; index 0 the base model, always 0): a number that changes
        with every write to the slot (load, unload, :meth:`write_weights`), unique over the
        manager's life; the prefix cache keys K/V pages by it."""
        self._writes = 0
        self._writer = None
        self._cache = executable_cache

    @property
    def names(self) -> list[str]:
        """Names of the loaded adapters, by slot."""
        return [s.name for s in self._slots if s is not None]

    def adapter_index(self, name: str | None) -> int:
        """The per-token adapter index of ``name`` (``None`` or ``""`` -> 0, the base model).

        Raises:
            AdapterError: no adapter of that name is loaded.
        """
        if not name:
            return 0
        for i, s in enumerate(self._slots):
            if s is not None and s.name == name:
                return i + 1
        raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {self.names})")

    def load(self, name: str, source: str | os.PathLike | LoRAWeights) -> int:
        """Load an adapter into a free slot.

        Args:
            name: the adapter's name (unique among loaded adapters).
            source: a PEFT adapter directory, or :class:`LoRAWeights`.
        Returns:
            The adapter index tokens use to select it (``1..max_loras``).
        Raises:
            AdapterError: the name is taken, no slot is free, a module is not in the pool's
                ``target_modules``, a rank exceeds ``max_lora_rank``, a shape does not fit the
                model, or a layer does not exist.
            FileNotFoundError, AdapterFormatError: from :func:`read_peft`.
        """
        if not name:
            raise AdapterError("an adapter needs a non-empty name")
        if name in self.names:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
        weights = source if isinstance(source, LoRAWeights) else read_peft(source)
        stacks = self._stacks(weights)
        try:
            slot = self._slots.index(None)
        except ValueError:
            raise AdapterError(f"all {self.pool_config.max_loras} adapter slots are in use (max_loras)") from None
        self._write(slot, stacks)
        self._slots[slot] = _SlotInfo(
            name,
            {k: m.rank for k, m in weights.modules.items()},
            {k: m.alpha for k, m in weights.modules.items()},
            weights.use_rslora,
            weights.base_model_name_or_path,
        )
        return slot + 1

    def check(self, weights: LoRAWeights) -> None:
        """Raise what :meth:`load` would for ``weights`` (modules, ranks, shapes, layers),
        writing nothing.

        Raises:
            AdapterError: the adapter does not fit the pool.
        """
        self._stacks(weights)

    def unload(self, name: str) -> None:
        """Zero the adapter's slot and free it.

        Raises:
            AdapterError: no adapter of that name is loaded.
        """
        slot = self.adapter_index(name) - 1
        self._write(slot, self._stacks(LoRAWeights({})))
        self._slots[slot] = None

    def write_weights(self, index: int, weights: dict[str, tuple[jax.Array, jax.Array]]) -> None:
        """Overwrite the A/B of a loaded adapter in place, on the device (a finetuning job's
        optimizer step). Scaling and bookkeeping are unchanged.

        Args:
            index: the adapter index (slot + 1).
            weights: ``{module: (A [L, in, max_lora_rank], B [L, max_lora_rank, out])}`` in the
                pool's dtype, for every module of the pool.
        Raises:
            AdapterError: an empty slot or not the pool's modules.
        """
        slot = index - 1
        if not 0 <= slot < len(self._slots) or self._slots[slot] is None:
            raise AdapterError(f"adapter index {index} is not loaded")
        pool = self.model.lora
        if set(weights) != set(self.pool_config.target_modules):
            raise AdapterError(f"write_weights needs all of the pool's modules {list(self.pool_config.target_modules)}")
        stacks = {m: (pool.A[m][...], pool.B[m][...]) for m in self.pool_config.target_modules}
        if self._writer is None:
            self.compile_writer()
        for m, (a, b) in self._writer(stacks, np.int32(slot), dict(weights)).items():
            pool.A[m].set_value(a)
            pool.B[m].set_value(b)
        self._bump(slot)

    def _bump(self, slot: int) -> None:
        self._writes += 1
        self.versions[slot + 1] = self._writes

    def slot_shardings(self) -> dict[str, tuple[jax.sharding.Sharding, jax.sharding.Sharding]]:
        """``{module: (A, B)}``: where one slot's weights (``[L, in, R]``, ``[L, R, out]``)
        must be for :meth:`write_weights` (the pool's placement without the slot axis)."""
        pool = self.model.lora
        return {
            m: tuple(_without_axis1(x.sharding, x.ndim - 1) for x in (pool.A[m][...], pool.B[m][...]))
            for m in self.pool_config.target_modules
        }

    def compile_writer(self) -> None:
        """Compile :meth:`write_weights` ahead of time (the engine does at start-up, so that no
        serving step compiles it)."""
        pool = self.model.lora
        # (raw values: arrays, or an abstract model's ShapeDtypeStructs)
        stacks = {m: (pool.A[m].get_raw_value(), pool.B[m].get_raw_value()) for m in self.pool_config.target_modules}
        values = {
            m: tuple(jax.ShapeDtypeStruct(x.shape[:1] + x.shape[2:], x.dtype, sharding=_without_axis1(x.sharding, x.ndim - 1)) for x in ab)
            for m, ab in stacks.items()
        }
        self._writer = compile_ahead(self._cache, "lora write_weights", _write_stacks, stacks,
                                     jax.ShapeDtypeStruct((), jnp.int32), values)

    def get(self, name: str) -> LoRAWeights:
        """Read an adapter back from the device (current values, padding trimmed)."""
        slot = self.adapter_index(name) - 1
        info = self._slots[slot]
        assert info is not None
        pool = self.model.lora
        cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        modules = {}
        for (layer, m), rank in info.ranks.items():
            if m not in cache:
                a, b = fetch((pool.A[m][...][:, slot], pool.B[m][...][:, slot]))  # also from other hosts
                cache[m] = (a.astype(np.float32), b.astype(np.float32))
            a, b = cache[m]
            modules[(layer, m)] = LoRAModule(a[layer, :, :rank].copy(), b[layer, :rank, :].copy(), info.alphas[(layer, m)])
        return LoRAWeights(modules, info.use_rslora, info.base_model_name_or_path)

    def export(self, name: str, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
        """Write the adapter as a PEFT directory (``peft.PeftModel.from_pretrained`` loads it)."""
        write_peft(self.get(name), path, self.model.config.num_layers, base_model_name_or_path)

    def _stacks(self, weights: LoRAWeights) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Validate ``weights`` and lay them out as one slot of every pool stack (host arrays)."""
        cfg, pool = self.model.config, self.pool_config
        L, R = cfg.num_layers, pool.max_lora_rank
        out = {}
        for m in pool.target_modules:
            d_in, d_out = cfg.module_dims(m)
            out[m] = (np.zeros((L, d_in, R), np.float32), np.zeros((L, R, d_out), np.float32), np.zeros(L, np.float32))
        for (layer, m), mod in weights.modules.items():
            where = module_path(layer, m)
            if m not in out:
                raise AdapterError(
                    f"{where}: the pool has no stack for {m!r} (target_modules={list(pool.target_modules)})"
                )
            if not 0 <= layer < L:
                raise AdapterError(f"{where}: the model has {L} layers")
            if mod.rank > R:
                raise AdapterError(f"{where}: rank {mod.rank} exceeds max_lora_rank={R}")
            d_in, d_out = cfg.module_dims(m)
            if mod.a.shape != (d_in, mod.rank) or mod.b.shape != (mod.rank, d_out):
                raise AdapterError(
                    f"{where}: A {list(mod.a.shape)} / B {list(mod.b.shape)} do not fit the model's "
                    f"[{d_in}, r] / [r, {d_out}]"
                )
            a, b, s = out[m]
            a[layer, :, : mod.rank] = mod.a
            b[layer, : mod.rank, :] = mod.b
            s[layer] = weights.scaling((layer, m))
        return out

    def _write(self, slot: int, stacks: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        pool = self.model.lora
        index = jnp.int32(slot)
        for m, (a, b, s) in stacks.items():
            for var, value in ((pool.A[m], a), (pool.B[m], b), (pool.scaling[m], s)):
                current = var[...]
                placed = jax.device_put(value, _without_axis1(current.sharding, value.ndim))
                var.set_value(_write_slot(current, index, placed))
        self._bump(slot)


def _without_axis1(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
    """Sharding of one slot (axis 1 removed) of a stack placed with ``sharding``."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim + 1 - len(tuple(sharding.spec)))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec[0], *spec[2:]))
    return sharding
