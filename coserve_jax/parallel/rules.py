"""Where every array lives under tensor parallelism, and the collectives a decoder layer issues.

Base layers are split Megatron-style (Shoeybi et al. 2019, "Megatron-LM", section 3):

* **column-parallel** ``q_proj k_proj v_proj gate_proj up_proj``: the kernel ``[in, out]`` is
  split on ``out`` (attention by heads, the MLP by intermediate features); the input is the
  replicated residual stream; no collective in the forward, one all-reduce of the input
  gradient in the backward (Megatron's ``f``).
* **row-parallel** ``o_proj down_proj``: the kernel is split on ``in``; each device's product is
  a partial sum, all-reduced once (Megatron's ``g``); the backward needs no collective.
* ``k_proj`` / ``v_proj`` when the tensor-parallel size exceeds the number of KV heads: the
  kernels are replicated and each device keeps the KV head its query heads use (vLLM replicates
  KV heads the same way); the KV cache then holds ``tp`` heads, one per device.
* Norms and the embedding are replicated; the untied LM head is split on the vocabulary when it
  divides (the logits are gathered for sampling and the loss).

**Dependent parallelization** (FlexLLM, NSDI 2026): a
LoRA bypass ``y += s * (x A) B`` is placed by :meth:`ShardingRules.lora_axes`, the one rule:
*A takes its base kernel's input-axis sharding, B its base kernel's output-axis sharding*. So a
column-parallel base has A replicated and B split on ``out`` (every device computes ``x A`` and
its own columns of the bypass); a row-parallel base has A split on ``in`` and B replicated (each
device's ``x_i A_i B`` is a partial sum added to the base's partial sum *before* the all-reduce).
Neither adds a collective to the forward.

Finetuning state follows the same rule: the saved layer inputs and the boundary gradient are
the replicated residual stream; a job's master weights and optimizer state are placed as its
pool slot. The gradient of a *replicated* LoRA weight is only a partial sum on each device (each
device sees its own heads / features), so the accumulator keeps one partial per device (a
leading ``tp`` axis) and the optimizer step sums them: one all-reduce per optimizer step, none
per token or per backward slice.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from coserve_jax.models.config import LINEAR_MODULES, ModelConfig
from coserve_jax.parallel.mesh import TENSOR_AXIS

ROW_PARALLEL = ("o_proj", "down_proj")
"""Base modules split on their input axis (their products are all-reduced)."""

COLUMN_PARALLEL = tuple(m for m in LINEAR_MODULES if m not in ROW_PARALLEL)
"""Base modules split on their output axis."""


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """What a decoder layer needs to run on its shard inside ``jax.shard_map`` (static).

    Attributes:
        axis: the mesh axis name (``"tp"``).
        size: devices on it.
        kv_replicas: devices sharing one KV head (``tp // num_kv_heads`` when ``tp`` exceeds the
            KV heads, else 1; then each device computes all KV heads and keeps its own).
        row_modules: modules whose input is split (their LoRA input features are offset).
        replicated_lora: ``(module, "A" | "B")`` pairs replicated on every device, whose
            gradients are per-device partial sums.
    """

    axis: str
    size: int
    kv_replicas: int
    row_modules: frozenset[str]
    replicated_lora: frozenset[tuple[str, str]]

    def enter(self, x: jax.Array) -> jax.Array:
        """Megatron's ``f``: the replicated input of column-parallel layers; identity forward,
        all-reduce of the gradient backward (``jax.lax.pcast`` to device-varying)."""
        return jax.lax.pcast(x, self.axis, to="varying")

    def reduce(self, y: jax.Array) -> jax.Array:
        """Megatron's ``g``: all-reduce the partial sums of a row-parallel layer (forward);
        identity backward."""
        return jax.lax.psum(y, self.axis)

    def index(self) -> jax.Array:
        """This device's position on the axis (int32 scalar)."""
        return jax.lax.axis_index(self.axis)

    def feature_offset(self, module: str, local_features: int):
        """Global index of this device's first input feature of ``module`` (0 unless row-parallel)."""
        return self.index() * local_features if module in self.row_modules else 0

    def local_kv(self, x: jax.Array) -> jax.Array:
        """``[T, Hkv, D]`` -> this device's KV heads: all of its shard, or (replicated KV heads)
        the one head its query heads use, ``[T, 1, D]``."""
        if self.kv_replicas == 1:
            return x
        return jax.lax.dynamic_slice_in_dim(x, self.index() // self.kv_replicas, 1, axis=1)

    def varying_lora(self, module: str, which: str, w: jax.Array) -> jax.Array:
        """``w`` marked device-varying when it is replicated, so that its gradient stays this
        device's partial sum instead of being all-reduced on the spot (used by the backward)."""
        return jax.lax.pcast(w, self.axis, to="varying") if (module, which) in self.replicated_lora else w


class ShardingRules:
    """The placement of every array of an engine on a ``(data, tp)`` mesh (see the module docstring).

    Args:
        config: the model.
        mesh: from :func:`coserve_jax.parallel.mesh.make_mesh`.
    Raises:
        ValueError: a tensor-parallel size the model cannot be split by (attention heads,
            KV heads or MLP width not divisible), with the numbers.
    """

    def __init__(self, config: ModelConfig, mesh: Mesh):
        tp = mesh.shape[TENSOR_AXIS]
        self.config = config
        self.mesh = mesh
        self.size = tp
        hq, hkv = config.num_heads, config.num_kv_heads
        problems = []
        if hq % tp:
            problems.append(f"num_attention_heads={hq}")
        if hkv % tp and tp % hkv:
            problems.append(f"num_key_value_heads={hkv} (nor does tp divide by it)")
        if config.intermediate_size % tp:
            problems.append(f"intermediate_size={config.intermediate_size}")
        if problems:
            raise ValueError(f"tensor_parallel_size={tp} does not divide {', '.join(problems)}")
        self.kv_heads_split = hkv % tp == 0
        self.kv_replicas = 1 if self.kv_heads_split else tp // hkv
        self.kv_cache_heads = hkv if self.kv_heads_split else tp
        """KV heads the cache holds in all (``tp`` when KV heads are replicated: one per device)."""
        self.vocab_split = tp > 1 and config.vocab_size % tp == 0
        row = frozenset(ROW_PARALLEL)
        replicated = frozenset(
            (m, w) for m in LINEAR_MODULES for w, axes in self.lora_axes(m).items() if axes == (None, None)
        )
        self.tensor_parallel = TensorParallel(TENSOR_AXIS, tp, self.kv_replicas, row, replicated)
        self.replicated = NamedSharding(mesh, P())

    # ---- the rules --------------------------------------------------------------------------
    def kernel_axes(self, module: str) -> tuple[str | None, str | None]:
        """Mesh axis of a base kernel's ``(in, out)`` dims (Megatron column / row parallel)."""
        if module in ROW_PARALLEL:
            return (TENSOR_AXIS, None)
        if module in ("k_proj", "v_proj") and not self.kv_heads_split:
            return (None, None)
        return (None, TENSOR_AXIS)

    def lora_axes(self, module: str) -> dict[str, tuple[str | None, str | None]]:
        """Dependent parallelization, the one rule: ``A [in, R]`` takes the base kernel's ``in``
        axis, ``B [R, out]`` its ``out`` axis; the rank axis is never split."""
        d_in, d_out = self.kernel_axes(module)
        return {"A": (d_in, None), "B": (None, d_out)}

    def grad_partials(self, module: str, which: str) -> int:
        """Size of the per-device partial-sum axis of a LoRA weight's gradient accumulator:
        ``tp`` for a replicated weight, 1 for a split one (its local gradient is complete)."""
        return self.size if (module, which) in self.tensor_parallel.replicated_lora else 1

    # ---- specs by parameter name -----------------------------------------------------------
    def spec(self, name: str) -> P:
        """The :class:`PartitionSpec` of a model parameter by name (names as
        :func:`coserve_jax.models.decoder.param_shapes` and ``lora.{module}.A|B|scaling``).

        Raises:
            KeyError: an unknown name.
        """
        if name in ("embed_tokens", "norm", "layers.input_norm", "layers.post_norm"):
            return P()
        if name == "lm_head":
            return P(None, TENSOR_AXIS) if self.vocab_split else P()
        if name.startswith("layers."):
            module = name[len("layers."):]
            if module.endswith("_bias") and module[: -len("_bias")] in LINEAR_MODULES:
                return P(None, self.kernel_axes(module[: -len("_bias")])[1])
            if module in LINEAR_MODULES:
                return P(None, *self.kernel_axes(module))
        if name.startswith("lora."):
            _, module, which = name.split(".")
            if which == "scaling":
                return P()
            if module in LINEAR_MODULES and which in ("A", "B"):
                return P(None, None, *self.lora_axes(module)[which])  # [L, S, ...]
        raise KeyError(f"no sharding rule for parameter {name!r}")

    def sharding(self, name: str, shape: tuple[int, ...] | None = None) -> NamedSharding:
        """The loader's ``sharding(name, shape)`` callable (:mod:`coserve_jax.models.loader`)."""
        return NamedSharding(self.mesh, self.spec(name))

    def named(self, spec: P) -> NamedSharding:
        """``spec`` on this mesh."""
        return NamedSharding(self.mesh, spec)

    def layer_specs(self, layers: dict) -> dict:
        """Specs of :meth:`DecoderLayers.arrays` (layer-stacked)."""
        return {
            "input_norm": P(), "post_norm": P(),
            "kernel": {m: self.spec(f"layers.{m}") for m in layers["kernel"]},
            "bias": {m: self.spec(f"layers.{m}_bias") for m in layers["bias"]},
        }

    def pool_specs(self, pool: dict) -> dict:
        """Specs of :meth:`LoRAPool.layer_arrays` (``{m: (A, B, scaling)}``)."""
        return {m: (self.spec(f"lora.{m}.A"), self.spec(f"lora.{m}.B"), P()) for m in pool}

    def job_lora_spec(self, module: str, which: str) -> P:
        """A job's weights of one module, ``[L, in, r]`` / ``[L, r, out]``: as its pool slot."""
        return P(None, *self.lora_axes(module)[which])

    def grad_acc_spec(self, module: str, which: str) -> P:
        """The gradient accumulator ``[max_jobs, partials, L, in, R]`` / ``[..., R, out]``:
        partials on the ``tp`` axis for a replicated weight, else split as the weight."""
        if (module, which) in self.tensor_parallel.replicated_lora:
            return P(None, TENSOR_AXIS)
        return P(None, None, None, *self.lora_axes(module)[which])

    def kv_cache_spec(self) -> P:
        """The KV cache ``[L, P, page_size, kv_cache_heads, D]``: split by KV heads."""
        return P(None, None, None, TENSOR_AXIS, None)

    # ---- placing arrays ---------------------------------------------------------------------
    def state_shardings(self, state) -> object:
        """Shardings for an ``nnx.state(CausalLM)`` pytree (by each leaf's parameter name)."""

        def name_of(path) -> str:
            keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
            if keys[0] == "layers" and keys[1] in ("kernel", "bias"):
                return f"layers.{keys[2]}" + ("_bias" if keys[1] == "bias" else "")
            if keys[0] == "lora":
                return f"lora.{keys[2]}.{keys[1]}"
            return ".".join(k for k in keys if k != "value")

        return jax.tree_util.tree_map_with_path(lambda path, _: self.sharding(name_of(path)), state)

    def zeros(self, shape: tuple[int, ...], dtype, spec: P) -> jax.Array:
        """A zero array created directly on its devices with ``spec``."""
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.named(spec))()


def fetch(x):
    """A pytree of device arrays as host numpy arrays, also when they span devices of other
    processes (multi-host): such arrays are first replicated with an identity jit."""

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
            a = jax.jit(lambda v: v, out_shardings=NamedSharding(a.sharding.mesh, P()))(a)
        return np.asarray(a)

    return jax.tree.map(one, x)
