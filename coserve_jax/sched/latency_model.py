"""Step latency model: predicts a step's device time from its composition (issue 5, part 1).

The hybrid scheduler sizes each step's prefill chunks and finetuning work so that the predicted
step time keeps running requests inside their TPOT SLO. What a step costs depends on what the
device computes, which is the *padded* shape:

* the fused step runs a bucket of ``T`` token slots and ``S`` sequence slots (linear layers and
  LM head scale with ``T`` and ``S``), plus attention, whose work is ``sum_i q_i * kv_i`` over
  the sequences (a decode token reads its whole KV; a prefill chunk of ``q`` tokens reads up to
  ``q * kv``);
* a finetuning backward slice runs on its length bucket ``N``: its layers' linear work scales with
  ``N`` and its dense attention with ``N^2``.

So ``t = w . x`` with ``x = (1, T, S, attention_work, N_backward, N_backward^2)`` (ms). The
weights are fitted by ridge least squares to a short profile at start-up and then refined online
by recursive least squares with exponential forgetting (RLS; Haykin, *Adaptive Filter Theory*,
ch. 10) from every measured step, so the model follows the device (clock, thermals, co-tenants).

Pure Python over plain data; no JAX, no NumPy.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from typing import Iterable, Sequence

FEATURES = ("const", "tokens", "seqs", "attention_work", "backward_tokens", "backward_tokens_sq")


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one step computes.

    Attributes:
        num_tokens: the step bucket's token slots ``T`` (0: no forward step ran).
        num_seqs: the bucket's sequence slots ``S``.
        attention_work: ``sum_i q_i * kv_i`` over the step's sequences (query tokens times the KV
            length they attend to; padding excluded).
        backward_tokens: the backward slice's length bucket ``N`` (0: no slice).
    """

    num_tokens: int = 0
    num_seqs: int = 0
    attention_work: int = 0
    backward_tokens: int = 0

    def features(self) -> list[float]:
        """``x`` in :data:`FEATURES` order (scaled to keep the normal equations well conditioned)."""
        fwd = 1.0 if self.num_tokens else 0.0
        n = self.backward_tokens / 1024.0
        return [fwd, self.num_tokens / 1024.0, self.num_seqs / 64.0, self.attention_work / 1e6, n, n * n]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for a small dense system."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-300:
            raise ValueError("singular system")
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col and m[r][col] != 0.0:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


class LatencyModel:
    """Linear step-time model with online refinement.

    Args:
        weights: initial weights (ms per feature unit, :data:`FEATURES` order), default zeros.
        forgetting: RLS forgetting factor in ``(0, 1]`` (1: never forget; 0.98 weights the
            last ~50 steps most).
        prior: initial diagonal of the RLS inverse-covariance (larger: faster first updates).
    """

    def __init__(self, weights: Sequence[float] | None = None, *, forgetting: float = 0.98, prior: float = 1e3):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        d = len(FEATURES)
        self.weights = list(weights) if weights is not None else [0.0] * d
        if len(self.weights) != d:
            raise ValueError(f"need {d} weights ({FEATURES}), got {len(self.weights)}")
        self.forgetting = forgetting
        self.prior = prior
        self._p = [[prior if i == j else 0.0 for j in range(d)] for i in range(d)]
        self.num_updates = 0

    # ---- prediction -----------------------------------------------------------------------
    def predict(self, shape: StepShape) -> float:
        """Predicted step time in ms (never negative)."""
        return max(0.0, sum(w * x for w, x in zip(self.weights, shape.features())))

    # ---- fitting ----------------------------------------------------------------------------
    def fit(self, samples: Iterable[tuple[StepShape, float]], ridge: float = 1e-6) -> "LatencyModel":
        """Least-squares fit to ``(shape, measured ms)`` samples (relative errors weighted equally:
        each row is divided by its measured time). Resets the online state.

        Raises:
            ValueError: no samples.
        """
        rows = [(s.features(), t) for s, t in samples]
        if not rows:
            raise ValueError("no samples to fit")
        d = len(FEATURES)
        ata = [[ridge if i == j else 0.0 for j in range(d)] for i in range(d)]
        atb = [0.0] * d
        for x, t in rows:
            wgt = 1.0 / max(t, 1e-6) ** 2
            for i in range(d):
                atb[i] += wgt * x[i] * t
                for j in range(d):
                    ata[i][j] += wgt * x[i] * x[j]
        self.weights = _solve(ata, atb)
        self._p = [[self.prior if i == j else 0.0 for j in range(d)] for i in range(d)]
        self.num_updates = 0
        return self

    def update(self, shape: StepShape, measured_ms: float) -> None:
        """One RLS step towards a measured step time (ms)."""
        x = shape.features()
        lam, p, d = self.forgetting, self._p, len(x)
        px = [sum(p[i][j] * x[j] for j in range(d)) for i in range(d)]
        denom = lam + sum(x[i] * px[i] for i in range(d))
        gain = [v / denom for v in px]
        err = measured_ms - sum(w * v for w, v in zip(self.weights, x))
        self.weights = [w + g * err for w, g in zip(self.weights, gain)]
        self._p = [[(p[i][j] - gain[i] * px[j]) / lam for j in range(d)] for i in range(d)]
        self.num_updates += 1

    # ---- evaluation and persistence -----------------------------------------------------------
    def median_relative_error(self, samples: Iterable[tuple[StepShape, float]]) -> float:
        """Median of ``|predicted - measured| / measured`` over the samples."""
        errs = [abs(self.predict(s) - t) / t for s, t in samples if t > 0]
        if not errs:
            raise ValueError("no samples with a positive measured time")
        return statistics.median(errs)

    def to_json(self) -> str:
        return json.dumps({"features": list(FEATURES), "weights": self.weights, "forgetting": self.forgetting})

    @classmethod
    def from_json(cls, text: str) -> "LatencyModel":
        """Raises ``ValueError`` for a model of other features."""
        d = json.loads(text)
        if d.get("features") != list(FEATURES):
            raise ValueError(f"latency model of features {d.get('features')}, expected {list(FEATURES)}")
        return cls(d["weights"], forgetting=d.get("forgetting", 0.98))
