"""Bookkeeping of an RSD run: the steps of each row and the compute each model spent."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Step:
    """One reasoning step: a draft candidate (accepted or discarded) or a target rewrite (always kept)."""

    text: str
    n_tokens: int
    source: str  # "draft" or "target"
    reward: float | None  # PRM score of a draft step; None for a target step (the PRM does not score it)
    accepted: bool  # whether the step is part of the output


@dataclass
class RSDStats:
    """Steps per row, and forward positions / parameters per model (`"draft"`, `"target"`, `"reward"`)."""

    steps: list[list[Step]]
    forward_tokens: dict[str, int] = field(default_factory=dict)
    padded_tokens: dict[str, int] = field(default_factory=dict)
    forward_calls: dict[str, int] = field(default_factory=dict)
    row_forward_tokens: dict[str, list[int]] = field(default_factory=dict)  # per model, per row
    num_parameters: dict[str, int] = field(default_factory=dict)
    prm_calls: int = 0
    ticks: dict[str, int] = field(default_factory=dict)  # scheduler ticks per model (a tick writes one step per row)

    def _count(self, row: list[Step], source: str, accepted: bool) -> int:
        """Tokens of the steps of `row` from `source` with the given fate."""
        return sum(s.n_tokens for s in row if s.source == source and s.accepted == accepted)

    def row_totals(self, row: list[Step]) -> dict:
        """Token and step totals of one row."""
        drafted = [s for s in row if s.source == "draft"]
        return {
            "draft_tokens": self._count(row, "draft", True),
            "target_tokens": self._count(row, "target", True),
            "discarded_draft_tokens": self._count(row, "draft", False),
            "draft_steps": len(drafted),
            "accepted_steps": sum(s.accepted for s in drafted),
            "acceptance_rate": sum(s.accepted for s in drafted) / len(drafted) if drafted else 0.0,
        }

    def as_dict(self) -> dict:
        """Plain-dict view: per-row `steps` and `per_row` totals, batch totals, forward tokens and FLOPs."""
        per_row = [self.row_totals(r) for r in self.steps]
        n = self.num_parameters
        for i, row in enumerate(per_row):
            fwd = {k: v[i] for k, v in self.row_forward_tokens.items()}
            gen = {"draft": row["draft_tokens"] + row["discarded_draft_tokens"], "target": row["target_tokens"]}
            gen["reward"] = row["draft_steps"]  # one PRM call per draft step
            row["forward_tokens"] = fwd
            row["flops"] = {k: 2 * n[k] * fwd[k] for k in fwd if k in n}
            row["decode_flops"] = {k: 2 * n[k] * gen[k] for k in gen if k in n}
        counted = ("draft_tokens", "target_tokens", "discarded_draft_tokens", "draft_steps", "accepted_steps")
        totals = {k: sum(r[k] for r in per_row) for k in counted} if per_row else {}
        drafted = totals.get("draft_steps", 0)
        generated = {
            "draft": totals.get("draft_tokens", 0) + totals.get("discarded_draft_tokens", 0),
            "target": totals.get("target_tokens", 0),
            "reward": self.prm_calls,  # the paper counts one PRM call as one token
        }
        return {
            "steps": [[vars(s).copy() for s in r] for r in self.steps],
            "per_row": per_row,
            **totals,
            "acceptance_rate": totals.get("accepted_steps", 0) / drafted if drafted else 0.0,
            "prm_calls": self.prm_calls,
            "forward_tokens": dict(self.forward_tokens),
            "padded_tokens": dict(self.padded_tokens),
            "forward_calls": dict(self.forward_calls),
            "ticks": dict(self.ticks),
            "num_parameters": dict(n),
            "flops": {k: 2 * n[k] * self.forward_tokens[k] for k in n},
            "decode_flops": {k: 2 * n[k] * generated[k] for k in n},
        }
