"""The Tinker training API against the real server with the official ``tinker`` client: a
supervised loop equals a plain torch + peft + torch.optim.AdamW loop from the same LoRA init
(downloaded as a PEFT adapter through signed URLs), sampler and trainer logprobs agree, two
projects' runs stay isolated, and bad calls fail alone with a 4xx."""

import json
import pathlib

import httpx
import numpy as np
import pytest
import torch
from serve_util import ServerProcess

from coserve_jax.models.tiny import TINY_HF_CONFIG, byte_level_tokenizer

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

KEYS = {"alpha": "sk-cj-alpha-key-for-tests", "beta": "sk-cj-beta-key-for-tests"}
GSM8K = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "finetune" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama (the built-in tiny model's shapes, random weights) saved with
    ``save_pretrained`` beside the built-in byte-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_HF_CONFIG)).float().eval()
    path = tmp_path_factory.mktemp("tiny-ckpt")
    model.save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path, _ = checkpoint
    tmp = tmp_path_factory.mktemp("tinker-serve")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps([{"key": k, "project": p} for p, k in KEYS.items()]))
    cfg = tmp / "serve.yaml"
    cfg.write_text(json.dumps({
        "output_dir": str(tmp / "out"),
        "model": {"path": str(path), "dtype": "float32"},
        "engine": {"max_num_seqs": 8, "max_num_batched_tokens": 64, "token_buckets": [64], "num_kv_pages": 256,
                   "max_loras": 4, "max_lora_rank": 8, "max_finetune_jobs": 2, "finetune_max_seq_len": 256,
                   "finetune_seq_buckets": [256], "max_finetune_tokens": 64},
    }))
    srv = ServerProcess(["--config", str(cfg), "--api-keys-file", str(keys)],
                        env={"COSERVE_JAX_CACHE_DIR": str(tmp / "xla")})
    yield srv
    srv.stop()


def service(server, project="alpha"):
    return tinker.ServiceClient(base_url=server.url, api_key="tml-" + KEYS[project])


def gsm8k_data(n=3):
    """``n`` GSM8K chat examples (question and answer cut short: one token per byte here) as
    Tinker data: the prompt's positions weigh 0, the answer's 1."""
    tok = byte_level_tokenizer()
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    data = []
    for r in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["question"][:60]}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        answer = tok.encode(r["answer"][:40] + "<|eot_id|>", add_special_tokens=False)
        tokens = list(prompt) + list(answer)
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights}))
    return data


def download_adapter(server, project, tinker_path, dest: pathlib.Path) -> pathlib.Path:
    """Every file of saved external weights, fetched by its signed URL with no API key."""
    rest = tinker.RestClient(base_url=server.url, api_key="tml-" + KEYS[project])
    urls = rest.get_external_weights_urls(tinker_path).result().urls
    for rel, url in urls.items():
        r = httpx.get(url, timeout=60)
        r.raise_for_status()
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(r.content)
    return dest


