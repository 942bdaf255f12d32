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
        "engine": {"max_num_seqs": 8, "max_num_batched_tokens": 64, "token_buckets": [16, 64], "num_kv_pages": 256,
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
    tc = service(server).create_lora_training_client(base_model=name, rank=4, seed=5, train_unembed=False).result()
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
        theirs.append(float(loss))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < ours[0]

    final = tc.save_weights_external("final").result().path
    ours_dir = download_adapter(server, "alpha", final, tmp_path / "final")
    loaded = PeftModel.from_pretrained(base, ours_dir)
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
    sampler = tc.save_weights_and_get_sampling_client("consistency")
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
