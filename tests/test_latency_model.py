"""The step latency model (pure Python): least-squares fit, online refinement, persistence."""

import random
import subprocess
import sys

import pytest

from coserve_jax.sched.latency_model import LatencyModel, StepShape

TRUE = [0.8, 6.0, 0.5, 3.0, 4.0, 2.5, 5.0]  # ms per feature unit


def truth(shape, scale=1.0):
    return scale * sum(w * x for w, x in zip(TRUE, shape.features()))


def shapes(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice([16, 32, 64, 128, 256, 512])
        s = rng.choice([4, 8, 16, 32, 64])
        out.append(StepShape(t, min(s, t), rng.randint(0, t * 2048), rng.choice([0, 0, 128, 256, 512, 1024]),
                             rng.choice([1, 1, 4, 30]), rng.choice([0, 0, 16, 64, min(t, 256)])))
    return out


def test_sched_latency_model_imports_no_jax():
    code = "import sys, coserve_jax.sched.latency_model; print(sorted(m for m in ('jax', 'numpy') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_fit_recovers_a_linear_device_within_noise():
    rng = random.Random(1)
    train = [(s, truth(s) * (1 + rng.gauss(0, 0.03))) for s in shapes(80)]
    model = LatencyModel().fit(train)
    test = [(s, truth(s)) for s in shapes(200, seed=2)]
    assert model.median_relative_error(test) < 0.03
    for w, t in zip(model.weights, TRUE):
        assert w == pytest.approx(t, rel=0.15, abs=0.2)
    assert model.predict(StepShape()) == 0.0


def test_online_updates_follow_a_slower_device():
    model = LatencyModel(forgetting=0.95).fit([(s, truth(s)) for s in shapes(60)])
    test = [(s, truth(s, 1.5)) for s in shapes(100, seed=3)]
    assert model.median_relative_error(test) > 0.3  # the device got 1.5x slower
    for s in shapes(150, seed=4):
        model.update(s, truth(s, 1.5))
    assert model.median_relative_error(test) < 0.05
    assert model.num_updates == 150


def test_json_round_trip_and_validation():
    model = LatencyModel(TRUE)
    again = LatencyModel.from_json(model.to_json())
    s = StepShape(64, 8, 5000, 256)
    assert again.predict(s) == pytest.approx(model.predict(s))
    with pytest.raises(ValueError, match="features"):
        LatencyModel.from_json('{"features": ["x"], "weights": [1]}')
    with pytest.raises(ValueError, match="forgetting"):
        LatencyModel(forgetting=0)
    with pytest.raises(ValueError, match="no samples"):
        LatencyModel().fit([])


def test_fit_is_non_negative():
    # sequence slots cost nothing, but the 4-slot buckets happen to run 0.5 ms slower: the
    # unconstrained fit makes sequence slots negative (a wider step predicted cheaper); the
    # non-negative fit does not
    train = [(StepShape(t, s, 0, 0), 1.0 + 0.25 * t + (0.5 if s == 4 else 0.0)) for t in (16, 32, 64, 128, 256) for s in (4, 16, 64)]
    model = LatencyModel().fit(train)
    assert all(w >= 0 for w in model.weights), model.weights
    assert model.median_relative_error(train) < 0.05
    assert model.predict(StepShape(16, 64, 0, 0)) >= model.predict(StepShape(16, 16, 0, 0))


def test_per_shape_ratio_learns_a_bucket_quirk_and_stays_stable():
    model = LatencyModel().fit([(s, truth(s)) for s in shapes(60)])
    odd = StepShape(64, 8, 1000, 0)  # this bucket runs 30% slower than the linear form says
    decode = StepShape(16, 16, 16 * 300, 0)
    for i in range(5000):  # long runs of identical steps (decode-only stretches), then the odd one
        s = odd if i % 50 == 0 else decode
        model.update(s, truth(s) * (1.3 if s is odd else 1.0))
    assert model.predict(odd) == pytest.approx(truth(odd) * 1.3, rel=0.05)
    assert model.predict(decode) == pytest.approx(truth(decode), rel=0.05)
    other = StepShape(256, 32, 10_000, 512)  # never measured: the global ratio stayed near 1
    assert model.predict(other) == pytest.approx(truth(other), rel=0.05)
