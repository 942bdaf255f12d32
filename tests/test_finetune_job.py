"""Finetuning jobs inside the serving engine: optimizer steps equal a plain optax loop, inference
is isolated from training, PEFT export, cancel, validation, several jobs at once."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import hf_logits, make_peft_adapter, our_logits, random_sequences, rel_err

from coserve_jax import Engine, SamplingParams
from coserve_jax.compile_counter import CompileCounter
from coserve_jax.finetune.config import LoRAConfig
from coserve_jax.finetune.data import TrainingExample
from coserve_jax.finetune.job import FinetuneError, JobStatus
from coserve_jax.finetune.optim import init_lora
from coserve_jax.finetune.reference import whole_sequence_loss
from coserve_jax.lora.manager import AdapterError

ENGINE_KW = dict(
    dtype="float32", max_num_seqs=8, max_num_batched_tokens=48, page_size=16, num_kv_pages=120,
    token_buckets=(16, 48), seq_buckets=(4, 8), max_loras=3, max_lora_rank=8, compilation_cache_dir=None,
    max_finetune_jobs=2, finetune_max_seq_len=256, max_finetune_tokens=24, finetune_seq_buckets=(128, 256),
)


def examples(vocab, lengths=(37, 150, 90, 23, 201), prompt=(5, 40, 0, 3, 60), seed=3):
    out = []
    for i, (ids, p) in enumerate(zip(random_sequences(lengths, vocab, seed), prompt)):
        out.append(TrainingExample(tuple(ids), tuple([False] * max(p, 1) + [True] * (len(ids) - max(p, 1))), i + 1))
    return out


@pytest.fixture(scope="module")
def engine(hf_checkpoint):
    path, hf = hf_checkpoint("llama31")
    return Engine(path, **ENGINE_KW), hf, path


def plain_optax_loop(engine, exs, lora: LoRAConfig, tx, steps, acc, seed, dropout_seed=None):
    """The reference: whole-sequence jax.grad, gradients summed over each group of `acc`
    sequences (loss = mean over the group's target tokens), one optax update per group."""
    config = engine.config
    params = init_lora(config, lora, seed)
    scaling = {m: jnp.full((config.num_layers,), lora.scaling, jnp.float32) for m in params}
    opt_state = tx.init(params)
    n = len(exs)
    # jax.grad of the whole-sequence loss, jitted only for speed, at one padded length: the
    # attention is causal and pads are no targets, so trailing pads change neither the loss nor
    # the gradient (LoRA dropout masks are keyed by position)
    pad_to = max(len(e.token_ids) for e in exs)
    grad_fn = jax.jit(jax.grad(
        lambda p, tokens, mask, norm, seed: whole_sequence_loss(engine.model, p, scaling, tokens, mask, norm, lora.lora_dropout, seed)
    ))
    for g in range(steps):
        ks = range(g * acc, (g + 1) * acc)
        norm = float(sum(exs[k % n].num_targets for k in ks))
        grads = jax.tree.map(jnp.zeros_like, params)
        for k in ks:
            e = exs[k % n]
            pad = pad_to - len(e.token_ids)
            tokens = jnp.asarray(list(e.token_ids) + [0] * pad, jnp.int32)
            mask = jnp.asarray(list(e.loss_mask) + [False] * pad)
            seed_k = 0 if dropout_seed is None else dropout_seed(k)
            grads = jax.tree.map(jnp.add, grads, grad_fn(params, tokens, mask, jnp.float32(norm), jnp.uint32(seed_k)))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


def assert_params_close(ours, ref, tol):
    errs = {}
    for m in ref:
        for w in ("A", "B"):
            assert np.abs(np.asarray(ref[m][w])).max() > 0, (m, w)
            errs[m, w] = rel_err(np.asarray(ours[m][w]), np.asarray(ref[m][w], np.float64))
    assert max(errs.values()) <= tol, errs


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_two_jobs_with_accumulation_equal_plain_optax_loops(engine, dropout):
    """Two jobs (AdamW with warm-up + linear decay + clipping + accumulation 2; SGD with momentum,
    rsLoRA, all linear modules) train at once beside inference requests; after 5 optimizer steps
    each adapter equals a plain optax loop over the same sequences, and the served adapter is
    the latest optimizer step's weights."""
    eng, hf, _ = engine
    exs = examples(hf.config.vocab_size)
    lora_a = LoRAConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj", "down_proj"), lora_dropout=dropout)
    lora_b = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, lora_dropout=dropout)
    job_a = eng.create_finetuning_job(
        exs, lora=lora_a, optimizer="adamw", learning_rate=2e-2, warmup_steps=2, lr_scheduler_type="linear",
        weight_decay=0.01, max_grad_norm=1.0, gradient_accumulation_steps=2, max_steps=5, shuffle=False, seed=1,
    )
    job_b = eng.create_finetuning_job(
        exs[::-1], lora=lora_b, optimizer="sgd", momentum=0.9, learning_rate=0.5, lr_scheduler_type="constant",
        max_grad_norm=None, gradient_accumulation_steps=1, max_steps=5, shuffle=False, seed=2,
    )
    prompts = random_sequences([5, 60, 17], hf.config.vocab_size, seed=9)
    outs = eng.generate(prompts, SamplingParams(max_tokens=20, temperature=0))
    assert all(len(o.token_ids) == 20 for o in outs)
    assert job_a.trained_tokens > 0 and job_b.trained_tokens > 0, "the jobs trained while requests were served"
    eng.wait_for(job_a, job_b)
    assert job_a.status is JobStatus.SUCCEEDED and job_b.status is JobStatus.SUCCEEDED
    assert [r.step for r in job_a.loss_history] == [1, 2, 3, 4, 5]
    assert job_a.loss_history[0].learning_rate == 0.0  # warm-up starts at 0, as transformers' schedulers

    total = 5
    sched_a = optax.join_schedules([optax.linear_schedule(0.0, 2e-2, 2), optax.linear_schedule(2e-2, 0.0, total - 2)], [2])
    tx_a = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched_a, weight_decay=0.01))
    ref_a = plain_optax_loop(eng, exs, lora_a, tx_a, 5, 2, seed=1, dropout_seed=job_a.dropout_seed)
    tx_b = optax.sgd(0.5, momentum=0.9)
    ref_b = plain_optax_loop(eng, exs[::-1], lora_b, tx_b, 5, 1, seed=2, dropout_seed=job_b.dropout_seed)
    # Adam divides each entry by its own RMS, so float32 rounding in entries whose gradient is
    # near zero shows up at ~1e-5 of the weights' scale; SGD is linear in the gradient.
    assert_params_close(job_b.params, ref_b, 1e-5)
    assert_params_close(job_a.params, ref_a, 1e-4)

    served = eng.adapters.get(job_a.adapter_name)
    for (layer, m), mod in served.modules.items():
        assert np.allclose(mod.a, np.asarray(job_a.params[m]["A"][layer]), atol=1e-7)
        assert np.allclose(mod.b, np.asarray(job_a.params[m]["B"][layer]), atol=1e-7)
    # The reported loss of step 1 is the group's mean token cross-entropy at the initial weights
    # (B = 0: the base model's).
    first = [exs[0], exs[1]]
    logits = hf_logits(hf, [list(e.token_ids) for e in first])
    ce, count = 0.0, 0
    for e, lg in zip(first, logits):
        lp = torch.log_softmax(torch.tensor(lg), -1).numpy()
        for t in range(1, len(e.token_ids)):
            if e.loss_mask[t]:
                ce -= lp[t - 1, e.token_ids[t]]
                count += 1
    assert abs(job_a.loss_history[0].loss - ce / count) < 1e-4
    for name in (job_a.adapter_name, job_b.adapter_name):
        eng.unload_adapter(name)


