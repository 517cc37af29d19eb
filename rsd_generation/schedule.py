"""When the target runs: the RSD loop's scheduler, kept apart from the step math.

Rows move through two phases on their own: drafting (the draft writes a step, the PRM scores it, the row keeps it
or starts waiting) and waiting (for the target to write the step instead). At each tick the scheduler picks which
model runs: the draft over every drafting row, or the target over every waiting row. Waiting rows cost nothing
while they wait (their caches hold no provisional columns), so letting several gather makes each target forward
serve more rows; the draft meanwhile goes on with the rows whose steps were accepted. Which row waits how long
never changes what it computes: under greedy decoding every policy gives every row the tokens it gets alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

POLICIES = ("eager", "throughput")


@dataclass
class Scheduler:
    """Chooses the model of each tick.

    Args:
        policy (`str` or `int`): `"eager"`: the target runs as soon as a row waits (rows move in lockstep, the
            paper's loop); an int k: once k rows wait; `"throughput"`: when the target would commit steps at
            least as fast as the draft, by the measured seconds of each model's ticks and the acceptance rate
            (steps per second: waiting / t_target against accepted share · drafting / t_draft).
        In every policy the target runs when no row is left drafting.
    """

    policy: str | int = "eager"
    seconds: dict = field(default_factory=lambda: {"draft": None, "target": None})  # smoothed seconds per tick
    accepted: float | None = None  # smoothed share of drafted steps kept
    ticks: dict = field(default_factory=lambda: {"draft": 0, "target": 0})

    def __post_init__(self):
        ok = self.policy in POLICIES or (isinstance(self.policy, int) and not isinstance(self.policy, bool))
        if not ok or (isinstance(self.policy, int) and self.policy < 1):
            raise ValueError(
                f"rsd_schedule must be one of {POLICIES} or an int >= 1 (rows that wait), got {self.policy!r}"
            )

    def run_target(self, waiting: int, drafting: int) -> bool:
        """Whether the next tick is the target's (over the `waiting` rows) rather than the draft's."""
        if waiting == 0:
            return False
        if drafting == 0 or self.policy == "eager":
            return True
        if isinstance(self.policy, int):
            return waiting >= self.policy
        t_draft, t_target = self.seconds["draft"], self.seconds["target"]
        if t_draft is None or t_target is None or self.accepted is None:
            return True  # nothing measured yet: as eager, which measures both
        return waiting / t_target >= self.accepted * drafting / t_draft

    def start(self) -> float:
        """A tick begins: its start time."""
        return time.perf_counter()

    def done(self, model: str, started: float, accepted: float | None = None) -> None:
        """A tick of `model` ended (the host has its results, so the device is done); `accepted`: the share of
        drafted steps kept, for a draft tick."""
        self.ticks[model] += 1
        self.seconds[model] = _smooth(self.seconds[model], time.perf_counter() - started)
        if accepted is not None:
            self.accepted = _smooth(self.accepted, accepted)


def _smooth(old: float | None, new: float, weight: float = 0.3) -> float:
    """An exponential moving average (the first value as it is)."""
    return new if old is None else (1 - weight) * old + weight * new
