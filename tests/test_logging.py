"""Logging: the package's own handler (library use), the server's config carrying uvicorn's
loggers, and the periodic stats line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types

import pytest

from coserve_jax.logging_config import logging_config
from coserve_jax.serve.stat_logger import StatLogger

SNIPPET = "import logging, coserve_jax; logging.getLogger('coserve_jax.engine').info('compiled %d', 3)"


@pytest.mark.parametrize("configure", ["1", "0"])
def test_importing_the_package_gives_its_logger_a_stdout_handler(configure):
    env = {k: v for k, v in os.environ.items() if k != "COSERVE_JAX_CONFIGURE_LOGGING"}
    env["COSERVE_JAX_CONFIGURE_LOGGING"] = configure
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if configure == "1":
        assert out.stdout.startswith("INFO ") and out.stdout.rstrip().endswith("[coserve_jax.engine] compiled 3")
    else:
        assert out.stdout == "" and "compiled" not in out.stderr  # left to the application (INFO is below lastResort)


def test_server_logging_config_carries_uvicorn_and_ours():
    cfg = logging_config("debug", access_log=False)
    assert cfg["loggers"]["coserve_jax"]["level"] == "DEBUG" and cfg["loggers"]["uvicorn"]["level"] == "DEBUG"
    assert cfg["loggers"]["uvicorn.access"]["handlers"] == []
    assert logging_config("info")["loggers"]["uvicorn.access"]["handlers"] == ["access"]
    with pytest.raises(ValueError, match="log level"):
        logging_config("loud")


def _engine(running=2, waiting=1, used=3, jobs=(), queries=80, hits=20):
    kv = types.SimpleNamespace(num_used_pages=used, capacity=12, prefix_cache_queries=queries, prefix_cache_hits=hits)
    sched = types.SimpleNamespace(num_running=running, num_waiting=waiting, kv_cache=kv, num_preemptions=0)
    return types.SimpleNamespace(scheduler=sched, finetuning_jobs=list(jobs))


def _out(rid, prompt, new, finished=False):
    return types.SimpleNamespace(request_id=rid, prompt_token_ids=[0] * prompt, token_ids=[1] * new,
                                 delta_token_ids=[1] * new, finished=finished)


def test_stats_line_reports_the_window(caplog):
    now = [0.0]
    stats = StatLogger(interval_s=10.0, clock=lambda: now[0])
    job = types.SimpleNamespace(id="ftjob-x", trained_tokens=0, done=False, step=1, total_steps=4,
                                loss_history=[types.SimpleNamespace(loss=2.5)])
    engine = _engine(jobs=[job])
    stats.observe(engine, [_out("a", 30, 1), _out("b", 10, 1)])
    job.trained_tokens = 200
    stats.observe(engine, [_out("a", 30, 1, finished=True), _out("b", 10, 1)])
    now[0] = 10.0
    with caplog.at_level(logging.INFO, logger="coserve_jax.serve.stats"):
        line = stats.flush(engine)
    # prompts counted once each (40 tokens), 4 tokens generated, 200 trained, over 10 s
    assert line == ("Avg prompt throughput: 4.0 tokens/s, Avg generation throughput: 0.4 tokens/s, Running: 2 reqs, "
                    "Waiting: 1 reqs, KV cache usage: 25.0%, Preemptions: 0, Prefix cache hit rate: 25.0%, Finetuning: 20.0 tokens/s "
                    "(ftjob-x step 1/4, loss 2.5000)")
    assert caplog.records[-1].getMessage() == line
    now[0] = 25.0  # an idle window logs nothing
    assert stats.flush(_engine(running=0, waiting=0)) is None