def test_inference_is_isolated_from_a_training_job(engine, tmp_path):
    """The tokens of concurrent requests (base model, another adapter, greedy and seeded sampling)
    are identical with and without a job training beside them; the job never writes the base
    weights or another adapter's slot."""
    eng, hf, _ = engine
    make_peft_adapter(hf, dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]), seed=5, out_dir=tmp_path / "other")
    eng.load_adapter("other", tmp_path / "other")
    prompts = random_sequences([3, 45, 80, 11, 130, 7], hf.config.vocab_size, seed=4)
    params = [SamplingParams(max_tokens=16, temperature=0), SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7)] * 3
    adapters = [None, "other"] * 3

    def snapshot():
        state = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(eng.model.layers.arrays())}
        state["embed"] = np.asarray(eng.model.embed_tokens[...])
        other = eng.adapters.get("other")
        return state, {k: (m.a.copy(), m.b.copy()) for k, m in other.modules.items()}

    before = snapshot()
    alone = [o.token_ids for o in eng.generate(prompts, params, adapters)]
    job = eng.create_finetuning_job(examples(hf.config.vocab_size), learning_rate=5e-2, max_steps=4, lora={"r": 8, "target_modules": "all-linear"})
    with CompileCounter() as compiles:  # nothing compiles once the job exists
        beside = [o.token_ids for o in eng.generate(prompts, params, adapters)]
        assert job.trained_tokens > 0 or job.step > 0
        eng.wait_for(job)
    assert compiles.requests == 0
    assert job.status is JobStatus.SUCCEEDED
    assert beside == alone
    after = snapshot()
    for k in before[0]:
        assert np.array_equal(before[0][k], after[0][k]), k
    for k in before[1]:
        assert np.array_equal(before[1][k][0], after[1][k][0]) and np.array_equal(before[1][k][1], after[1][k][1])
    # The job's adapter did change (control: the test can see a write).
    trained = eng.adapters.get(job.adapter_name)
    assert any(np.abs(m.b).max() > 0 for m in trained.modules.values())
    eng.unload_adapter(job.adapter_name)
    eng.unload_adapter("other")


