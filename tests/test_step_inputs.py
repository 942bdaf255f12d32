"""The step's inputs: built from the plan's increments and the persistent InputBatch rows, they
equal inputs built naively from every request's whole page table and settings; the abstract
(compile-time) inputs and the real ones come from one shape table."""

import jax
import numpy as np
import pytest

from coserve_jax.engine.input_batch import InputBatch
from coserve_jax.engine.step import make_buckets, pick_bucket
from coserve_jax.engine.step_inputs import STEP_INPUT_TABLE, StepDims, StepInputs, abstract_inputs, build_step_inputs
from coserve_jax.sched.finetune import TrainingSequence
from coserve_jax.sched.outputs import SamplingRow
from coserve_jax.sched.policy import fit_bucket
from coserve_jax.sched.kv_cache import KVCacheManager
from coserve_jax.sched.request import Request
from coserve_jax.sched.sampling_params import SamplingParams
from coserve_jax.sched.scheduler import Scheduler, SchedulerConfig

PAGE, MAX_PAGES, SEQS, BUDGET = 4, 16, 6, 24


def naive(plan, sched, dims, ft_pages):
    """Per-token and per-sequence values computed directly from the allocator's whole tables."""
    t, s = dims.bucket.num_tokens, dims.bucket.num_seqs
    token_ids, positions, adapters, slots = (np.zeros(t, np.int32) for _ in range(4))
    table = np.zeros((s, MAX_PAGES), np.int32)
    kv_lens = np.zeros(s, np.int32)
    temperature, top_p, min_p = np.zeros(s, np.float32), np.ones(s, np.float32), np.zeros(s, np.float32)
    seeds, top_k, index = np.zeros(s, np.uint32), np.zeros(s, np.int32), np.zeros(s, np.int32)
    k = 0
    seqs = []
    for c in plan.chunks:
        adapter, row = c.adapter_index, c.sampling
        if row is None:  # a decode: its settings are its request's
            req = sched.requests[c.request_id]
            p = req.params
            adapter, row = req.adapter_index, SamplingRow(p.temperature, p.top_k, p.top_p, req.seed, p.logprobs, p.min_p)
        seqs.append((c.request_id, c.start, c.token_ids, sched.kv_cache.page_table(c.request_id), adapter, row, c.output_index))
    for f, pages in zip(plan.finetune, ft_pages):
        seqs.append((f.job_id, f.start, f.token_ids, pages, f.adapter_index, None, 0))
    for i, (rid, start, ids, pages, adapter, row, out) in enumerate(seqs):
        table[i, : len(pages)] = pages
        for j, tok in enumerate(ids):
            p = start + j
            token_ids[k], positions[k], adapters[k] = max(tok, 0), p, adapter
            slots[k] = pages[p // PAGE] * PAGE + p % PAGE
            k += 1
        kv_lens[i] = start + len(ids)
        if row is not None:
            temperature[i], top_k[i], top_p[i], seeds[i], index[i] = row.temperature, row.top_k, row.top_p, row.seed, out
            min_p[i] = row.min_p
    return dict(token_ids=token_ids, positions=positions, adapter_ids=adapters, slot_mapping=slots, page_table=table,
                kv_lens=kv_lens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seeds, sample_index=index)


def test_incremental_inputs_equal_naive_inputs():
    rng = np.random.default_rng(0)
    sched = Scheduler(SchedulerConfig(SEQS, BUDGET, MAX_PAGES * PAGE, 1, max_finetune_tokens=8), KVCacheManager(30, PAGE))
    batch = InputBatch(MAX_PAGES, initial_rows=2)  # grows while the test runs
    buckets = make_buckets(BUDGET, SEQS)
    n_req, checked, preempted, with_ft, multi = 0, 0, 0, 0, 0
    for step in range(300):
        if rng.random() < 0.4:
            params = SamplingParams(max_tokens=int(rng.integers(1, 20)), temperature=float(rng.choice([0.0, 0.7])),
                                    top_k=int(rng.integers(0, 5)), top_p=float(rng.choice([1.0, 0.9])), min_p=float(rng.choice([0.0, 0.1])))
            sched.add_request(Request(n_req, rng.integers(1, 50, int(rng.integers(1, 30))).tolist(), params,
                                      adapter_index=int(rng.integers(0, 3)), seed=int(rng.integers(0, 1000))))
            n_req += 1
        if step % 20 == 0 and len(sched.training) < 2:  # packs of 1 to 3 examples, up to two in flight
            segs = tuple(int(x) for x in rng.integers(2, 9, int(rng.integers(1, 4))))
            n = sum(segs)
            ids = rng.integers(1, 50, n).tolist()
            sched.add_training_sequence(TrainingSequence(
                f"job{step}", 0, 1, ids, ids[1:] + [0], rng.random(n).tolist(), 0.1, 7, 2, 1, segments=segs,
                dropout_seeds=tuple(range(7, 7 + len(segs)))))
        if rng.random() < 0.05 and sched.requests:
            sched.abort(next(iter(sched.requests)))
        plan = sched.schedule()
        preempted += len(plan.preempted)
        rows = batch.apply(plan)
        if plan.num_tokens:
            seqs = {(t.job_id, t.index): t for t in sched.training}
            ft_pages = [sched.kv_cache.page_table(seqs[f.job_id, f.index].kv_id(seqs[f.job_id, f.index].segment_of(f.offset)))
                        for f in plan.finetune]
            dims = StepDims(pick_bucket(buckets, plan.num_tokens, plan.num_seqs), MAX_PAGES, SEQS, 8, 2 * 64)
            x = build_step_inputs(plan, dims, PAGE, batch, rows)
            ref = naive(plan, sched, dims, ft_pages)
            got = dict(token_ids=x.token_ids, positions=x.positions, adapter_ids=x.adapter_ids,
                       slot_mapping=x.attn.slot_mapping, page_table=x.attn.page_table, kv_lens=x.attn.kv_lens,
                       temperature=x.sampling.temperature, top_k=x.sampling.top_k, top_p=x.sampling.top_p, min_p=x.sampling.min_p,
                       seed=x.sampling.seed, sample_index=x.sampling.sample_index)
            for name, want in ref.items():
                np.testing.assert_array_equal(got[name], want, err_msg=f"step {step}: {name}")
            assert int(x.attn.num_seqs) == plan.num_seqs
            np.testing.assert_array_equal(x.attn.cu_q_lens[1 : plan.num_seqs + 1], np.cumsum([len(c.token_ids) for c in plan.chunks]
                                          + [f.num_tokens for f in plan.finetune]))
            # the finetuning slots: the chunks' tokens, in order, after the inference tokens
            n_ft, n_inf = plan.num_finetune_tokens, plan.num_inference_seqs
            first = plan.num_tokens - n_ft
            f = x.finetune
            np.testing.assert_array_equal(f.save_slots[:n_ft], np.arange(first, plan.num_tokens))
            np.testing.assert_array_equal(f.dest[:n_ft], [c.store_row + i for c in plan.finetune for i in range(c.num_tokens)])
            np.testing.assert_array_equal(f.targets[:n_ft], [t for c in plan.finetune for t in c.targets])
            np.testing.assert_array_equal(f.weights[:n_ft], np.float32([w for c in plan.finetune for w in c.weights]))
            np.testing.assert_array_equal(f.seq[:n_ft], [n_inf + j for j, c in enumerate(plan.finetune) for _ in c.token_ids])
            assert (f.seq[n_ft:] == dims.bucket.num_seqs).all() and (f.dest[n_ft:] == 2 * 64).all()
            np.testing.assert_array_equal(x.dropout.seed[first:plan.num_tokens], [c.dropout_seed for c in plan.finetune for _ in c.token_ids])
            checked += 1
            with_ft += bool(plan.finetune)
            multi += len(plan.finetune) > 1
        sched.update(plan, [int(rng.integers(1, 50)) if c.sample else None for c in plan.chunks])
        sched.pop_trained()
        assert len(batch) <= len(sched.running) + len(sched.waiting) + 8  # ended requests' rows are dropped
    assert checked > 200 and preempted > 0 and with_ft > 5 and multi > 2, (checked, preempted, with_ft, multi)


def test_one_shape_table():
    """Every field of the abstract inputs has the shape and dtype of the real inputs, and both
    follow STEP_INPUT_TABLE; StepInputs is a pytree whose one static field is the bucket."""
    buckets = make_buckets(BUDGET, SEQS, seq_buckets=(2, 4, SEQS))  # (the grid: (T, S) with S < min(T, SEQS) too)
    assert buckets[3].num_seqs < min(buckets[3].num_tokens, SEQS)
    batch = InputBatch(MAX_PAGES)
    for ft in (0, 8):
        dims = StepDims(buckets[3], MAX_PAGES, SEQS, ft, 128)
        abstract = abstract_inputs(dims)
        real = build_step_inputs(Scheduler(SchedulerConfig(SEQS, BUDGET, 64), KVCacheManager(30, PAGE)).schedule(), dims, PAGE, batch, [])
        a_leaves, a_tree = jax.tree.flatten(abstract)
        r_leaves, r_tree = jax.tree.flatten(real)
        assert a_tree == r_tree and len(a_leaves) == sum(1 for k in STEP_INPUT_TABLE if ft or not k.startswith(("dropout.", "finetune.")))
        for a, r in zip(a_leaves, r_leaves):
            assert a.shape == r.shape and a.dtype == r.dtype
        assert real.bucket == dims.bucket and isinstance(real, StepInputs)
        assert jax.tree.flatten(abstract_inputs(StepDims(buckets[0], MAX_PAGES, SEQS, ft, 128)))[1] != a_tree  # bucket is static


def test_bucket_sets_and_the_policy_fit():
    """Default: one derived S = min(T, max_num_seqs) per token bucket (|T| executables); with
    seq_buckets the T x S grid. Every batch that fits the budget has a bucket, and the host-side
    policies' fit_bucket (pure Python) picks the same bucket the engine does."""
    derived = make_buckets(512, 64)
    assert [(b.num_tokens, b.num_seqs) for b in derived] == [(16, 16), (32, 32), (64, 64), (128, 64), (256, 64), (512, 64)]
    grid = make_buckets(512, 64, seq_buckets=(4, 16, 64))
    assert len(grid) == 6 + 6 + 4 + 1 and set(derived) <= set(grid)
    for buckets in (derived, grid):
        pairs = [(b.num_tokens, b.num_seqs) for b in buckets]
        for tokens in range(1, 513, 7):
            for seqs in range(1, min(tokens, 64) + 1, 3):
                b = pick_bucket(buckets, tokens, seqs)
                assert b.num_tokens >= tokens and b.num_seqs >= seqs
                assert fit_bucket(pairs, tokens, seqs) == (b.num_tokens, b.num_seqs)
    assert fit_bucket([(16, 16)], 0, 0) == (0, 0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_buckets(512, 64, token_buckets=(16, 256))
    with pytest.raises(ValueError, match="max_num_seqs"):
        make_buckets(512, 64, seq_buckets=(4, 16))
