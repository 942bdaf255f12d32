"""Bad input never gets a 5xx: every route of the real server (built-in tiny model, nothing
downloaded), driven with request bodies whose fields take values of every JSON type (huge and
negative numbers, NaN, lone UTF-16 surrogates, long strings, deep lists, objects), and with
truncated, non-UTF-8, empty, deeply nested and oversized bodies. Every answer is a 2xx or a
4xx in OpenAI's error shape, and afterwards the server answers a normal request.

The cases come from a seeded generator (the same every run); ``COSERVE_FUZZ_ROUNDS`` (default 2)
sets how many random values each field gets beside the fixed ones.
"""

from __future__ import annotations

import json
import os
import random
import re

import httpx
import pytest

from tests.serve_util import ServerProcess

BASE = "coserve-tiny"
ROUNDS = int(os.environ.get("COSERVE_FUZZ_ROUNDS", "2"))

FIXED_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**400, 1e308, -1e308, float("nan"), float("inf"),
                0.5, "", "x" * 5000, "\ud800", "\udfff\ud800", "\u0000", "日本語", [], [None], [1, "a", None, {}],
                [[1, 2], [3]], {}, {"a": 1}, {"": None}]

CHAT = [{"role": "user", "content": "Hello!"}]
ROUTES = [
    ("POST", "/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 4, "temperature": 0, "n": 1, "stream": False,
                                 "logprobs": 2, "echo": False, "stop": ["\n"], "seed": 1, "top_p": 1, "top_k": -1,
                                 "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {"1": 1}, "best_of": 1,
                                 "suffix": None, "min_p": 0, "repetition_penalty": 1, "stop_token_ids": [1],
                                 "stream_options": {"include_usage": True}, "min_tokens": 0, "user": "u"}),
    ("POST", "/v1/chat/completions", {"model": BASE, "messages": CHAT, "max_tokens": 4, "max_completion_tokens": 4,
                                      "temperature": 0, "n": 1, "stream": False, "logprobs": True, "top_logprobs": 2,
                                      "stop": "\n", "seed": 1, "response_format": {"type": "text"}, "tools": None,
                                      "tool_choice": None, "chat_template_kwargs": {}, "add_generation_prompt": True}),
    ("POST", "/tokenize", {"model": BASE, "prompt": "hello", "add_special_tokens": True, "return_token_strs": True}),
    ("POST", "/tokenize", {"model": BASE, "messages": CHAT, "add_generation_prompt": True, "chat_template_kwargs": {}}),
    ("POST", "/detokenize", {"model": BASE, "tokens": [72, 105]}),
    ("POST", "/v1/fine_tuning/jobs", {"model": BASE, "training_file": "file-000000000000000000000000", "suffix": "s",
                                      "seed": 1, "hyperparameters": {"n_epochs": 1}, "validation_file": None,
                                      "method": {"type": "supervised"}, "metadata": {"k": "v"}, "lora": {"r": 4},
                                      "integrations": []}),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
]
GETS = ["/v1/models", "/v1/models/{x}", "/v1/files", "/v1/files/{x}", "/v1/files/{x}/content", "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{x}", "/v1/fine_tuning/jobs/{x}/events", "/v1/fine_tuning/jobs/{x}/checkpoints"]
QUERY = {"limit": None, "after": None, "order": None, "purpose": None}
POST_IDS = ["/v1/fine_tuning/jobs/{x}/cancel", "/v1/fine_tuning/jobs/{x}/pause", "/v1/fine_tuning/jobs/{x}/resume"]
IDS = ["", "x", "file-" + "0" * 24, "ftjob-..%2F..%2Fetc", "%00", "%ff%fe", "a" * 3000, "%ED%A0%80"]


def _step_memory() -> int:
    """A budget the tiny model's largest step (128 tokens, 16 sequences) fits at a 1024-token
    gather width and not at the longer context the server is given."""
    from coserve_jax.kernels.reference import scratch_bytes
    from coserve_jax.models.tiny import tiny_config

    c = tiny_config()
    return scratch_bytes(128, 16, 1024, c.num_heads, c.num_kv_heads, c.head_dim, 4)


STEP_MEMORY = _step_memory()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    srv = ServerProcess(["--output-dir", str(out), "--set", "limits.max_tokens=8", "--set", "timeout_header_s=2",
                         "--set", f"limits.step_memory_bytes={STEP_MEMORY}", "--max-model-len", "4096",
                         "--set", "model.hf_overrides={max_position_embeddings: 4096}",
                         "--set", "limits.max_body_bytes=65536", "--set", "limits.max_upload_bytes=65536"],
                        env={"COSERVE_JAX_CACHE_DIR": str(tmp_path_factory.mktemp("xla"))})
    srv.out = out
    yield srv
    srv.stop()


def _random_value(rng: random.Random):
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice([rng.randint(-10**6, 10**6), rng.getrandbits(70), -rng.getrandbits(70)])
    if kind == 1:
        return rng.uniform(-1e6, 1e6)
    if kind == 2:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(0, 40)))
    if kind == 3:
        return [_random_value(rng) for _ in range(rng.randrange(0, 4))] if rng.random() < 0.5 else list(range(rng.randrange(50)))
    if kind == 4:
        return {str(rng.randrange(100)): _random_value(rng) for _ in range(rng.randrange(0, 3))}
    return rng.choice([None, True, False])


