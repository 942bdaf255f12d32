"""Segmented multi-LoRA (tokens grouped by adapter, grouped GEMMs with ``jax.lax.ragged_dot``)
equals the one-hot reference; the scheduler keeps a step within ``max_loras_per_batch`` adapters;
the engine gives the same tokens and logprobs with either path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coserve_jax.models import init_random, load_model  # noqa: F401  (load_model: the loader's public API)
from coserve_jax.models.attention import dense_attention, packed_causal_mask
from coserve_jax.models.lora_pool import (
    LoRAPoolConfig, adapter_onehot, group_stacks, lora_delta, lora_segments, segmented_lora_delta,
)
from coserve_jax.models.tiny import tiny_config
from coserve_jax.sched.finetune import TrainingSequence
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.request import Request
from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.sched.scheduler import Scheduler, SchedulerConfig


def _stacks(rng, slots, d_in, rank, d_out):
    a = jnp.asarray(rng.normal(size=(slots, d_in, rank)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(slots, rank, d_out)), jnp.float32)
    return a, b, jnp.asarray(rng.uniform(0.25, 2.0, size=slots), jnp.float32)


@pytest.mark.parametrize("slots,live,groups", [(64, (3, 17, 40, 64), 4), (4, (1, 2, 3, 4), 4), (8, (5,), 2), (16, (), 4)])
def test_segmented_delta_equals_onehot(slots, live, groups):
    rng = np.random.default_rng(slots)
    t = 77
    x = jnp.asarray(rng.normal(size=(t, 24)), jnp.float32)
    a, b, s = _stacks(rng, slots, 24, 8, 40)
    ids = jnp.asarray(rng.choice(np.array((0,) + live), size=t), jnp.int32)
    seg = lora_segments(ids, slots, groups)
    want = lora_delta(x, a, b, s, adapter_onehot(ids, slots, jnp.float32))
    got = segmented_lora_delta(x, *group_stacks({"m": (a, b, s)}, seg, axis=0)["m"], seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want)) + 1))
    assert np.all(np.asarray(got)[np.asarray(ids) == 0] == 0)
    # the groups: the live slots ascending, their token counts, then empty groups
    counts = {k: int(np.sum(np.asarray(ids) == k)) for k in live}
    present = sorted(k for k in live if counts[k])
    assert np.asarray(seg.slots)[: len(present)].tolist() == [k - 1 for k in present]
    assert np.asarray(seg.sizes).tolist() == [counts[k] for k in present] + [0] * (groups - len(present))
    order = np.asarray(seg.order)
    assert sorted(order.tolist()) == list(range(t)) and np.all(order[np.asarray(seg.inverse)] == np.arange(t))


def test_segmented_lora_under_jit_with_bf16():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(33, 16)), jnp.bfloat16)
    a, b, s = _stacks(rng, 8, 16, 4, 12)
    ids = jnp.asarray(rng.integers(0, 9, 33), jnp.int32)
    def f(x, i):
        seg = lora_segments(i, 8, 8)
        return segmented_lora_delta(x, *group_stacks({"m": (a, b, s)}, seg, axis=0)["m"], seg)

    got = jax.jit(f)(x, ids)
    want = lora_delta(x, a, b, s, adapter_onehot(ids, 8, jnp.float32))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=3e-2, atol=3e-2)


def test_model_forward_with_four_live_adapters_equals_onehot():
    """The whole decoder (7 modules x 2 layers), 4 of 8 slots live plus base tokens: grouped
    GEMMs give the one-hot reference's hidden states (fp32, 1e-5)."""
    cfg = tiny_config(vocab_size=128)
    model = init_random(cfg, seed=0, dtype="float32", lora=LoRAPoolConfig(max_loras=8, max_lora_rank=4))
    rng = np.random.default_rng(2)
    pool = model.lora
    for m in pool.config.target_modules:
        for var in (pool.A[m], pool.B[m]):
            var.set_value(jnp.asarray(rng.normal(0, 0.2, var[...].shape), jnp.float32))
        pool.scaling[m].set_value(jnp.asarray(rng.uniform(0.5, 2.0, pool.scaling[m][...].shape), jnp.float32))
    t = 40
    tokens = jnp.asarray(rng.integers(0, 128, t), jnp.int32)
    seg_ids = jnp.asarray(np.repeat(np.arange(5), 8), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(8), 5), jnp.int32)
    adapters = jnp.asarray(np.repeat([2, 0, 5, 7, 8], 8), jnp.int32)  # 4 adapters and the base model
    mask = packed_causal_mask(seg_ids, positions)

    def attend(q, k, v):
        return dense_attention(q, k, v, mask, cfg.head_dim ** -0.5)

    ref = model.hidden_states(tokens, positions, adapters, attend)
    got = model.hidden_states(tokens, positions, adapters, attend, lora_groups=4)
    base = model.hidden_states(tokens, positions, jnp.zeros_like(adapters), attend, lora_groups=4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # the adapters do change the output (so the comparison above tests something), base rows do not
    diff = np.abs(np.asarray(ref) - np.asarray(base)).max(axis=1)
    assert np.all(diff[np.asarray(adapters) > 0] > 1e-3) and np.all(diff[np.asarray(adapters) == 0] == 0)


# ---- the scheduler's per-step adapter limit (pure Python) ----------------------------------

def _sched(limit, ft=0):
    return Scheduler(SchedulerConfig(8, 64, 200, 0, ft, max_loras_per_batch=limit), KVCacheManager(64, 4))


def _req(rid, adapter, n=4, max_tokens=3):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), adapter_index=adapter,
                   eos_token_ids=frozenset({0}))


