"""Projects (tenants) on one server: three keys of an ``--api-keys-file`` (projects alpha and beta,
and an admin of project ops) and a key kept in the database, against the real server on its
built-in tiny model, driven with the official ``openai`` client and raw HTTP.

What alpha makes (a file, a fine-tuning job and its model, an adapter it loads) is invisible to
beta over every route: lists leave it out, ids and model names answer 404, and beta cannot
generate with, unload or cancel it. What the admin loads is shared, and only an admin may unload
it. A key created with ``python -m coserve_jax.serve.keys`` works at once and is refused once revoked.
Adapters load only from under ``--lora-root`` (neither ``..`` nor a symbolic link gets out: 403),
and each malformed adapter is a 400 naming its problem, the server carrying on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.serve_util import ServerProcess, wait_until

openai = pytest.importorskip("openai")

BASE = "coserve-tiny"
KEYS = {"alpha": "alpha-key-0001", "beta": "beta-key-0002", "ops": "admin-key-0003"}
CHAT = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys.yaml"
    keys.write_text(json.dumps([{"key": KEYS["alpha"], "project": "alpha"}, {"key": KEYS["beta"], "project": "beta"},
                                {"key": KEYS["ops"], "project": "ops", "admin": True}]))
    (tmp / "adapters").mkdir()
    srv = ServerProcess(["--output-dir", str(tmp / "out"), "--api-keys-file", str(keys), "--lora-root", str(tmp / "adapters")],
                        env={"COSERVE_JAX_CACHE_DIR": str(tmp_path_factory.mktemp("xla"))})
    srv.tmp = tmp
    yield srv
    srv.stop()


def client(server, project):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[project], max_retries=0, timeout=120)


def http(server, key):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def adapter_dir(path, seed: int) -> str:
    from coserve_jax.__main__ import _random_adapter
    from coserve_jax.lora.peft_io import write_peft
    from coserve_jax.models.tiny import tiny_config

    config = tiny_config()
    write_peft(_random_adapter(config, 4, ("q_proj", "v_proj"), seed=seed), path, config.num_layers)
    return str(path)


def test_projects_are_isolated_over_every_route(server, tmp_path):
    a, b, ops = client(server, "alpha"), client(server, "beta"), client(server, "ops")
    secret = tmp_path / "secret.jsonl"
    secret.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "client A secret: hunter2"},
                                                         {"role": "assistant", "content": f"ok {i}"}]}) for i in range(4)) + "\n")
    with open(secret, "rb") as f:
        fid = a.files.create(file=f, purpose="fine-tune").id
    job = a.fine_tuning.jobs.create(model=BASE, training_file=fid, hyperparameters={"max_steps": 100000})
    wait_until(lambda: a.fine_tuning.jobs.retrieve(job.id).status == "running", timeout=120)
    ft = job.fine_tuned_model

    # alpha sees its own
    assert [f.id for f in a.files.list().data] == [fid] and b"hunter2" in a.files.content(fid).content
    assert [j.id for j in a.fine_tuning.jobs.list().data] == [job.id]
    assert ft in {m.id for m in a.models.list().data}
    assert a.chat.completions.create(model=ft, messages=CHAT, max_tokens=2).choices

    # beta sees none of it
    assert b.files.list().data == [] and b.fine_tuning.jobs.list().data == []
    assert {m.id for m in b.models.list().data} == {BASE}
    for call in (lambda: b.files.retrieve(fid), lambda: b.files.content(fid), lambda: b.files.delete(fid),
                 lambda: b.fine_tuning.jobs.retrieve(job.id), lambda: b.fine_tuning.jobs.list_events(job.id),
                 lambda: b.fine_tuning.jobs.checkpoints.list(job.id), lambda: b.fine_tuning.jobs.cancel(job.id),
                 lambda: b.fine_tuning.jobs.pause(job.id), lambda: b.fine_tuning.jobs.resume(job.id),
                 lambda: b.models.retrieve(ft), lambda: b.models.delete(ft),
                 lambda: b.chat.completions.create(model=ft, messages=CHAT, max_tokens=2),
                 lambda: b.completions.create(model=ft, prompt="hi", max_tokens=2)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError):  # alpha's file is no file of beta's
        b.fine_tuning.jobs.create(model=BASE, training_file=fid)
    with http(server, KEYS["beta"]) as hb:
        assert hb.post("/v1/unload_lora_adapter", json={"lora_name": ft}).status_code == 404
        assert hb.post("/tokenize", json={"model": ft, "prompt": "hi"}).status_code == 404

        # an admin's adapter is shared; only an admin unloads it
        with http(server, KEYS["ops"]) as hops:
            r = hops.post("/v1/load_lora_adapter", json={"lora_name": "shared-one", "lora_path": adapter_dir(server.tmp / "adapters" / "s", 1)})
            assert r.status_code == 200, r.text
        assert "shared-one" in {m.id for m in b.models.list().data} and "shared-one" in {m.id for m in a.models.list().data}
        assert b.chat.completions.create(model="shared-one", messages=CHAT, max_tokens=2).choices
        r = hb.post("/v1/unload_lora_adapter", json={"lora_name": "shared-one"})
        assert r.status_code == 403, r.text
        with pytest.raises(openai.PermissionDeniedError):
            b.models.delete("shared-one")
        assert ops.models.delete("shared-one").deleted

    # what the admin's project made is its own too: the admin sees alpha's objects no more than beta does
    with pytest.raises(openai.NotFoundError):
        ops.files.retrieve(fid)
    # alpha's job is untouched by all of the above, and alpha can cancel it
    assert a.fine_tuning.jobs.retrieve(job.id).status == "running"
    assert a.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert [f.id for f in a.files.list().data] == [fid]


def test_keys_are_required_and_database_keys_work_until_revoked(server):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        assert h.get("/v1/models").status_code == 401
        assert h.get("/v1/models", headers={"Authorization": "Bearer wrong-key-999"}).status_code == 401
        assert h.get("/health").status_code == 200
    out = str(server.tmp / "out")
    made = subprocess.run([sys.executable, "-m", "coserve_jax.serve.keys", "create", "--project", "gamma", "--output-dir", out],
                          capture_output=True, text=True, check=True).stdout
    key_id, key = made.split(" ")[0], made.strip().rsplit(" ", 1)[1]
    listed = json.loads(subprocess.run([sys.executable, "-m", "coserve_jax.serve.keys", "list", "--output-dir", out],
                                       capture_output=True, text=True, check=True).stdout)
    assert [(k["id"], k["project"], k["admin"]) for k in listed] == [(key_id, "gamma", False)]
    assert key not in json.dumps(listed)
    g = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
    assert g.files.list().data == [] and {m.id for m in g.models.list().data} >= {BASE}
    subprocess.run([sys.executable, "-m", "coserve_jax.serve.keys", "revoke", key_id, "--output-dir", out], check=True,
                   capture_output=True)
    with pytest.raises(openai.AuthenticationError):
        g.models.list()


def test_adapters_load_only_from_under_the_root_and_malformed_ones_are_400(server, tmp_path):
    from tests.test_adapter_files import MALFORMED, good_adapter

    root = server.tmp / "adapters"
    b = client(server, "beta")
    with http(server, KEYS["alpha"]) as ha:
        def load(name, path):
            return ha.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})

        r = load("alpha-own", adapter_dir(root / "own", 2))
        assert r.status_code == 200, r.text
        assert "alpha-own" in {m.id for m in client(server, "alpha").models.list().data}
        assert "alpha-own" not in {m.id for m in b.models.list().data}  # a project's own adapter
        outside = adapter_dir(tmp_path / "outside", 3)
        assert load("escape-dots", f"{root}/../../{os.path.relpath(outside, root.parent.parent)}").status_code == 403
        os.symlink(outside, root / "link")
        r = load("escape-link", root / "link")
        assert r.status_code == 403 and "outside" in r.json()["error"]["message"]
        for i, (case, (make, reason)) in enumerate(MALFORMED.items()):
            d = good_adapter(root / f"bad{i}")
            make(d)
            r = load(f"bad{i}", d)
            assert r.status_code == 400 and reason in r.json()["error"]["message"], (case, r.text)
        d = good_adapter(root / "cfglink")
        os.unlink(os.path.join(d, "adapter_config.json"))
        os.symlink("/etc/passwd", os.path.join(d, "adapter_config.json"))
        r = load("cfglink", d)
        assert r.status_code == 400 and "outside the adapter directory" in r.text
        assert ha.get("/v1/models").status_code == 200  # the server carries on


def _timed_chat(c, results: dict, key: str, **kw) -> None:
    import time

    t = time.monotonic()
    c.chat.completions.create(model=BASE, messages=CHAT, **kw)
    results[key] = time.monotonic() - t


def test_a_big_request_of_one_project_does_not_starve_another(server):
    """alpha asks for 4 prompts x n=16 (64 sequences, 4 batches of the engine's 16); beta's small
    request, sent just after, waits behind at most one batch of alpha's, not all four."""
    import threading
    import time

    a, b = client(server, "alpha"), client(server, "beta")
    big = {}

    def alpha_big():
        t = time.monotonic()
        a.completions.create(model=BASE, prompt=["one", "two", "three", "four"], n=16, max_tokens=48,
                             extra_body={"ignore_eos": True})
        big["alpha"] = time.monotonic() - t

    th = threading.Thread(target=alpha_big)
    th.start()
    time.sleep(0.5)
    small: dict = {}
    _timed_chat(b, small, "beta", max_tokens=4)
    th.join(300)
    assert small["beta"] < 0.6 * big["alpha"], (small, big)


def test_a_huge_chat_body_does_not_hold_up_small_requests(server):
    """A 3.7 MB chat of 110k tiny messages (sent three times) is refused (more than
    limits.max_messages) without holding the tokenizers or the event loop; small requests
    meanwhile take at most twice as long as alone (medians of five)."""
    import statistics
    import threading

    b = client(server, "beta")
    alone: dict = {}
    for i in range(5):
        _timed_chat(b, alone, f"alone{i}", max_tokens=16)
    huge = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "hi"}] * 110_000, "max_tokens": 4}).encode()
    answers = []

    def send_huge():  # the body is encoded beforehand: the client's own work does not slow the timed requests
        with http(server, KEYS["alpha"]) as h:
            for _ in range(3):
                r = h.post("/v1/chat/completions", content=huge, headers={"Content-Type": "application/json"})
                answers.append((r.status_code, r.text[:200]))

    th = threading.Thread(target=send_huge)
    th.start()
    during: dict = {}
    for i in range(5):
        _timed_chat(b, during, f"during{i}", max_tokens=16)
    th.join(120)
    assert answers and all(code == 400 and "messages" in text for code, text in answers), answers
    assert statistics.median(during.values()) <= 2 * statistics.median(alone.values()) + 0.05, (during, alone)