@pytest.mark.skipif(not GSM8K.exists(), reason=f"{GSM8K} (../shared/data) is missing")
def test_supervised_loop_equals_torch_peft_adamw(server, checkpoint, tmp_path):
    """Three forward_backward + optim_step steps through the official client: each step's loss
    equals the torch + peft loop's (same init downloaded as a PEFT adapter, same data, AdamW with
    Tinker's betas and eps), and the final adapter downloads, loads in peft and is the torch loop's."""
    from peft import PeftModel

    _, base = checkpoint
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEYS['alpha']}"}).json()
    name = models["data"][0]["id"]
    sc = service(server)
    tc = sc.create_lora_training_client(base_model=name, rank=4, seed=5, train_unembed=False).result()
    init = tc.save_weights_external("init").result().path
    peft_model = PeftModel.from_pretrained(base, download_adapter(server, "alpha", init, tmp_path / "init"), is_trainable=True)
    peft_model.train(False)
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    data = gsm8k_data()
    ours, theirs = [], []
    for _ in range(3):
        fb = tc.forward_backward(data, "cross_entropy")
        step = tc.optim_step(types.AdamParams(learning_rate=1e-3))
        ours.append(fb.result().metrics["loss:sum"])
        assert step.result().metrics["step"] >= 1
        opt.zero_grad()
        loss = 0.0
        for d in data:
            ids = torch.tensor([d.model_input.to_ints()])
            logits = peft_model(input_ids=ids).logits[0].float()
            target = torch.tensor(d.loss_fn_inputs["target_tokens"].tolist())
            w = torch.tensor(d.loss_fn_inputs["weights"].tolist())
            loss = loss + (w * torch.nn.functional.cross_entropy(logits, target, reduction="none")).sum()
        loss.backward()
        opt.step()
        theirs.append(float(loss.detach()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < ours[0]

    final = tc.save_weights_external("final").result().path
    ours_dir = download_adapter(server, "alpha", final, tmp_path / "final")
    loaded = PeftModel.from_pretrained(base, ours_dir)
    sc.close("success").result()
    got = {n: p.detach().clone() for n, p in loaded.named_parameters() if "lora_" in n}
    want = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys()
    diff = sum(float(torch.sum((got[n] - want[n]) ** 2)) for n in got) ** 0.5
    norm = sum(float(torch.sum(want[n] ** 2)) for n in want) ** 0.5
    assert diff / norm < 1e-3, diff / norm


def test_sampled_logprobs_equal_forward_logprobs(server):
    """Trainer/sampler consistency over HTTP: the logprobs ``sample`` returns for its tokens
    equal those ``forward`` computes for the same tokens with the same saved weights."""
    sc = service(server)
    name = sc.get_server_capabilities().supported_models[0].model_name
    tc = sc.create_lora_training_client(base_model=name, rank=8, seed=1, train_unembed=False).result()
    toks = list(range(20, 60))
    datum = types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]),
                        loss_fn_inputs={"target_tokens": toks[1:], "weights": [1.0] * (len(toks) - 1)})
    tc.forward_backward([datum], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = toks[:12]
    res = sampler.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=3,
                         sampling_params=types.SamplingParams(max_tokens=10, temperature=1.0, seed=3)).result()
    assert len(res.sequences) == 3
    probes = []
    for seq in res.sequences:
        full = prompt + list(seq.tokens)
        probes.append(types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                                  loss_fn_inputs={"target_tokens": full[1:], "weights": [0.0] * (len(full) - 1)}))
    out = tc.forward(probes, "cross_entropy").result()
    for seq, o in zip(res.sequences, out.loss_fn_outputs):
        trained = np.asarray(o["logprobs"].tolist())[len(prompt) - 1:]
        assert np.abs(trained - np.asarray(seq.logprobs)).max() <= 1e-5
    # compute_logprobs (sample with prompt_logprobs) scores the whole prompt as forward does,
    # and prompt_logprobs_last_n leaves the earlier entries None
    full = prompt + list(res.sequences[0].tokens)
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
    assert scored[0] is None and len(scored) == len(full)
    np.testing.assert_allclose(scored[1:], np.asarray(out.loss_fn_outputs[0]["logprobs"].tolist()), atol=1e-5)
    tail = sampler.compute_logprobs(types.ModelInput.from_ints(full), prompt_logprobs_last_n=5).result()
    assert tail[:-5] == [None] * (len(full) - 5) and tail[-5:] == pytest.approx(scored[-5:], abs=1e-6)
    sc.close("success").result()


def _train(server, project, data, seed, steps=2):
    """A run of ``project`` trained ``steps`` steps on ``data`` (its session closed after); returns
    its saved weights' tinker path, its losses and its adapter's tensors (downloaded)."""
    from safetensors.numpy import load

    with service(server, project) as sc:
        name = sc.get_server_capabilities().supported_models[0].model_name
        tc = sc.create_lora_training_client(base_model=name, rank=4, seed=seed, train_unembed=False).result()
        losses = []
        for _ in range(steps):
            fb = tc.forward_backward(data, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2))
            losses.append(fb.result().metrics["loss:sum"])
        path = tc.save_weights_external("final").result().path
        rest = tinker.RestClient(base_url=server.url, api_key="tml-" + KEYS[project])
        url = rest.get_external_weights_urls(path).result().urls["adapter_model.safetensors"]
        return path, losses, load(httpx.get(url, timeout=60).content)


def make_data(seed, n=2, length=30):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        toks = rng.integers(0, 256, length).tolist()
        out.append(types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]),
                               loss_fn_inputs={"target_tokens": toks[1:], "weights": [1.0] * (length - 1)}))
    return out


