"""`python -m coserve_jax` (the README's first command) runs the engine on its built-in default."""

import re

from coserve_jax.__main__ import main


def test_default_run_serves_requests_on_three_adapters(capsys):
    main(["--max-tokens", "8"])
    out = capsys.readouterr().out
    m = re.search(r"24 requests \((\d+) prompt tokens\) -> (\d+) generated tokens .* compilations after start-up (\d+)", out)
    assert m, out
    assert int(m.group(2)) == 24 * 8  # ignore_eos: every request runs to max_tokens
    assert int(m.group(3)) == 0
    picks = re.findall(r"adapter (\S+)\s+-> greedy tokens (\[.*\])", out)
    assert [p[0] for p in picks] == ["base", "attn-r4", "mlp-r8"]
    assert len({p[1] for p in picks}) > 1  # the adapters change the continuation
