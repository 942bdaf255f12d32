"""Tinker training runs inside the serving engine: forward / forward_backward / optim_step against
jax.grad of the whole-sequence losses and an optax AdamW loop, trainer/sampler logprob
consistency, call ordering, isolation of two runs, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_sequences, rel_err

from coserve_jax import Engine, SamplingParams
from coserve_jax.finetune.job import FinetuneError
from coserve_jax.finetune.optim import init_lora
from coserve_jax.finetune.config import LoRAConfig
from coserve_jax.finetune.policy_losses import LossConfig, elementwise_loss
from coserve_jax.finetune.reference import whole_sequence_logprobs
from coserve_jax.finetune.training_run import AdamParams, Datum, RunError

ENGINE_KW = dict(
    dtype="float32", max_num_seqs=8, max_num_batched_tokens=48, page_size=16, num_kv_pages=120,
    token_buckets=(16, 48), max_loras=3, max_lora_rank=8, compilation_cache_dir=None,
    max_finetune_jobs=2, finetune_max_seq_len=128, max_finetune_tokens=24, finetune_seq_buckets=(64, 128),
)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module", params=[True, False], ids=["idle-train-step", "token-level"])
def engine(request, hf_checkpoint):
    """Idle train steps run a whole pack's forward and backward in one executable; without
    them the packs go through the fused step's chunks and the backward slices."""
    path, _ = hf_checkpoint("llama31")
    return Engine(path, finetune_idle_train_step=request.param, **ENGINE_KW)


def make_data(vocab, lengths=(23, 41, 9), seed=5, loss_fn="cross_entropy"):
    rng = np.random.default_rng(seed)
    data = []
    for seq in random_sequences(lengths, vocab, seed):
        n = len(seq) - 1
        x = {"target_tokens": seq[1:]}
        if loss_fn == "cross_entropy":
            x["weights"] = rng.choice([0.0, 1.0, 0.5], n).tolist()
        else:
            x["advantages"] = rng.normal(0, 1, n).tolist()
            x["logprobs"] = (-rng.uniform(4.5, 6.5, n)).tolist()  # the sampler's (the tiny model's are ~ -5.5)
        data.append(Datum(seq[:-1], x))
    return data


def run_until(engine, *futures, max_steps=2000):
    for _ in range(max_steps):
        if all(f.done for f in futures):
            return [f.result() for f in futures]
        engine.step()
    raise AssertionError("calls did not finish")


