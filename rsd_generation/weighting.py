"""Weighting functions ω(r) of the paper's Table 1 and the acceptance criterion A_ω (Algorithm 2).

Every function here is pure: a reward tensor in, a tensor of the same shape out.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from functools import partial

import torch

Weighting = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_THRESHOLD = 0.7
DEFAULT_LOGISTIC_ALPHA = 10.0


def constant(r: torch.Tensor, p: float) -> torch.Tensor:
    """ω(r) = p: accept every step with the same probability, whatever its reward."""
    return torch.full_like(r, float(p))


def binary(r: torch.Tensor, delta: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """ω(r) = 1(r ≥ δ), the paper's default and optimal choice (Prop. 2.3)."""
    return (r >= delta).to(r.dtype)


def clip(r: torch.Tensor) -> torch.Tensor:
    """ω(r) = min(1, max(0, r))."""
    return r.clamp(0.0, 1.0)


def sigmoidal(r: torch.Tensor) -> torch.Tensor:
    """ω(r) = max(0, r / (1 + r))."""
    return (r / (1.0 + r)).clamp_min(0.0)


def logistic(r: torch.Tensor, delta: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_LOGISTIC_ALPHA) -> torch.Tensor:
    """ω(r) = 1 / (1 + exp(-α (r - δ)))."""
    return torch.sigmoid(alpha * (r - delta))


WEIGHTINGS = ("binary", "constant", "clip", "sigmoidal", "logistic")


def get_weighting(
    weighting: str | Weighting = "binary", threshold: float = DEFAULT_THRESHOLD, **params: float
) -> Weighting:
    """Resolve `rsd_weighting` (a name of Table 1 or a callable r -> ω in [0, 1]) to a callable.

    `threshold` is δ for "binary" and "logistic" and p for "constant"; `params` may give `alpha` ("logistic")
    or `p` ("constant").
    """
    if not is_real(threshold) or math.isnan(threshold):
        raise ValueError(f"rsd_threshold must be a real number (δ, any value but NaN), got {threshold!r}")
    threshold = float(threshold)
    if callable(weighting):
        if params:
            raise ValueError(f"rsd_weighting_kwargs {sorted(params)} only apply to named weightings, not a callable")
        return _checked(weighting)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown rsd_weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)} or a callable")
    allowed = {"constant": {"p"}, "logistic": {"alpha"}}.get(weighting, set())
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(
            f"rsd_weighting_kwargs {sorted(unknown)} not understood by {weighting!r}; allowed: {sorted(allowed)}"
        )
    if weighting == "constant":
        p = params.get("p", threshold)
        if not is_real(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"constant weighting needs p in [0, 1], got {p!r}")
        return partial(constant, p=float(p))
    if weighting == "binary":
        return partial(binary, delta=threshold)
    if weighting == "logistic":
        alpha = params.get("alpha", DEFAULT_LOGISTIC_ALPHA)
        if not is_real(alpha) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"logistic weighting needs alpha a finite real number > 0, got {alpha!r}")
        if not math.isfinite(threshold):
            raise ValueError(f"logistic weighting needs a finite rsd_threshold, got {threshold!r}")
        return partial(logistic, delta=threshold, alpha=float(alpha))
    return {"clip": clip, "sigmoidal": sigmoidal}[weighting]


class Budget:
    """Binary weighting whose δ is chosen online so that at most a fraction γ of the steps goes to the target.

    Under a budget on target calls the optimal weighting is binary with δ the γ-quantile of the rewards (the paper's
    Proposition 2.3). At each call δ is the γ-quantile of every reward seen so far (this call's included); a step is
    rejected when its reward is below δ and the budget has room: after n steps at most ⌊γ n⌋ are rejected (the
    lowest rewards first within a call), so the realised share never exceeds γ. One budget serves one `generate`
    call: its rows share it, so a row's decisions depend on the others'.

    Args:
        gamma (`float`): the largest share of steps the target may write, in [0, 1].
    """

    def __init__(self, gamma: float):
        if not is_real(gamma) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"rsd_budget must be a share of steps in [0, 1], got {gamma!r}")
        self.gamma = float(gamma)
        self.rewards: list[float] = []
        self.rejected = 0

    @property
    def delta(self) -> float:
        """The current threshold: the γ-quantile of the rewards seen (-inf before any)."""
        if not self.rewards or self.gamma == 0.0:
            return -math.inf
        return float(torch.quantile(torch.tensor(self.rewards, dtype=torch.float64), self.gamma))

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """ω = 0 for the rejected rows, 1 for the others (the state advances: call once per scored batch)."""
        self.rewards += r.tolist()
        room = math.floor(self.gamma * len(self.rewards) + 1e-9) - self.rejected
        below = (r < self.delta).nonzero().flatten()
        reject = below[r[below].argsort(stable=True)][: max(0, room)]
        self.rejected += len(reject)
        omega = torch.ones_like(r)
        omega[reject] = 0.0
        return omega


def is_real(x) -> bool:
    """A real number (Python, NumPy or a 0-d tensor's item), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _checked(weighting: Weighting) -> Weighting:
    """A user's ω, checked at every call: a tensor of r's shape (a scalar would silently apply to every row)."""

    @functools.wraps(weighting)
    def omega(r: torch.Tensor) -> torch.Tensor:
        out = weighting(r)
        if not isinstance(out, torch.Tensor) or out.shape != r.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"an rsd_weighting callable must return one weight per row, a tensor of shape {tuple(r.shape)} "
                f"like its input; got {got}"
            )
        return out

    return omega


def accept(omega: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """Algorithm 2: accept where ω = 1, reject where ω = 0 (or NaN), else accept iff u ≤ ω.

    Args:
        omega (`torch.Tensor` of shape `(R,)`): ω(r) per row, in [0, 1].
        u (`torch.Tensor` of shape `(R,)`, *optional*): U(0, 1) draws; only read where 0 < ω < 1.
    Returns:
        `torch.BoolTensor` of shape `(R,)`.
    """
    sure = omega >= 1.0  # NaN compares False: a NaN weight never accepts
    unsure = (omega > 0.0) & ~sure
    if u is None:
        assert not unsure.any(), "u is required where 0 < ω < 1"
        return sure
    return sure | (unsure & (u <= omega))


def needs_draw(omega: torch.Tensor) -> bool:
    """Whether any row's decision is stochastic (0 < ω < 1), so that u ~ U(0, 1) must be drawn."""
    return bool(((omega > 0.0) & (omega < 1.0)).any())