def test_two_projects_train_at_once_isolated_and_each_equals_its_run_alone(server):
    """Runs of two projects trained concurrently (their calls share engine steps) equal the
    same runs trained alone; neither project can see the other's run, weights or sampler."""
    import concurrent.futures

    da, db = make_data(1), make_data(2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fa = pool.submit(_train, server, "alpha", da, 11)
        fb = pool.submit(_train, server, "beta", db, 12)
        (path_a, la, wa), (_, lb, wb) = fa.result(), fb.result()
    (_, la1, wa1) = _train(server, "alpha", da, 11)
    (_, lb1, wb1) = _train(server, "beta", db, 12)
    np.testing.assert_allclose(la, la1, rtol=1e-5)
    np.testing.assert_allclose(lb, lb1, rtol=1e-5)
    for together, alone in ((wa, wa1), (wb, wb1)):
        assert together.keys() == alone.keys()
        for k in together:  # (the steps each pack runs in differ: fp32 rounding)
            np.testing.assert_allclose(together[k], alone[k], rtol=1e-4, atol=1e-6)
    run_a = path_a.split("/")[2]
    beta = httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-" + KEYS["beta"]}, timeout=60)
    assert beta.post("/api/v1/get_info", json={"model_id": run_a}).status_code == 404
    r = beta.get(f"/api/v1/training_runs/{run_a}/checkpoints/external_weights/final/external_weights_urls")
    assert r.status_code == 404
    sess = beta.post("/api/v1/create_session", json={"tags": [], "user_metadata": None, "sdk_version": "x"}).json()
    r = beta.post("/api/v1/create_sampling_session", json={
        "session_id": sess["session_id"], "sampling_session_seq_id": 0, "model_path": path_a})
    assert r.status_code == 404


def test_bad_calls_fail_alone_with_4xx(server):
    """Malformed bodies, unknown models, bad data and bad parameters get 4xx with a message;
    the server and a good run carry on."""
    http = httpx.Client(base_url=server.url, headers={"X-API-Key": "tml-" + KEYS["alpha"]}, timeout=60)
    assert http.post("/api/v1/create_session", json={"tags": "x"}).status_code == 400
    sess = http.post("/api/v1/create_session", json={"tags": [], "user_metadata": None, "sdk_version": "x"}).json()["session_id"]
    name = http.get("/api/v1/get_server_capabilities").json()["supported_models"][0]["model_name"]
    assert http.post("/api/v1/create_model", json={"session_id": sess, "model_seq_id": 0, "base_model": "nope"}).status_code == 404
    r = http.post("/api/v1/create_model", json={"session_id": sess, "model_seq_id": 0, "base_model": name,
                                               "lora_config": {"rank": 64, "train_unembed": False}})
    assert r.status_code == 400 and "max_lora_rank" in r.text
    r = http.post("/api/v1/create_model", json={"session_id": sess, "model_seq_id": 0, "base_model": name,
                                               "lora_config": {"rank": 4}})
    assert r.status_code == 400 and "train_unembed" in r.text  # LoRA on the LM head is not supported yet
    model = http.post("/api/v1/create_model", json={"session_id": sess, "model_seq_id": 0, "base_model": name,
                                                   "lora_config": {"rank": 4, "train_unembed": False}}).json()["model_id"]
    fb = http.post("/api/v1/forward_backward", content=b"\xff\x00garbage",
                   headers={"Content-Type": "application/x-protobuf"})
    assert fb.status_code == 400
    from tinker.proto.request_conv import forward_backward_request_to_proto

    def proto(data, loss_fn="cross_entropy"):
        req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn),
                                           model_id=model, seq_id=None)
        return forward_backward_request_to_proto(req).SerializeToString()

    good = make_data(3, n=1)
    missing = [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})]
    for body, message in ((proto(missing), "missing"), (proto(good, "dpo"), "loss_fn must be one of"),
                          (proto([types.Datum(model_input=types.ModelInput.from_ints([1, 9999]),
                                              loss_fn_inputs={"target_tokens": [2, 3], "weights": [1, 1]})]), "vocabulary")):
        r = http.post("/api/v1/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})
        assert r.status_code == 400 and message in r.text, r.text
    assert http.post("/api/v1/optim_step", json={"model_id": model, "adam_params": {"learning_rate": -1}}).status_code == 400
    assert http.post("/api/v1/retrieve_future", json={"request_id": "req-nope"}).status_code == 404
    r = http.post("/api/v1/forward_backward", content=proto(good), headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 200
    out = http.post("/api/v1/retrieve_future", json={"request_id": r.json()["request_id"]},
                    headers={"Accept": "application/x-protobuf"})
    from tinker.proto.response_conv import deserialize_forward_backward_output

    res = deserialize_forward_backward_output(out.content)
    assert len(res.loss_fn_outputs) == 1 and res.metrics["loss:sum"] > 0
    http.post(f"/api/v1/sessions/{sess}/finish", json={"reason": {"type": "success"}})


@pytest.mark.slow  # (two more servers, 35 s; the default suite's restart checks are test_serve_restart's)
def test_runs_and_saved_weights_survive_a_restart(checkpoint, tmp_path):
    """A run's saved weights outlive the server process: after a restart the run and its
    checkpoints are listed (the run closed: its engine state is gone), the external weights
    download, and the sampler weights serve both Tinker sampling and the OpenAI routes, to their
    project only."""
    import openai

    path, _ = checkpoint
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"key": k, "project": p} for p, k in KEYS.items()]))
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "model": {"path": str(path), "dtype": "float32"},
        "engine": {"max_num_seqs": 4, "max_num_batched_tokens": 32, "token_buckets": [32], "num_kv_pages": 128,
                   "max_loras": 2, "max_lora_rank": 4, "max_finetune_jobs": 1, "finetune_max_seq_len": 128,
                   "finetune_seq_buckets": [128], "max_finetune_tokens": 32},
    }))
    args = ["--config", str(cfg), "--api-keys-file", str(keys)]
    env = {"COSERVE_JAX_CACHE_DIR": str(tmp_path / "xla")}
    srv = ServerProcess(args, env=env)
    try:
        with service(srv) as sc:
            name = sc.get_server_capabilities().supported_models[0].model_name
            tc = sc.create_lora_training_client(base_model=name, rank=4, seed=2, train_unembed=False).result()
            tc.forward_backward(make_data(4, n=1), "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2))
            sampler_path = tc.save_weights_for_sampler("s1").result().path
            external = tc.save_weights_external("e1").result().path
            before = tinker.RestClient(base_url=srv.url, api_key="tml-" + KEYS["alpha"]).get_external_weights_urls(external).result()
            first = httpx.get(before.urls["adapter_model.safetensors"], timeout=60).content
    finally:
        assert srv.stop() == 0
    srv = ServerProcess(args, env=env)
    try:
        rest = tinker.RestClient(base_url=srv.url, api_key="tml-" + KEYS["alpha"])
        runs = rest.list_training_runs().result().training_runs
        assert [r.training_run_id for r in runs] == [sampler_path.split("/")[2]]
        ckpts = {c.tinker_path for c in rest.list_checkpoints(runs[0].training_run_id).result().checkpoints}
        assert ckpts == {sampler_path, external}
        urls = rest.get_external_weights_urls(external).result().urls
        assert httpx.get(urls["adapter_model.safetensors"], timeout=60).content == first
        beta_rest = tinker.RestClient(base_url=srv.url, api_key="tml-" + KEYS["beta"])
        assert beta_rest.list_training_runs().result().training_runs == []
        with service(srv) as sc:
            res = sc.create_sampling_client(model_path=sampler_path).sample(
                prompt=types.ModelInput.from_ints([5, 6, 7]), num_samples=1,
                sampling_params=types.SamplingParams(max_tokens=4, temperature=0.0)).result()
            tinker_tokens = list(res.sequences[0].tokens)
        oa = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEYS["alpha"], max_retries=0)
        out = oa.completions.create(model=sampler_path, prompt=[5, 6, 7], max_tokens=4, temperature=0.0, logprobs=0)
        assert len(out.choices[0].logprobs.tokens) == 4
        assert sampler_path in [m.id for m in oa.models.list().data]
        ob = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEYS["beta"], max_retries=0)
        with pytest.raises(openai.NotFoundError):
            ob.completions.create(model=sampler_path, prompt=[5, 6, 7], max_tokens=4)
        assert len(tinker_tokens) == 4
    finally:
        srv.stop()


