"""``python -m coserve_jax.serve`` on its built-in default (the README's walk-through): the tiny
model with the byte-level tokenizer, nothing downloaded; it says where and when it is ready,
serves the openai client, and stops cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import signal

import pytest

from tests.serve_util import ServerProcess

openai = pytest.importorskip("openai")


def test_default_server_starts_serves_and_stops(tmp_path):
    srv = ServerProcess(["--output-dir", str(tmp_path / "out")], env={"COSERVE_JAX_CACHE_DIR": str(tmp_path / "xla")})
    try:
        assert "serving 'coserve-tiny' at http://127.0.0.1:" in srv.output and "ready" in srv.output
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["coserve-tiny"]
        r = client.chat.completions.create(model="coserve-tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8)
        assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 8
        # <|begin_of_text|> + header + "user" + header end + "\n\n" + "Hello!" + eot + assistant header: one token per byte
        assert r.usage.prompt_tokens == 1 + 1 + 4 + 1 + 2 + 6 + 1 + 1 + 9 + 1 + 2
        text = "".join(c.choices[0].text for c in client.completions.create(model="coserve-tiny", prompt="abc", max_tokens=6, stream=True))
        assert isinstance(text, str)
    finally:
        code = srv.stop(signal.SIGINT)
    assert code == 0, srv.output
    assert "coserve-jax: stopped." in srv.output