def test_exported_adapter_loads_in_peft_with_matching_logits(engine, tmp_path):
    from peft import PeftModel

    eng, hf, path = engine
    job = eng.create_finetuning_job(
        examples(hf.config.vocab_size), learning_rate=5e-2, max_steps=3,
        lora={"r": 6, "lora_alpha": 12, "target_modules": ["q_proj", "k_proj", "gate_proj", "down_proj"],
              "init_lora_weights": "gaussian", "lora_dropout": 0.05},
    )
    eng.wait_for(job)
    assert str(job.status) == "succeeded"  # the value, not "JobStatus.SUCCEEDED"
    job.export(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 12
    assert cfg["init_lora_weights"] == "gaussian" and cfg["lora_dropout"] == 0.05  # how it was trained
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    seqs = random_sequences([9, 70], hf.config.vocab_size, seed=6)
    ref = hf_logits(peft_model, seqs)
    ours = our_logits(eng.model, seqs, adapter_ids=[job.adapter_index] * 2)
    for o, r in zip(ours, ref):
        assert rel_err(o, r) < 1e-4
    with peft_model.disable_adapter():
        plain = hf_logits(peft_model, seqs)
    assert rel_err(plain[1], ref[1]) > 1e-3, "training changed the adapter's outputs"
    peft_model.unload()
    eng.unload_adapter(job.adapter_name)


def test_cancel_frees_the_slot_and_bad_jobs_fail_up_front(engine, tmp_path):
    eng, hf, _ = engine
    exs = examples(hf.config.vocab_size)
    job = eng.create_finetuning_job(exs, max_steps=50)
    for _ in range(5):
        eng.step()
    job.cancel()
    assert job.status is JobStatus.CANCELLED and not eng.scheduler.training
    assert eng.scheduler.kv_cache.num_used_pages == 0, "the training sequence's pages were freed"
    assert job.adapter_name in eng.list_adapters()  # still servable with its last weights
    job2 = eng.create_finetuning_job(exs, max_steps=50, adapter_name="second")
    with pytest.raises(AdapterError, match="being trained"):
        eng.unload_adapter("second")
    with pytest.raises(AdapterError, match="already loaded"):
        eng.create_finetuning_job(exs, adapter_name="second")
    job2.cancel()
    eng.unload_adapter(job.adapter_name)
    eng.unload_adapter("second")
    loaded = eng.list_adapters()
    (tmp_path / "data.jsonl").write_text('{"text": "a b"}\n')
    with pytest.raises(FinetuneError, match="tokenizer"):
        eng.create_finetuning_job(tmp_path / "data.jsonl")
    with pytest.raises(AdapterError, match="max_lora_rank"):
        eng.create_finetuning_job(exs, lora={"r": 64})
    with pytest.raises(ValueError, match="unknown finetuning setting"):
        eng.create_finetuning_job(exs, learning_rte=1e-3)
    with pytest.raises(ValueError, match="300 tokens, above max_seq_len=256"):
        eng.create_finetuning_job([TrainingExample(tuple(range(300)), (False,) + (True,) * 299, 1)], truncation="error")
    assert eng.list_adapters() == loaded and not eng.has_active_jobs


def test_pause_and_resume_give_the_same_adapter_as_an_uninterrupted_job(engine):
    """A paused job hands out no sequence (its adapter keeps serving); resumed, it ends with the
    losses and weights of the same job run straight through (to float32 rounding: with several
    sequences in flight, the pause changes where the steps cut the sequences into chunks, and so
    the order in which per-token losses are summed)."""
    eng, hf, _ = engine
    exs = examples(hf.config.vocab_size)
    kw = dict(max_steps=4, gradient_accumulation_steps=2, learning_rate=2e-2, seed=5, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    straight = eng.create_finetuning_job(exs, adapter_name="straight", **kw)
    eng.wait_for(straight, use_tqdm=False)
    paused = eng.create_finetuning_job(exs, adapter_name="paused", **kw)
    while paused.step < 1:
        eng.step()
    paused.pause()
    assert paused.status is JobStatus.PAUSED and not paused.done and paused.estimated_finish is None
    with pytest.raises(FinetuneError, match="only a running job"):
        paused.pause()
    for _ in range(40):  # the sequence in flight finishes; nothing more is trained
        eng.step()
    assert not eng.scheduler.training
    at_pause = paused.step
    out = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0), adapter="paused", use_tqdm=False)
    assert len(out[0].token_ids) == 3 and paused.step == at_pause  # serves, does not train
    eng.wait_for(paused, use_tqdm=False)  # returns at once: nothing running
    assert paused.step == at_pause
    paused.resume()
    with pytest.raises(FinetuneError, match="only a paused job"):
        paused.resume()
    eng.wait_for(paused, use_tqdm=False)
    assert paused.status is JobStatus.SUCCEEDED
    np.testing.assert_allclose([r.loss for r in paused.loss_history], [r.loss for r in straight.loss_history], rtol=1e-6)
    a, b = eng.adapter_weights(straight), eng.adapter_weights(paused)
    for m in a.modules:
        # (AdamW's normalized steps turn float32 noise of a near-zero gradient entry into up to a
        # few 1e-4 of a step of lr=2e-2)
        np.testing.assert_allclose(b.modules[m].a, a.modules[m].a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.modules[m].b, a.modules[m].b, rtol=1e-5, atol=1e-5)
    eng.unload_adapter("straight")
    eng.unload_adapter("paused")


