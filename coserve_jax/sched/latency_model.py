"""Step latency model: predicts a step's device time from its composition.

The hybrid scheduler sizes each step's prefill chunks and finetuning work so that the predicted
step time keeps running requests inside their TPOT SLO. What a step costs depends on what the
device computes, which is the *padded* shape:

* the fused step runs a bucket of ``T`` token slots and ``S`` sequence slots (linear layers and
  LM head scale with ``T`` and ``S``), plus attention, whose work is ``sum_i q_i * kv_i`` over
  the sequences (a decode token reads its whole KV; a prefill chunk of ``q`` tokens reads up to
  ``q * kv``);
* a finetuning backward runs ``l`` layers on its length bucket ``N``: each layer's linear work
  scales with ``N`` and its dense attention with ``N^2``.

* the loss head runs on a step's weighted finetuning tokens, padded to a power of two ``h``
  (``4 h H V`` FLOPs: on a small model with a large vocabulary the largest part of a step).

So ``t = w . x`` with ``x = (1, T, S, attention_work, l N_backward, l N_backward^2, h)`` (ms). The
weights are fitted by non-negative least squares to a short profile at start-up; measured steps
then refine two multiplicative corrections (a global one and one per padded shape, exponential
moving averages), so the model follows the device (clock, thermals, co-tenants) and each
bucket's quirks without the linear weights ever drifting.

Pure Python over plain data; no JAX, no NumPy.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import statistics
from typing import Iterable, Sequence

FEATURES = ("const", "tokens", "seqs", "attention_work", "backward_layer_tokens", "backward_layer_tokens_sq", "head_tokens")


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one step computes.

    Attributes:
        num_tokens: the step bucket's token slots ``T`` (0: no forward step ran).
        num_seqs: the bucket's sequence slots ``S``.
        attention_work: ``sum_i q_i * kv_i`` over the step's sequences (query tokens times the KV
            length they attend to; padding excluded).
        backward_tokens: the backward's length bucket ``N`` (0: no backward).
        backward_layers: the layers the backward runs (``l``).
        head_tokens: the loss head's size ``h`` (0: no head), :func:`head_tokens` of the step's
            weighted finetuning tokens.
    """

    num_tokens: int = 0
    num_seqs: int = 0
    attention_work: int = 0
    backward_tokens: int = 0
    backward_layers: int = 1
    head_tokens: int = 0

    def features(self) -> list[float]:
        """``x`` in :data:`FEATURES` order (scaled to keep the normal equations well conditioned)."""
        fwd = 1.0 if self.num_tokens else 0.0
        n = self.backward_tokens / 1024.0
        layers = self.backward_layers
        return [fwd, self.num_tokens / 1024.0, self.num_seqs / 64.0, self.attention_work / 1e6, layers * n, layers * n * n,
                self.head_tokens / 1024.0]