def _bodies(rng: random.Random, base: dict):
    for field in list(base) + ["unknown_field"]:
        for value in FIXED_VALUES + [_random_value(rng) for _ in range(ROUNDS)]:
            body = dict(base)
            body[field] = value
            yield json.dumps(body).encode("utf-8", "surrogatepass")
    raw = json.dumps(base).encode()
    yield raw[: len(raw) // 2]  # truncated
    yield b"\xff\xfe" + raw  # not UTF-8
    yield b""  # empty
    yield b"[" * 50_000 + b"]" * 50_000  # deeply nested
    yield b'{"model": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    yield b'{"a": "' + b"x" * 70_000 + b'"}'  # over the body limit
    yield b"null"
    yield b"[]"
    yield b'"a string"'


def _check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:500]}"
    if r.status_code >= 400:
        err = r.json().get("error")
        assert isinstance(err, dict) and isinstance(err.get("message"), str), f"{what}: {r.text[:300]}"


def _healthy(h: httpx.Client) -> None:
    r = h.post("/v1/chat/completions", json={"model": BASE, "messages": CHAT, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, r.text


@pytest.mark.parametrize("route", range(len(ROUTES)), ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_post_bodies_never_get_a_5xx(server, route):
    method, path, base = ROUTES[route]
    rng = random.Random(route)
    with httpx.Client(base_url=server.url, timeout=120) as h:
        for body in _bodies(rng, base):
            r = h.request(method, path, content=body, headers={"Content-Type": "application/json"})
            _check(r, f"{path} {body[:200]!r}")
        _healthy(h)


def test_ids_queries_and_uploads_never_get_a_5xx(server):
    rng = random.Random(99)
    with httpx.Client(base_url=server.url, timeout=120) as h:
        for path in GETS:
            for x in IDS:
                _check(h.get(path.replace("{x}", x)), f"GET {path} {x!r}")
        for path in POST_IDS:
            for x in IDS:
                _check(h.post(path.replace("{x}", x)), f"POST {path} {x!r}")
                _check(h.post(path.replace("{x}", x), content=b"\xff"), f"POST {path} {x!r} junk")
        for path in ("/v1/files", "/v1/fine_tuning/jobs"):
            for key in QUERY:
                for value in ["-1", "0", "1e9", "abc", "", "%ff", "9" * 40, "asc", "desc"]:
                    _check(h.get(f"{path}?{key}={value}"), f"GET {path}?{key}={value}")
        for purpose in ["fine-tune", "", "x" * 300, "batch"]:
            for content in [b"", b"\xff\xfe\x00", b"[" * 60_000, b'{"messages": 1}\n', json.dumps({"a": "\ud800"}).encode(),
                            b"x" * 70_000, rng.randbytes(500)]:
                r = h.post("/v1/files", files={"file": ("f.jsonl", content)}, data={"purpose": purpose})
                _check(r, f"upload {purpose[:20]!r} {content[:40]!r}")
        _check(h.post("/v1/files", content=b"--junk\r\n", headers={"Content-Type": "multipart/form-data; boundary=junk"}), "multipart junk")
        _check(h.post("/v1/files", data={"purpose": "fine-tune"}), "no file")
        _healthy(h)


def test_invalid_unicode_is_a_400_naming_the_field(server):
    with httpx.Client(base_url=server.url, timeout=120) as h:
        r = h.post("/v1/completions", content=b'{"model": "coserve-tiny", "prompt": "a\\ud800b"}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "prompt" in r.json()["error"]["message"], r.text
        r = h.post("/v1/chat/completions", content=b'{"model": "coserve-tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "messages.0.content" in r.json()["error"]["message"], r.text


def test_a_connection_that_sends_no_complete_headers_is_closed(server):
    """Slowloris: a silent connection and one that sends half a request line are closed by the
    header-read timeout (2 s here); a normal request is served meanwhile."""
    import socket
    import time
    from urllib.parse import urlparse

    u = urlparse(server.url)
    socks = [socket.create_connection((u.hostname, u.port)) for _ in range(2)]
    socks[1].sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
    t = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=60) as h:
        _healthy(h)
    for s in socks:
        s.settimeout(30)
        assert s.recv(1024) == b""  # closed by the server
        s.close()
    assert time.monotonic() - t < 20


def test_uploads_leave_no_temporary_files(server):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        for content in (b"[" * 30_000 + b"]" * 30_000 + b"\n", b"\xff\xfe", b"not json\n"):
            r = h.post("/v1/files", files={"file": ("f.jsonl", content)}, data={"purpose": "fine-tune"})
            assert r.status_code == 400, r.text
    leftovers = [p.name for p in (server.out / "files").iterdir()]
    assert not [n for n in leftovers if n.endswith(".tmp")], leftovers


def test_a_request_whose_steps_would_not_fit_in_memory_is_refused(server):
    """limits.step_memory_bytes lets the reference attention gather at most 1024 tokens of
    context, less than the server's context: a longer request is a 400 saying how much fits; one
    within that is served."""
    with httpx.Client(base_url=server.url, timeout=60) as h:
        r = h.post("/v1/completions", json={"model": BASE, "prompt": "a" * 1500, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "insufficient_memory", r.text
        fits = int(re.search(r"fits (\d+)", r.json()["error"]["message"]).group(1))
        assert 256 <= fits <= 1024
        r = h.post("/v1/completions", json={"model": BASE, "prompt": "a" * (fits - 20), "max_tokens": 4})
        assert r.status_code == 200, r.text