def reference(engine, params, lora: LoRAConfig, data, loss_fn, cfg=LossConfig()):
    """Per-datum logprobs and the gradient of the summed loss by jax.grad of whole-sequence forwards."""
    config = engine.config
    scaling = {m: jnp.full((config.num_layers,), lora.scaling, jnp.float32) for m in params}

    def total(p):
        loss, lps = 0.0, []
        for d in data:
            lp = whole_sequence_logprobs(engine.model, p, scaling, jnp.asarray(d.token_ids, jnp.int32),
                                         jnp.asarray(d.loss_fn_inputs["target_tokens"], jnp.int32))
            loss = loss + jnp.sum(elementwise_loss(loss_fn, lp, d.loss_fn_inputs, cfg))
            lps.append(lp)
        return loss, lps

    (loss, lps), grads = jax.value_and_grad(total, has_aux=True)(params)
    return float(loss), [np.asarray(x) for x in lps], grads


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "ppo"])
def test_forward_backward_and_optim_step_equal_jax_grad_and_adamw(engine, loss_fn):
    """Two forward_backward calls then optim_step: the logprobs and loss of each call equal the
    whole-sequence reference, and the update equals optax AdamW on the sum of their jax.grad
    gradients (eps = 1 keeps Adam's first step linear in the gradient, so it compares gradients
    rather than their signs)."""
    vocab = engine.config.vocab_size
    run = engine.create_training_run(rank=4, seed=3, train_mlp=False, lora_alpha=8.0)
    try:
        lora = LoRAConfig(r=4, lora_alpha=8.0, target_modules=ATTN)
        params0 = init_lora(engine.config, lora, 3)
        # the run starts with B = 0, so a first step has no gradient on A: take one step of a
        # warm-up call first so both A and B move, then compare the second step
        warm = make_data(vocab, (30,), seed=1)
        warm[0].loss_fn_inputs["weights"] = [1.0] * 29
        warm[0].loss_fn_inputs.pop("advantages", None)
        adam = AdamParams(learning_rate=0.05, eps=1.0)
        run_until(engine, run.forward_backward(warm, "cross_entropy"), run.optim_step(adam))
        tx = optax.adamw(0.05, b1=0.9, b2=0.95, eps=1.0, weight_decay=0.0)
        state = tx.init(params0)
        _, _, g = reference(engine, params0, lora, warm, "cross_entropy")
        upd, state = tx.update(g, state, params0)
        params1 = optax.apply_updates(params0, upd)
        for m in params1:
            for w in ("A", "B"):
                assert rel_err(np.asarray(run.params[m][w]), np.asarray(params1[m][w])) < 1e-5, (m, w)

        cfg = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1} if loss_fn == "ppo" else None
        a, b = make_data(vocab, (23, 41), seed=7, loss_fn=loss_fn), make_data(vocab, (9, 17), seed=8, loss_fn=loss_fn)
        fa, fb = run.forward_backward(a, loss_fn, cfg), run.forward_backward(b, loss_fn, cfg)
        fo = run.optim_step(adam)
        out_a, out_b, opt = run_until(engine, fa, fb, fo)
        loss_cfg = LossConfig(**cfg) if cfg else LossConfig()
        loss_a, lps_a, g_a = reference(engine, params1, lora, a, loss_fn, loss_cfg)
        loss_b, lps_b, g_b = reference(engine, params1, lora, b, loss_fn, loss_cfg)
        for out, lps, loss in ((out_a, lps_a, loss_a), (out_b, lps_b, loss_b)):
            assert len(out.loss_fn_outputs) == len(lps)
            for got, want in zip(out.loss_fn_outputs, lps):
                np.testing.assert_allclose(got["logprobs"], want, atol=1e-5)
            assert abs(out.metrics["loss:sum"] - loss) <= 1e-4 * max(1.0, abs(loss))
        upd, state = tx.update(jax.tree.map(jnp.add, g_a, g_b), state, params1)
        params2 = optax.apply_updates(params1, upd)
        for m in params2:
            for w in ("A", "B"):
                assert rel_err(np.asarray(run.params[m][w]), np.asarray(params2[m][w])) < 1e-4, (m, w, loss_fn)
        assert opt.metrics["step"] == 2.0
        assert run.step == 2
    finally:
        run.close()


def test_forward_matches_the_sampler_and_sees_each_optimizer_step(engine):
    """Trainer/sampler consistency: a sampled completion's per-token logprobs (an ordinary
    request on the run's adapter) equal what ``forward`` computes for the same tokens; a call
    after an optim_step sees the new weights, one before it the old."""
    vocab = engine.config.vocab_size
    run = engine.create_training_run(rank=8, seed=11, lora_alpha=16.0)
    try:
        data = make_data(vocab, (33,), seed=2)
        data[0].loss_fn_inputs["weights"] = [1.0] * 32
        f_before = run.forward(data)
        fb = run.forward_backward(data)
        opt = run.optim_step(AdamParams(learning_rate=0.02))
        f_after = run.forward(data)
        before, fbo, _, after = run_until(engine, f_before, fb, opt, f_after)
        np.testing.assert_allclose(before.loss_fn_outputs[0]["logprobs"], fbo.loss_fn_outputs[0]["logprobs"], atol=1e-6)
        assert after.metrics["loss:sum"] < before.metrics["loss:sum"] - 1e-3  # the step lowered this data's loss

        prompt = random_sequences((12,), vocab, seed=9)[0]
        sp = SamplingParams(max_tokens=10, temperature=1.0, seed=4, logprobs=0, ignore_eos=True)
        out = engine.generate([prompt], sp, run.adapter_name, use_tqdm=False)[0]
        tokens = list(prompt) + list(out.token_ids)
        probe = [Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)})]
        (fwd,) = run_until(engine, run.forward(probe))
        got = fwd.loss_fn_outputs[0]["logprobs"][len(prompt) - 1:]
        diff = np.abs(got - np.asarray(out.logprobs)).max()
        assert diff <= 1e-5, diff
    finally:
        run.close()