def test_forward_backward_custom_equals_the_built_in_loss(server):
    """``forward_backward_custom`` (the client computes its loss on the forward's logprobs and
    sends ``-dloss/dlogprob`` as cross-entropy weights) with the cross-entropy written by hand
    trains the same adapter as the built-in ``cross_entropy``."""
    from safetensors.numpy import load

    data = make_data(7, n=2)

    def custom(batch, logprobs):
        loss = sum((-lp * torch.tensor(d.loss_fn_inputs["weights"].tolist())).sum() for d, lp in zip(batch, logprobs))
        return loss, {"custom:sum": float(loss.detach())}

    weights = []
    for use_custom in (True, False):
        with service(server) as sc:
            name = sc.get_server_capabilities().supported_models[0].model_name
            tc = sc.create_lora_training_client(base_model=name, rank=4, seed=21, train_unembed=False).result()
            for _ in range(2):
                if use_custom:
                    out = tc.forward_backward_custom(data, custom).result()
                    assert out.metrics["loss:sum"] == pytest.approx(out.metrics["custom:sum"])
                else:
                    tc.forward_backward(data, "cross_entropy")
                tc.optim_step(types.AdamParams(learning_rate=1e-2))
            path = tc.save_weights_external("w").result().path
            url = tinker.RestClient(base_url=server.url, api_key="tml-" + KEYS["alpha"]).get_external_weights_urls(
                path).result().urls["adapter_model.safetensors"]
            weights.append(load(httpx.get(url, timeout=60).content))
    for k in weights[0]:  # (a pack runs as one idle train step or as fused chunks, as the steps fall: fp32 rounding)
        np.testing.assert_allclose(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-6)