RESUME_JOB = dict(
    max_steps=6, gradient_accumulation_steps=2, learning_rate=2e-2, warmup_steps=1, save_steps=1, seed=4,
    lora={"r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"], "lora_dropout": 0.05},
)


def test_kill_and_restart_resumes_to_the_same_adapter(engine, tmp_path):
    """A job killed (SIGKILL) after its 3rd optimizer step, restarted from its orbax checkpoint
    in another process, ends with the adapter of an uninterrupted run; a half-written checkpoint
    directory (a crash during a save) is ignored."""
    import os
    import pathlib
    import subprocess
    import sys

    eng, hf, path = engine
    exs = examples(hf.config.vocab_size)
    straight = eng.create_finetuning_job(exs, **RESUME_JOB)
    eng.wait_for(straight)
    eng.unload_adapter(straight.adapter_name)

    ckpt = tmp_path / "ckpt"
    tests = pathlib.Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(tests / "finetune_worker.py"), str(path), str(ckpt)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        for line in proc.stdout:
            if line.strip() == "step 3":
                proc.kill()
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9, proc.stderr.read()
    done = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert done and 3 <= done[-1] < 6, done
    # A crash in the middle of the next save leaves an unfinished temporary directory behind.
    junk = ckpt / f"{done[-1] + 1}.orbax-checkpoint-tmp-1234"
    junk.mkdir()
    (junk / "partial").write_bytes(b"\0" * 100)

    resumed = eng.create_finetuning_job(exs, checkpoint_dir=ckpt, **RESUME_JOB)
    assert resumed.resumed_from_step == done[-1] and resumed.step == done[-1]
    assert [r.loss for r in resumed.loss_history] == [r.loss for r in straight.loss_history[: done[-1]]]
    eng.wait_for(resumed)
    assert resumed.status is JobStatus.SUCCEEDED and resumed.step == 6
    for m in straight.params:
        for w in ("A", "B"):
            np.testing.assert_allclose(np.asarray(resumed.params[m][w]), np.asarray(straight.params[m][w]), rtol=0, atol=1e-7)
    assert np.allclose([r.loss for r in resumed.loss_history], [r.loss for r in straight.loss_history], rtol=1e-6)
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())[-1] == 6
    eng.unload_adapter(resumed.adapter_name)


def _reference_eval_loss(eng, params, lora: LoRAConfig, exs) -> float:
    """Mean per-token cross-entropy over the examples' target tokens, by whole-sequence forwards."""
    config = eng.config
    scaling = {m: jnp.full((config.num_layers,), lora.scaling, jnp.float32) for m in params}
    total = float(sum(e.num_targets for e in exs))
    return float(sum(
        whole_sequence_loss(eng.model, params, scaling, jnp.asarray(e.token_ids, jnp.int32), jnp.asarray(e.loss_mask), total)
        for e in exs
    ))


