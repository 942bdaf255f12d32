"""`python -m coserve_jax` (the README's first command) runs on its built-in default."""

import re

from coserve_jax.__main__ import main


def test_default_run_uses_three_adapters(capsys):
    main([])
    out = capsys.readouterr().out
    picks = re.findall(r"adapter (\S+)\s+-> greedy next token\s+(\d+)", out)
    assert [p[0] for p in picks] == ["base", "attn-r4", "mlp-r8"]
    # Same prompt, different adapters: the adapters change the prediction of at least one row.
    assert len({p[1] for p in picks}) > 1