def _external(server, tc, name, project="alpha"):
    from safetensors.numpy import load

    path = tc.save_weights_external(name).result().path
    url = tinker.RestClient(base_url=server.url, api_key="tml-" + KEYS[project]).get_external_weights_urls(
        path).result().urls["adapter_model.safetensors"]
    return load(httpx.get(url, timeout=60).content)


def test_save_state_and_load_state_resume_training_exactly(server):
    """``save_state`` then more training; ``create_training_client_from_state_with_optimizer``
    (a new run) and ``load_state_with_optimizer`` (the same run) both continue from the saved
    step exactly as the original did (same loss, same weights after the next optimizer step);
    ``load_state`` without the optimizer restores the weights but restarts AdamW."""
    data = make_data(9, n=2)
    adam = types.AdamParams(learning_rate=1e-2, eps=1.0)
    with service(server) as sc:
        name = sc.get_server_capabilities().supported_models[0].model_name
        tc = sc.create_lora_training_client(base_model=name, rank=4, seed=3, train_unembed=False).result()
        for _ in range(2):
            tc.forward_backward(data, "cross_entropy")
            tc.optim_step(adam)
        state = tc.save_state("after-2").result().path
        assert state.endswith("/weights/after-2")
        loss3 = tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
        tc.optim_step(adam).result()
        want = _external(server, tc, "after-3")

        tc.load_state_with_optimizer(state).result()
        again = tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
        tc.optim_step(adam).result()
        same_run = _external(server, tc, "after-3-again")
        assert again == pytest.approx(loss3, rel=1e-5)
        for k in want:
            np.testing.assert_allclose(same_run[k], want[k], rtol=1e-4, atol=1e-6)

        tc.load_state(state).result()  # weights only: AdamW starts over
        assert tc.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(loss3, rel=1e-5)
        tc.optim_step(adam).result()
        fresh_adam = _external(server, tc, "after-3-fresh-adam")
        assert max(float(np.abs(fresh_adam[k] - want[k]).max()) for k in want) > 1e-4
        sc.close("success").result()
    with service(server) as sc:
        tc2 = sc.create_training_client_from_state_with_optimizer(state).result()
        assert tc2.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(loss3, rel=1e-5)
        tc2.optim_step(adam).result()
        new_run = _external(server, tc2, "after-3")
        for k in want:
            np.testing.assert_allclose(new_run[k], want[k], rtol=1e-4, atol=1e-6)
