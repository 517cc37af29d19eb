"""Summaries of per-question records: the summary rows, a Markdown table and the paper-style plots."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path

from .methods import MODELS


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict], order: list[str] | None = None) -> list[dict]:
    """One row per setting: accuracy (overall and per level), mean FLOPs per question in both accountings (per model,
    total, and as a ratio to the `target` row over the same questions), wall-clock, tokens/s, acceptance rate and
    the share of questions the draft solved alone. A (setting, id) recorded twice counts once (the first record),
    with a warning."""
    by: dict[str, list[dict]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for r in records:
        if (r["setting"], r["id"]) not in seen:
            seen.add((r["setting"], r["id"]))
            by[r["setting"]].append(r)
    if len(seen) < len(records):
        warnings.warn(
            f"{len(records) - len(seen)} duplicate record(s) of a (setting, id) already recorded: each question is "
            "counted once per setting (its first record)",
            stacklevel=2,
        )
    target = {r["id"]: r for r in by.get("target|target", [])}
    rows = []
    for key in order or list(by):
        recs = by.get(key)
        if not recs:
            continue
        row: dict = {"method": recs[0]["method"], "setting": key.split("|", 1)[1], "n": len(recs)}
        row["accuracy"] = _mean([float(r["correct"]) for r in recs])
        levels = sorted({r["level"] for r in recs if r.get("level") is not None})
        row["accuracy_per_level"] = {
            str(lv): _mean([float(r["correct"]) for r in recs if r.get("level") == lv]) for lv in levels
        }
        for acc in ("flops", "decode_flops"):
            per_model = {m: _mean([r[acc].get(m, 0) for r in recs]) for m in MODELS if any(m in r[acc] for r in recs)}
            row[f"{acc}_per_model"] = per_model
            row[acc] = sum(per_model.values())
            same = [r for r in recs if r["id"] in target]
            ours = sum(sum(r[acc].values()) for r in same)
            base = sum(sum(target[r["id"]][acc].values()) for r in same)
            row[f"{acc}_vs_target"] = ours / base if same and base else None
        row["wall_s"] = sum(r["wall_s"] for r in recs)
        tokens = sum(r["new_tokens"] for r in recs)
        row["tokens_per_s"] = tokens / row["wall_s"] if row["wall_s"] else None
        drafted = sum(r.get("draft_steps", 0) for r in recs)
        is_rsd = any("draft_steps" in r for r in recs)
        row["acceptance_rate"] = sum(r.get("accepted_steps", 0) for r in recs) / drafted if is_rsd and drafted else None
        row["draft_only_share"] = _mean([float(r["draft_only"]) for r in recs]) if is_rsd else None
        row["draft_only_share_per_level"] = (
            {str(lv): _mean([float(r["draft_only"]) for r in recs if r.get("level") == lv]) for lv in levels}
            if is_rsd
            else None
        )
        rows.append(row)
    return rows


def _fmt(x, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def markdown(rows: list[dict]) -> str:
    """The summary as a Markdown table (accuracy in %, FLOPs as ratios to target only)."""
    head = (
        "| method | setting | n | accuracy % | decode FLOPs vs target | all-positions FLOPs vs target "
        "| acceptance | draft-only share | wall s | tokens/s |"
    )
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['n']} | {_fmt(100 * r['accuracy'], '.1f')} "
            f"| {_fmt(r['decode_flops_vs_target'], '.2f')} | {_fmt(r['flops_vs_target'], '.2f')} "
            f"| {_fmt(r['acceptance_rate'], '.2f')} | {_fmt(r['draft_only_share'], '.2f')} "
            f"| {_fmt(r['wall_s'], '.1f')} | {_fmt(r['tokens_per_s'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], rewards: dict | None, out: Path) -> list[Path]:
    """Fig. 4 (FLOPs vs accuracy, both accountings), Fig. 5 (δ sweep: accuracy and draft-only share), Fig. 6
    (weighting functions) and, given step rewards, Fig. 3 (PRM rewards of draft and target steps); PNGs in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, acc in zip(axes, ("decode_flops_vs_target", "flops_vs_target"), strict=True):
        for r in rows:
            if r[acc] is None:
                continue
            ax.scatter(r[acc], 100 * r["accuracy"], s=18)
            ax.annotate(r["setting"], (r[acc], 100 * r["accuracy"]), fontsize=6, alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"{acc.replace('_vs_target', '')} / target only (log)")
        ax.set_ylabel("accuracy %")
        ax.grid(alpha=0.3)
    fig.suptitle("Fig. 4: compute against accuracy")
    paths.append(_save(fig, out / "fig4_flops_accuracy.png"))

    sweeps = defaultdict(list)
    for r in rows:
        if r["method"] == "rsd" and r["setting"].startswith("binary "):
            prm = r["setting"].split("prm=")[-1]
            sweeps[prm].append((float(r["setting"].split("δ=")[1].split()[0]), r))
    if sweeps:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for prm, pts in sweeps.items():
            pts.sort(key=lambda x: x[0])
            axes[0].plot([d for d, _ in pts], [100 * r["accuracy"] for _, r in pts], "o-", label=f"RSD, PRM {prm}")
            axes[1].plot([d for d, _ in pts], [r["draft_only_share"] for _, r in pts], "o-", label=f"PRM {prm}")
        for r in rows:
            if r["method"] in ("target", "draft"):
                axes[0].axhline(100 * r["accuracy"], ls="--", lw=1, color="k" if r["method"] == "target" else "gray")
                axes[0].text(0, 100 * r["accuracy"], r["method"], fontsize=7)
        axes[0].set(xlabel="δ", ylabel="accuracy %")
        axes[1].set(xlabel="δ", ylabel="share of questions solved by the draft alone")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("Fig. 5: threshold sweep")
        paths.append(_save(fig, out / "fig5_delta_sweep.png"))

    weighted = [r for r in rows if r["method"] == "rsd" and not r["setting"].startswith("merged")]
    if weighted:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in weighted:
            name = r["setting"].split()[0]
            ax.scatter(r["decode_flops_vs_target"] or 0, 100 * r["accuracy"], s=22, label=name)
            ax.annotate(r["setting"], (r["decode_flops_vs_target"] or 0, 100 * r["accuracy"]), fontsize=6)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.set(xlabel="decode FLOPs / target only", ylabel="accuracy %", title="Fig. 6: weighting functions")
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / "fig6_weightings.png"))

    if rewards:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, values in rewards.items():
            ax.hist(values, bins=30, range=(0, 1), alpha=0.5, density=True, label=f"{name} steps (n={len(values)})")
        ax.set(xlabel="PRM reward", ylabel="density", title="Fig. 3: PRM rewards of draft-only and target-only steps")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / "fig3_rewards.png"))
    return paths


def _save(fig, path: Path) -> Path:
    """Write a figure (temp file, then rename) and close it."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