def head_tokens(n: int) -> int:
    """The loss head's size for ``n`` weighted finetuning tokens: 0 for none, else the next power
    of two from 16 (the engine's head sizes, but for its largest, the step's finetuning slots)."""
    if n <= 0:
        return 0
    size = 16
    while size < n:
        size *= 2
    return size


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

    ``predict(x) = max(0, w . x) * g * l[key(x)]``: the linear part ``w`` comes from the start-up
    profile (:meth:`fit`; non-negative least squares, so no feature ever makes a step cheaper);
    the online part follows the device with two ratios learned from measured steps
    (:meth:`update`): a global one ``g`` (the device got slower or faster) and one per padded
    shape ``l[key]``, ``key = (T, S, N_backward)`` (what the linear form misses about one
    bucket). Both are exponential moving averages of measured / predicted time, which stay
    stable under long runs of identical steps (where recursive least squares with forgetting
    winds up its covariance and then jumps).

    Args:
        weights: the linear weights (ms per feature unit, :data:`FEATURES` order), default zeros.
        forgetting: EMA factor of the global ratio in ``(0, 1]`` (the last ``1 / (1 - f)`` steps
            weigh most; 1: no online refinement).
        shape_rate: EMA rate of the per-shape ratios in ``[0, 1)``.
    """

    def __init__(self, weights: Sequence[float] | None = None, *, forgetting: float = 0.98, shape_rate: float = 0.1):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        if not 0.0 <= shape_rate < 1.0:
            raise ValueError(f"shape_rate must be in [0, 1), got {shape_rate}")
        d = len(FEATURES)
        self.weights = list(weights) if weights is not None else [0.0] * d
        if len(self.weights) != d:
            raise ValueError(f"need {d} weights ({FEATURES}), got {len(self.weights)}")
        self.forgetting = forgetting
        self.shape_rate = shape_rate
        self.global_ratio = 1.0
        self.shape_ratio: dict[tuple[int, int, int], float] = {}
        self.num_updates = 0
        self.host_ms = 0.0
        """The host's time between two steps (ms; an exponential moving average, :meth:`update_host`):
        what a request waits per token besides the device's step."""
        self._errors: collections.deque[float] = collections.deque(maxlen=256)  # measured / predicted, recent steps

    @staticmethod
    def _key(shape: StepShape) -> tuple[int, int, int]:
        return (shape.num_tokens, shape.num_seqs, shape.backward_tokens)

    def backward_layers_within(self, shape: StepShape, target_ms: float, max_layers: int) -> int:
        """The most backward layers (``0 .. max_layers``) that keep ``shape`` (its other work as
        given) within ``target_ms``, by :meth:`predict` (which grows with the layers)."""
        lo, hi = 0, max_layers
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(dataclasses.replace(shape, backward_layers=mid)) <= target_ms:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # ---- prediction -----------------------------------------------------------------------
    def base(self, shape: StepShape) -> float:
        """The profile's linear prediction (ms, never negative), before the online ratios."""
        return max(0.0, sum(w * x for w, x in zip(self.weights, shape.features())))

    def predict(self, shape: StepShape) -> float:
        """Predicted step time in ms (never negative)."""
        return self.base(shape) * self.global_ratio * self.shape_ratio.get(self._key(shape), 1.0)

    # ---- fitting ----------------------------------------------------------------------------
    def fit(self, samples: Iterable[tuple[StepShape, float]], ridge: float = 1e-6) -> "LatencyModel":
        """Non-negative least-squares fit to ``(shape, measured ms)`` samples (relative errors
        weighted equally: each row is divided by its measured time); an active-set loop drops
        the most negative weight and refits until none is negative. Resets the online state.

        Raises:
            ValueError: no samples.
        """
        rows = [(s.features(), t) for s, t in samples]
        if not rows:
            raise ValueError("no samples to fit")
        d = len(FEATURES)
        active = list(range(d))
        while True:
            ata = [[ridge if i == j else 0.0 for j in active] for i in active]
            atb = [0.0] * len(active)
            for x, t in rows:
                wgt = 1.0 / max(t, 1e-6) ** 2
                for a, i in enumerate(active):
                    atb[a] += wgt * x[i] * t
                    for b, j in enumerate(active):
                        ata[a][b] += wgt * x[i] * x[j]
            sol = _solve(ata, atb)
            worst = min(range(len(active)), key=lambda a: sol[a])
            if sol[worst] >= 0.0 or len(active) == 1:
                break
            active.pop(worst)
        self.weights = [0.0] * d
        for a, i in enumerate(active):
            self.weights[i] = max(sol[a], 0.0)
        self.global_ratio, self.shape_ratio, self.num_updates = 1.0, {}, 0
        return self

    def update_host(self, host_ms: float, rate: float = 0.1) -> None:
        """Learn the host's time between two consecutive steps (ms, from one observation)."""
        self.host_ms += rate * (max(host_ms, 0.0) - self.host_ms)

    def error_quantile(self, q: float = 0.9) -> float:
        """The ``q`` quantile of measured / predicted over the last 256 updates (1 before any):
        a plan made to ``target / error_quantile(q)`` meets ``target`` in about ``q`` of the steps."""
        if len(self._errors) < 16:
            return 1.0
        errs = sorted(self._errors)
        return max(1.0, errs[min(len(errs) - 1, int(q * len(errs)))])

    def update(self, shape: StepShape, measured_ms: float) -> None:
        """Learn from one measured step (ms): move the global ratio and the shape's ratio
        towards measured / predicted (ratios kept within [1/4, 4]), and keep the step's
        measured / predicted for :meth:`error_quantile`."""
        self.num_updates += 1
        base = self.base(shape)
        if base <= 0.0 or measured_ms <= 0.0:
            return
        predicted = self.predict(shape)
        if predicted > 0.0:
            self._errors.append(measured_ms / predicted)
        key = self._key(shape)
        local = self.shape_ratio.get(key, 1.0)
        a = 1.0 - self.forgetting
        self.global_ratio = min(4.0, max(0.25, self.global_ratio + a * (measured_ms / (base * local) - self.global_ratio)))
        target = measured_ms / (base * self.global_ratio)
        self.shape_ratio[key] = min(4.0, max(0.25, local + self.shape_rate * (target - local)))

    # ---- evaluation and persistence -----------------------------------------------------------
    def median_relative_error(self, samples: Iterable[tuple[StepShape, float]]) -> float:
        """Median of ``|predicted - measured| / measured`` over the samples."""
        errs = [abs(self.predict(s) - t) / t for s, t in samples if t > 0]
        if not errs:
            raise ValueError("no samples with a positive measured time")
        return statistics.median(errs)

    def to_json(self) -> str:
        """The fitted weights and settings (the online ratios are not kept: a restart refits them)."""
        return json.dumps({"features": list(FEATURES), "weights": self.weights, "forgetting": self.forgetting,
                           "shape_rate": self.shape_rate})

    @classmethod
    def from_json(cls, text: str) -> "LatencyModel":
        """Raises ``ValueError`` for a model of other features."""
        d = json.loads(text)
        if d.get("features") != list(FEATURES):
            raise ValueError(f"latency model of features {d.get('features')}, expected {list(FEATURES)}")
        return cls(d["weights"], forgetting=d.get("forgetting", 0.98), shape_rate=d.get("shape_rate", 0.1))
