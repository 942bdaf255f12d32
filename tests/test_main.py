"""`python -m coserve_jax` (the README's first command) runs the engine on its built-in default:
24 requests on three adapters while a finetuning job trains beside them."""

import contextlib
import io
import re

import pytest

from coserve_jax.__main__ import main


@pytest.fixture(scope="module")
def out():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["--max-tokens", "8"])
    return buf.getvalue()


def test_default_run_serves_requests_on_three_adapters(out):
    m = re.search(r"24 requests \((\d+) prompt tokens\) -> (\d+) generated tokens .* compilations after start-up (\d+)", out)
    assert m, out
    assert int(m.group(2)) == 24 * 8  # ignore_eos: every request runs to max_tokens
    assert int(m.group(3)) == 0
    picks = re.findall(r"adapter (\S+)\s+-> greedy tokens (\[.*\])", out)
    assert [p[0] for p in picks] == ["base", "attn-r4", "mlp-r8"]
    assert len({p[1] for p in picks}) > 1  # the adapters change the continuation


def test_default_run_trains_an_adapter_beside_the_requests(out):
    m = re.search(r"finetuning succeeded: (\d+) training tokens \((\d+) while the requests ran\).*loss by step: ([\d. ]+)", out)
    assert m, out
    assert int(m.group(2)) > 0
    losses = [float(x) for x in m.group(3).split()]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.3
    tuned = re.search(r"adapter 'tuned' -> \[([\d, ]+)\]", out)
    assert tuned and [int(x) for x in tuned.group(1).split(",")][:3] == [277, 377, 477]  # the trained cycle