def test_prompt_logprobs_equal_transformers_and_the_runs_forward(engine, hf_checkpoint):
    """``Engine.prompt_logprobs`` (Tinker's ``compute_logprobs``, vLLM's prompt logprobs of the
    chosen tokens): the base model's equal transformers' log-softmax; an adapter's equal its
    training run's ``forward``; a 1-token prompt has only ``None``; a prompt longer than the
    finetuning sequence length is refused."""
    import torch

    _, hf = hf_checkpoint("llama31")
    vocab = engine.config.vocab_size
    prompts = random_sequences((40, 7), vocab, seed=3) + [[5]]
    got = engine.prompt_logprobs(prompts)
    assert got[2] == [None]
    for p, g in zip(prompts[:2], got):
        assert g[0] is None and len(g) == len(p)
        with torch.no_grad():
            logits = hf(torch.tensor([p])).logits[0].double()
        ref = torch.log_softmax(logits, -1)[torch.arange(len(p) - 1), torch.tensor(p[1:])].numpy()
        np.testing.assert_allclose(g[1:], ref, atol=1e-4)
    run = engine.create_training_run(rank=8, seed=3)
    try:
        (fwd,) = run_until(engine, run.forward([Datum(prompts[0][:-1], {"target_tokens": prompts[0][1:],
                                                                         "weights": [0.0] * 39})]))
        tuned = engine.prompt_logprobs(prompts[0], run.adapter_name)[0]
        np.testing.assert_allclose(tuned[1:], fwd.loss_fn_outputs[0]["logprobs"], atol=1e-6)
    finally:
        run.close()
    with pytest.raises(ValueError, match="finetune_max_seq_len"):
        engine.prompt_logprobs([[1] * 200])


def test_two_runs_train_at_once_and_each_equals_its_run_alone(engine):
    vocab = engine.config.vocab_size
    data1 = make_data(vocab, (20, 31), seed=21)
    data2 = make_data(vocab, (27, 12), seed=22)
    adam = AdamParams(learning_rate=0.01)

    def train(runs_data):
        runs = [engine.create_training_run(rank=4, seed=s, train_mlp=False) for s, _ in runs_data]
        try:
            futures = []
            for _ in range(2):
                for run, (_, d) in zip(runs, runs_data):
                    futures += [run.forward_backward(d), run.optim_step(adam)]
            results = run_until(engine, *futures)
            return [{m: {w: np.asarray(v) for w, v in ws.items()} for m, ws in r.params.items()} for r in runs], results
        finally:
            for r in runs:
                r.close()

    (p1, p2), _ = train([(1, data1), (2, data2)])
    (alone1,), _ = train([(1, data1)])
    (alone2,), _ = train([(2, data2)])
    for together, alone in ((p1, alone1), (p2, alone2)):
        for m in together:
            for w in ("A", "B"):
                np.testing.assert_allclose(together[m][w], alone[m][w], rtol=1e-5, atol=1e-7)
    assert rel_err(p1["q_proj"]["B"], p2["q_proj"]["B"]) > 0.1  # (different runs really differ)


def test_bad_calls_fail_alone(engine):
    vocab = engine.config.vocab_size
    run = engine.create_training_run(rank=4, seed=0, train_mlp=False)
    try:
        good = make_data(vocab, (10,), seed=3)
        cases = [
            ([], "cross_entropy", "at least one datum"),
            (good, "dpo", "loss_fn must be one of"),
            ([Datum([1, 2, 3], {"target_tokens": [2, 3, 4]})], "cross_entropy", "missing ['weights']"),
            ([Datum([1, 2, 3], {"target_tokens": [2, 3], "weights": [1, 1]})], "cross_entropy", "target_tokens has 2"),
            ([Datum([1, vocab], {"target_tokens": [2, 3], "weights": [1, 1]})], "cross_entropy", "outside the vocabulary"),
            ([Datum(list(range(200)), {"target_tokens": [1] * 200, "weights": [1] * 200})], "cross_entropy", "finetune_max_seq_len"),
        ]
        for data, loss_fn, message in cases:
            with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
                run.forward_backward(data, loss_fn)
        with pytest.raises(ValueError, match="clip"):
            run.forward_backward(make_data(vocab, (10,), loss_fn="ppo"), "ppo", {"clip_low_threshold": 1.5})
        assert not run.busy  # nothing was queued
        (out,) = run_until(engine, run.forward(good))
        assert len(out.loss_fn_outputs[0]["logprobs"]) == 9
        with pytest.raises(FinetuneError, match="train_unembed"):
            engine.create_training_run(rank=4, train_unembed=True)
    finally:
        run.close()
    with pytest.raises(RunError, match="closed"):
        run.forward(good)