def _run(s):
    plan = s.schedule()
    s.update(plan, [7 if c.sample else None for c in plan.chunks])
    return plan


def _adapters(s, plan):
    return {s.requests[c.request_id].adapter_index for c in plan.chunks if c.request_id in s.requests}


def test_scheduler_admits_at_most_max_loras_per_batch_adapters():
    s = _sched(limit=2)
    for rid, a in (("a", 1), ("b", 2), ("c", 3), ("d", 1), ("e", 0)):
        s.add_request(_req(rid, a))
    plan = _run(s)
    # c (a third adapter) is passed over; d (adapter 1, in use) and e (base) overtake it
    assert [c.request_id for c in plan.chunks] == ["a", "b", "d", "e"]
    seen = set()
    while s.num_running or s.num_waiting:
        plan = _run(s)
        ids = {s.requests[c.request_id].adapter_index for c in plan.chunks if c.request_id in s.requests} - {0}
        assert len(ids) <= 2
        seen.update(c.request_id for c in plan.chunks)
    assert "c" in seen, "the passed-over request runs once an adapter frees up"


def test_scheduler_limit_covers_finetuning_chunks():
    s = _sched(limit=1, ft=16)
    s.add_request(_req("a", 1, max_tokens=50))
    ids = list(range(1, 13))
    s.add_training_sequence(TrainingSequence("job", 0, 2, ids, ids[1:] + [0], [1.0] * 11 + [0.0], 0.0, 0, 2, 1))
    plan = _run(s)
    assert [c.request_id for c in plan.chunks] == ["a"] and not plan.finetune  # adapter 2 would be a second
    s2 = _sched(limit=2, ft=16)
    s2.add_request(_req("a", 1, max_tokens=50))
    s2.add_training_sequence(TrainingSequence("job", 0, 2, ids, ids[1:] + [0], [1.0] * 11 + [0.0], 0.0, 0, 2, 1))
    plan = _run(s2)
    assert plan.finetune and plan.finetune[0].num_tokens == 12


# ---- the engine: same outputs with either path ---------------------------------------------

def test_engine_segmented_equals_onehot_with_four_adapters():
    from coserve_jax.engine import Engine
    from coserve_jax.lora.peft_io import LoRAModule, LoRAWeights

    cfg = tiny_config(vocab_size=256)
    rng = np.random.default_rng(3)

    def adapter(rank, modules):
        mods = {}
        for layer in range(cfg.num_layers):
            for m in modules:
                d_in, d_out = cfg.module_dims(m)
                mods[(layer, m)] = LoRAModule(rng.normal(0, 0.2, (d_in, rank)).astype(np.float32),
                                              rng.normal(0, 0.2, (rank, d_out)).astype(np.float32), alpha=2.0 * rank)
        return LoRAWeights(mods)

    adapters = {f"ad{i}": adapter(r, mods) for i, (r, mods) in enumerate(
        [(4, ("q_proj", "v_proj")), (8, ("gate_proj", "down_proj")), (2, ("k_proj", "o_proj", "up_proj")), (8, ("q_proj",))])}
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (5, 17, 9, 30, 12, 3)]
    names = ["ad0", "ad1", None, "ad2", "ad3", "ad0"]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    outs = {}
    for impl in ("onehot", "segmented"):
        model = init_random(cfg, seed=0, dtype="float32", lora=LoRAPoolConfig(max_loras=6, max_lora_rank=8))
        engine = Engine(model, lora_impl=impl, max_num_seqs=8, max_num_batched_tokens=64, num_kv_pages=80, max_model_len=256,
                        token_buckets=(64,), seq_buckets=(8,), max_finetune_jobs=0, compilation_cache_dir=None)
        assert engine.engine_config.max_loras_per_batch == 4 and engine.engine_config.lora_impl == impl
        for name, w in adapters.items():
            engine.load_adapter(name, w)
        outs[impl] = engine.generate(prompts, params, adapter=names, use_tqdm=False)
    for a, b in zip(outs["onehot"], outs["segmented"]):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-5, atol=1e-5)
        for ta, tb in zip(a.top_logprobs, b.top_logprobs):
            assert ta.keys() == tb.keys()
            np.testing.assert_allclose([tb[k] for k in ta], list(ta.values()), rtol=1e-5, atol=1e-5)
    base_like = [o.token_ids for o, n in zip(outs["segmented"], names) if n is None]
    assert base_like  # a base-model request shared the batch


def test_bad_lora_knobs_are_rejected():
    from coserve_jax.engine.config import EngineConfig

    cfg = tiny_config()
    kw = dict(has_lora_pool=True, kv_cache_heads=cfg.num_kv_heads, dtype_itemsize=4, max_model_len=64)
    with pytest.raises(ValueError, match="lora_impl"):
        EngineConfig.resolve(cfg, lora_impl="bgmv", **kw)
    with pytest.raises(ValueError, match="max_loras_per_batch"):
        EngineConfig.resolve(cfg, max_loras_per_batch=0, **kw)
    c = EngineConfig.resolve(cfg, max_loras=64, max_loras_per_batch=8, **kw)
    assert c.max_loras_per_batch == 8 and c.lora_groups == 8 and c.scheduler_config().max_loras_per_batch == 8
    c = EngineConfig.resolve(cfg, max_loras=64, lora_impl="onehot", **kw)
    assert c.lora_groups == 0 and c.scheduler_config().max_loras_per_batch == 0