def test_validation_loss_and_truncation(engine):
    """A job with an evaluation set reports the validation loss every eval_steps optimizer steps
    and at the end (forward-only sequences in the serving steps, beside requests), equal to a
    whole-sequence reference with the adapter of that step; over-long records are truncated
    (keep the start) and counted, in the training and the evaluation data."""
    eng, hf, _ = engine
    vocab = hf.config.vocab_size
    train = examples(vocab) + [TrainingExample(tuple(random_sequences([300], vocab, 11)[0]), (False,) * 20 + (True,) * 280, 6)]
    held = examples(vocab, lengths=(60, 300, 33), prompt=(10, 250, 5), seed=12)
    lora = LoRAConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    job = eng.create_finetuning_job(train, eval_dataset=held, lora=lora, learning_rate=5e-2, max_steps=4, eval_steps=2, shuffle=False)
    assert job.truncated_examples == 1 and max(len(e.token_ids) for e in job.examples) == 256
    assert [len(e.token_ids) for e in job.eval_examples] == [60, 256, 33]
    snapshots = {}
    outs = eng.generate(random_sequences([5, 40], vocab, seed=13), SamplingParams(max_tokens=8, temperature=0))
    assert all(len(o.token_ids) == 8 for o in outs)
    while not job.done:
        if job.evaluating and job.step not in snapshots:
            snapshots[job.step] = jax.tree.map(np.asarray, job.params)
        eng.step()
    assert job.status is JobStatus.SUCCEEDED
    assert [r.step for r in job.eval_history] == [2, 4]
    assert job.eval_history[0].tokens == sum(e.num_targets for e in job.eval_examples)
    for rec in job.eval_history:
        ref = _reference_eval_loss(eng, snapshots[rec.step], lora, job.eval_examples)
        assert abs(rec.loss - ref) < 1e-4 * max(1.0, ref), (rec.step, rec.loss, ref)
    assert job.eval_history[0].loss != job.eval_history[1].loss
    # engine.evaluate: the same pass on demand, for the adapter and for the base model (B = 0 at init).
    assert abs(eng.evaluate(held, adapter=job.adapter_name) - job.eval_history[-1].loss) < 1e-5
    zero = jax.tree.map(lambda a: np.zeros_like(a), job.params)
    base_ref = _reference_eval_loss(eng, zero, lora, job.eval_examples)
    assert abs(eng.evaluate(held) - base_ref) < 1e-4 * max(1.0, base_ref)
    assert eng.scheduler.kv_cache.num_used_pages == 0 and not eng.scheduler.training
    eng.unload_adapter(job.adapter_name)


def test_idle_train_step_equals_the_token_level_path(engine):
    """With no inference running, a job's sequences run as whole train steps (forward, loss and
    backward in one executable); the same job on the token-level path (forward chunks, saved
    layer inputs, layer-sliced backward) ends with the same losses and adapter, and so does a
    plain optax loop."""
    import dataclasses

    eng, hf, _ = engine
    exs = examples(hf.config.vocab_size)
    lora = LoRAConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "gate_proj"), lora_dropout=0.1)
    kw = dict(lora=lora, optimizer="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=None,
              gradient_accumulation_steps=2, max_steps=3, shuffle=False, seed=7)
    runner, calls = eng.runner, []
    run_train = runner.run_train
    runner.run_train = lambda t: calls.append(t.num_tokens) or run_train(t)
    config = eng.scheduler.config
    try:
        whole = eng.create_finetuning_job(exs, adapter_name="whole", **kw)
        eng.wait_for(whole, use_tqdm=False)
        n_whole = len(calls)
        eng.scheduler.config = dataclasses.replace(config, idle_train_step=False)
        chunked = eng.create_finetuning_job(exs, adapter_name="chunked", **kw)
        eng.wait_for(chunked, use_tqdm=False)
    finally:
        eng.scheduler.config = config
        del runner.run_train
    assert n_whole >= 3 and len(calls) == n_whole, "the first job trained by train steps, the second never"
    np.testing.assert_allclose([r.loss for r in whole.loss_history], [r.loss for r in chunked.loss_history], rtol=1e-5)
    assert_params_close(whole.params, jax.tree.map(np.asarray, chunked.params), 1e-5)
    ref = plain_optax_loop(eng, exs, lora, optax.sgd(0.5), 3, 2, seed=7, dropout_seed=whole.dropout_seed)
    assert_params_close(whole.params, ref, 1e-5)
    eng.unload_adapter("whole")
    eng.unload_adapter("chunked")
