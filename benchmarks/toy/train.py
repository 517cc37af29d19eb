"""Train the toy models: a small and a large policy on toy solutions, and a small and a large value-head PRM.

Seeded and reproducible. The policies learn from reference solutions (every level, fresh problems each step). Each
PRM is fine-tuned from its own policy (shared ancestry, as Skywork's PRM and Qwen2.5-Math) in the input format
`ValueHeadPRM` scores by default (the RSD reference's), on prefix-correct step labels of the draft's and the
target's sampled solutions, reference solutions, and hard negatives (a reference step's near miss: a nearby wrong
result, a wrong operand, an illegal order); the next-token loss on reference solutions trains alongside, so the PRM
stays a policy and a 0.6/0.4 merge with its policy keeps working. `evaluate` grades the policies greedy on held-out
problems, scores each PRM by ROC-AUC on held-out draft steps and on (correct step, same step with a wrong result)
pairs, and merges each PRM into its policy with `rsd-merge` (Table 4) to grade the merge as policy and as PRM.

    python -m rsd_generation.benchmarks.toy.train [--output benchmarks/toy/models] [--device cuda] [--scale 1.0]
        [--only draft target prm-small prm-large evaluate] [--force]

Each part writes its model (swapped in whole) and `training-<part>.json`; `evaluate` writes `metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import Qwen2Config, Qwen2ForCausalLM

from rsd_generation.paths import replace_dir
from rsd_generation.rewards import ValueHeadPRM, load_reward_model, write_prm_format

from ..io import refuse_overwrite, write_json_atomic
from .task import (
    CORRUPTIONS,
    LEVELS,
    Problem,
    corrupt_step,
    generate_problem,
    is_correct,
    problems,
    split_steps,
    step_labels,
)
from .tokenizer import build_toy_tokenizer

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
LARGE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)
MAX_LEN = 192
PRMS = ("prm-small", "prm-large")
Maker = Callable[[random.Random], Problem]  # draws a problem
PARTS = ("draft", "target", *PRMS, "evaluate")


def new_policy(shapes: dict, vocab: int, eos: int, seed: int) -> Qwen2ForCausalLM:
    """A fresh Qwen2 causal LM of `shapes` (tied embeddings)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        **shapes, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def _batch(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask."""
    width = min(MAX_LEN, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:width]
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids.to(device), mask.to(device)


def _set_lr(opt, base: float, step: int, steps: int, warmup: int) -> None:
    """Linear warm-up, then cosine decay."""
    for g in opt.param_groups:
        g["lr"] = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def _update(opt, params, loss: torch.Tensor) -> float:
    """One optimiser step with gradient clipping at 1; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def train_policy(
    model,
    tok,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    device,
    make: Maker | None = None,
) -> list[float]:
    """Next-token loss on the solution tokens of fresh reference solutions (of problems drawn by `make`, default any
    level); returns the loss curve."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    losses = []
    for step in tqdm(range(steps), desc="policy", mininterval=5):
        _set_lr(opt, lr, step, steps, warmup=100)
        ids, mask, labels = _lm_batch(tok, rng, batch, device, make)
        with _autocast(device):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses.append(_update(opt, model.parameters(), loss))
    return losses[:: max(1, steps // 50)]


def _autocast(device) -> torch.autocast:
    """bf16 autocast on CUDA (weights and optimiser stay float32); a no-op elsewhere."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def any_level(rng: random.Random) -> Problem:
    """A random problem of a random level."""
    return generate_problem(rng, rng.choice(LEVELS))


@torch.no_grad()
def solve(model, tok, probs: list[Problem], device, do_sample: bool = False, batch: int = 1000) -> list[str]:
    """The model's solutions (greedy or sampled at temperature 1), batched with left padding."""
    model.to(device).eval()
    out = []
    for k in range(0, len(probs), batch):
        enc = tok([p.prompt for p in probs[k : k + batch]], return_tensors="pt", padding=True).to(device)
        gen = model.generate(
            **enc, max_new_tokens=MAX_LEN - enc["input_ids"].shape[1], do_sample=do_sample, temperature=1.0,
            top_k=0, top_p=1.0, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


class PRMHead(nn.Module):
    """A policy with Skywork's value head (`v_head.summary`) on its backbone; the policy's LM head stays, so the
    PRM can keep training as a language model (which keeps it mergeable with its policy)."""

    def __init__(self, policy: Qwen2ForCausalLM):
        super().__init__()
        self.policy = policy
        self.backbone = policy.model
        self.v_head = nn.Module()
        self.v_head.summary = nn.Linear(policy.config.hidden_size, 1)

    def forward(self, ids, mask):
        """Reward logits at every position: [B, T]."""
        return self.v_head.summary(self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state).squeeze(-1)

    def input_format(self, tok) -> ValueHeadPRM:
        """The adapter that scores this PRM at inference, in the RSD reference's input format (its default)."""
        return ValueHeadPRM(self.backbone, self.v_head.summary, tok)


def prm_example(fmt: ValueHeadPRM, problem: Problem, steps: list[str], labels: list[bool]) -> tuple[list, list, list]:
    """The ids `fmt` feeds for `steps` of `problem` (the problem as the benchmark states it), the positions whose
    rewards score each step, and the steps' labels."""
    ids = fmt.prefix_ids(problem.question)
    pos = []
    for s in steps:
        ids += fmt.step_ids(s)
        pos.append(len(ids) - 1)
    return ids, pos, [float(x) for x in labels]


def _fits(example: tuple) -> tuple | None:
    """An example cut to MAX_LEN (steps beyond it dropped), or None when no step is left."""
    ids, pos, lab = example
    keep = [i for i, q in enumerate(pos) if q < MAX_LEN]
    return (ids[:MAX_LEN], [pos[i] for i in keep], [lab[i] for i in keep]) if keep else None


def prm_data(fmt: ValueHeadPRM, probs: list[Problem], texts: list[str]) -> list[tuple]:
    """Examples from sampled solutions, with prefix-correct labels."""
    out = []
    for p, t in zip(probs, texts, strict=True):
        steps = split_steps(t)
        if steps and (e := _fits(prm_example(fmt, p, steps, step_labels(p, steps)))):
            out.append(e)
    return out


def hard_negatives(fmt: ValueHeadPRM, probs: list[Problem], rng: random.Random) -> list[tuple]:
    """Per problem, its reference steps up to a random one, then a near miss of that step (`corrupt_step`, a kind
    drawn uniformly): the reference steps labelled correct, the near miss wrong."""
    out = []
    for p in probs:
        ref = split_steps(p.solution())
        k = rng.randrange(len(ref))
        bad = corrupt_step(p, ref[:k], rng, rng.choice(CORRUPTIONS))
        if e := _fits(prm_example(fmt, p, [*ref[:k], bad], [True] * k + [False])):
            out.append(e)
    return out


def pair_examples(fmt: ValueHeadPRM, probs: list[Problem], rng: random.Random) -> list[tuple]:
    """Two examples per problem, only their last step scored: a correct reference step after the ones before it,
    then the same step with a nearby wrong result."""
    out = []
    for p in probs:
        ref = split_steps(p.solution())
        k = rng.randrange(len(ref))
        for step, ok in ((ref[k], True), (corrupt_step(p, ref[:k], rng, "result"), False)):
            ids, pos, _ = prm_example(fmt, p, [*ref[:k], step], [True] * (k + 1))
            out.append((ids, pos[-1:], [float(ok)]))
    return out


def pair_accuracy(scores: torch.Tensor) -> float:
    """Share of (correct, wrong) pairs, laid out alternately, where the correct step scores higher (ties half)."""
    right, wrong = scores[0::2], scores[1::2]
    return float(((right > wrong).float() + 0.5 * (right == wrong).float()).mean())


def _prm_batch(examples, pad, device):
    """Ids, mask, and label/position tensors of a PRM batch."""
    ids, mask = _batch([e[0] for e in examples], pad, device)
    target = torch.full(ids.shape, -1.0, device=device)
    for i, (_, pos, lab) in enumerate(examples):
        target[i, pos] = torch.tensor(lab, device=device)
    return ids, mask, target


def _lm_batch(
    tok, rng: random.Random, n: int, device, make: Maker | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, mask and labels of `n` fresh reference solutions of problems drawn by `make` (default: any level); the
    loss is on the solution tokens only."""
    eos = tok.eos_token_id
    probs = [(make or any_level)(rng) for _ in range(n)]
    prompts = tok([p.prompt for p in probs], add_special_tokens=False)["input_ids"]
    sols = tok([p.solution() for p in probs], add_special_tokens=False)["input_ids"]
    ids, mask = _batch([pr + sol + [eos] for pr, sol in zip(prompts, sols, strict=True)], eos, device)
    labels = ids.masked_fill(mask == 0, -100)
    for i, pr in enumerate(prompts):
        labels[i, : len(pr)] = -100
    return ids, mask, labels


def train_prm(
    prm: PRMHead,
    tok,
    data: list[tuple],
    valid: list[tuple],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    device,
    lm_weight: float = 1.0,
) -> tuple[dict, list[float]]:
    """BCE on the step-token rewards plus `lm_weight` times the next-token loss on fresh reference solutions (half a
    batch), keeping the weights of the best validation ROC-AUC (checked every 250 steps); returns the loss curves and
    the validation AUCs."""
    prm.to(device).train()
    opt = torch.optim.AdamW(prm.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    curves: dict[str, list[float]] = {"bce": [], "lm": []}
    aucs, best = [], None
    for step in tqdm(range(steps), desc="prm", mininterval=5):
        _set_lr(opt, lr, step, steps, warmup=50)
        ids, mask, target = _prm_batch(rng.sample(data, min(batch, len(data))), tok.eos_token_id, device)
        lm_ids, lm_mask, lm_labels = _lm_batch(tok, rng, batch // 2, device)
        with _autocast(device):
            logits = prm(ids, mask).float()
            lm = prm.policy(input_ids=lm_ids, attention_mask=lm_mask, labels=lm_labels).loss
        sel = target >= 0
        bce = F.binary_cross_entropy_with_logits(logits[sel], target[sel])
        _update(opt, prm.parameters(), bce + lm_weight * lm)
        curves["bce"].append(float(bce.detach()))
        curves["lm"].append(float(lm.detach()))
        if (step + 1) % 250 == 0 or step + 1 == steps:
            aucs.append(roc_auc(*prm_scores(prm, valid, tok.eos_token_id, device)))
            if best is None or aucs[-1] > max(aucs[:-1]):
                best = {k: v.detach().clone() for k, v in prm.state_dict().items()}
            prm.train()
    prm.load_state_dict(best)
    return {k: v[:: max(1, steps // 50)] for k, v in curves.items()}, aucs


@torch.no_grad()
def prm_scores(prm: PRMHead | ValueHeadPRM, data: list[tuple], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards and labels of every labelled step of `data`, in order (a loaded `ValueHeadPRM` or a `PRMHead`)."""
    if isinstance(prm, ValueHeadPRM):
        backbone, head = prm.backbone, prm.head
        prm = lambda ids, mask: head(backbone(input_ids=ids, attention_mask=mask).last_hidden_state).squeeze(-1)
    else:
        prm.to(device).eval()
    scores, labels = [], []
    for k in range(0, len(data), 256):
        ids, mask, target = _prm_batch(data[k : k + 256], pad, device)
        r = torch.sigmoid(prm(ids, mask).float())
        sel = target >= 0
        scores.append(r[sel].cpu())
        labels.append(target[sel].cpu())
    return torch.cat(scores), torch.cat(labels)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC-AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().sum() + 0.5 * (pos[:, None] == neg[None, :]).float().sum()
    return float(greater / (len(pos) * len(neg)))


def save_policy(model: Qwen2ForCausalLM, tok, path: Path) -> None:
    """bf16 safetensors, config, generation config, tokenizer."""
    model.to("cpu", torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    model.float()


def save_prm(prm: PRMHead, tok, path: Path) -> None:
    """Skywork's layout: the backbone as a Qwen2 causal LM plus `v_head.summary.*`, architecture Qwen2ForPrmModel,
    and the input format it was trained in (`rsd_prm_format.json`)."""
    save_policy(prm.policy, tok, path)
    weights = load_file(path / "model.safetensors")
    for k, v in prm.v_head.summary.state_dict().items():
        weights[f"v_head.summary.{k}"] = v.detach().to("cpu", torch.bfloat16).contiguous()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForPrmModel"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    fmt = prm.input_format(tok).input_format
    write_prm_format(path, fmt["step_token"], fmt["strip_steps"])


def accuracy(probs: list[Problem], texts: list[str]) -> dict:
    """Overall and per-level accuracy."""
    ok = [is_correct(p, t) for p, t in zip(probs, texts, strict=True)]
    per = {lv: [o for o, p in zip(ok, probs, strict=True) if p.level == lv] for lv in LEVELS}
    return {"overall": sum(ok) / len(ok), "per_level": {lv: sum(v) / len(v) for lv, v in per.items() if v}}


def _save_dir(out: Path, name: str, save) -> None:
    """Write a checkpoint with `save(tmp)` into a fresh folder beside `out/name`, then swap it in whole."""
    tmp = out / f".{name}.tmp-{os.getpid()}"
    save(tmp)
    replace_dir(tmp, out / name)


def _load_policy(out: Path, name: str) -> Qwen2ForCausalLM:
    """A saved policy, float32."""
    if not (out / name / "config.json").exists():
        raise SystemExit(f"error: {out / name} has no trained {name}; train it first (--only {name})")
    return Qwen2ForCausalLM.from_pretrained(out / name, dtype=torch.float32)


def _policy_part(name: str, out: Path, tok, n, seed: int, dev) -> dict:
    """Train and save one policy; returns its record."""
    shapes, steps, lr, s = (SMALL, n(3000), 3e-3, 1) if name == "draft" else (LARGE, n(4000), 1e-3, 2)
    model = new_policy(shapes, len(tok), tok.eos_token_id, seed + s)
    curve = train_policy(model, tok, steps, 256, lr, seed + s + 2, dev)
    _save_dir(out, name, lambda path: save_policy(model, tok, path))
    return {"loss": curve, "steps": steps, "lr": lr, "shapes": shapes}


def _prm_part(name: str, out: Path, tok, n, seed: int, dev, gen_batch: int) -> dict:
    """Build the PRM data (the draft's and the target's samples, reference solutions, hard negatives), train the
    PRM from its policy, save it; returns its record."""
    draft, target = _load_policy(out, "draft"), _load_policy(out, "target")
    policy = draft if name == "prm-small" else target
    base = new_policy(SMALL if policy is draft else LARGE, len(tok), tok.eos_token_id, 0)
    base.load_state_dict(policy.state_dict())
    prm = PRMHead(base)
    fmt = prm.input_format(tok)
    rng = random.Random(seed + 7)
    sources = {}
    probs = problems(2 * 10**6 + seed, n(40000))
    sources["draft_samples"] = prm_data(fmt, probs, solve(draft, tok, probs, dev, do_sample=True, batch=gen_batch))
    probs = problems(4 * 10**6 + seed, n(10000))
    sources["target_samples"] = prm_data(fmt, probs, solve(target, tok, probs, dev, do_sample=True, batch=gen_batch))
    probs = problems(5 * 10**6 + seed, n(5000))
    sources["reference"] = prm_data(fmt, probs, [p.solution() for p in probs])
    sources["hard_negatives"] = hard_negatives(fmt, problems(6 * 10**6 + seed, n(30000)), rng)
    data = [e for v in sources.values() for e in v]
    valid_probs = problems(3 * 10**6 + seed, 1000)  # early stopping; disjoint from the held-out set
    valid = prm_data(fmt, valid_probs, solve(draft, tok, valid_probs, dev, do_sample=True, batch=gen_batch))
    steps, lr = n(3000), (1e-3 if name == "prm-small" else 3e-4)
    curves, valid_auc = train_prm(prm, tok, data, valid, steps, 128, lr, seed + 5, dev)
    _save_dir(out, name, lambda path: save_prm(prm, tok, path))
    labels = {k: [x for e in v for x in e[2]] for k, v in sources.items()}
    return {
        "curves": curves, "valid_auc_every_250": valid_auc, "steps": steps, "lr": lr, "lm_weight": 1.0,
        "data": {k: {"steps": len(v), "positive_share": sum(v) / max(1, len(v))} for k, v in labels.items()},
        "input_format": fmt.input_format,
    }  # fmt: skip


def _evaluate(out: Path, tok, seed: int, dev, gen_batch: int) -> dict:
    """Greedy accuracy of the policies, each PRM's ROC-AUC on held-out draft steps and its pair accuracy, and both
    of the Table 4 merges (`rsd-merge`, 0.6 policy / 0.4 PRM) as policies and as PRMs."""
    from rsd_generation.merging import merge_prm_with_policy

    held_out = problems(10**6 + seed, 500)
    policies = {name: _load_policy(out, name) for name in ("draft", "target")}
    draft = policies["draft"]
    samples = prm_data(PRMHead(draft).input_format(tok), held_out, solve(draft, tok, held_out, dev, True, gen_batch))
    metrics: dict = {}
    for name, policy in policies.items():
        metrics[name] = accuracy(held_out, solve(policy, tok, held_out, dev, batch=gen_batch))
        print(name, metrics[name], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for prm_name, policy in (("prm-small", "draft"), ("prm-large", "target")):
            merged = Path(tmp) / f"{policy}-merged"
            merge_prm_with_policy(out / policy, out / prm_name, merged)
            for label, path in ((prm_name, out / prm_name), (f"{policy}*", merged)):
                prm = load_reward_model(path, dtype=torch.float32, device_map=str(dev))
                pairs = pair_examples(prm, held_out, random.Random(seed + 11))
                scores = prm_scores(prm, pairs, tok.eos_token_id, dev)[0].view(-1, 2)  # a row per problem
                levels = torch.tensor([p.level for p in held_out])
                m = {
                    "auc": roc_auc(*prm_scores(prm, samples, tok.eos_token_id, dev)),
                    "pair_accuracy": pair_accuracy(scores.flatten()),
                    "pair_accuracy_per_level": {lv: pair_accuracy(scores[levels == lv].flatten()) for lv in LEVELS},
                    "eval_steps": sum(len(e[2]) for e in samples), "pairs": len(pairs) // 2,
                }  # fmt: skip
                if label.endswith("*"):
                    model = Qwen2ForCausalLM.from_pretrained(merged, dtype=torch.float32)
                    m["policy"] = accuracy(held_out, solve(model, tok, held_out, dev, batch=gen_batch))
                metrics[label] = m
                print(label, m, flush=True)
    metrics["parameters"] = {k: p.num_parameters() for k, p in policies.items()}
    metrics["checkpoint_bytes"] = {
        k: sum(f.stat().st_size for f in (out / k).rglob("*.safetensors")) for k in ("draft", "target", *PRMS)
    }
    return metrics


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="benchmarks/toy/models")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every step count (0.01 to check on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--only", nargs="+", choices=PARTS, default=list(PARTS),
        help="the parts to run (default: all, in order); the PRMs need both policies saved, evaluate needs all four "
        "models; parts given to separate processes may run at once",
    )  # fmt: skip
    ap.add_argument("--force", action="store_true", help="replace models and records that exist")
    args = ap.parse_args(argv)
    out = Path(args.output)
    parts = [p for p in PARTS if p in args.only]
    for p in parts:  # refuse before anything runs
        refuse_overwrite(out / (p if p != "evaluate" else "metrics.json"), args.force)
        refuse_overwrite(out / f"training-{p}.json", args.force)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    gen_batch = 2000 if dev.type == "cuda" else 250
    tok = build_toy_tokenizer()
    n = lambda k: max(2, int(k * args.scale))
    env = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": " ".join(
            ["python -m rsd_generation.benchmarks.toy.train", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    results = {}
    for part in parts:
        t0 = time.time()
        if part in ("draft", "target"):
            record = _policy_part(part, out, tok, n, args.seed, dev)
        elif part in PRMS:
            record = _prm_part(part, out, tok, n, args.seed, dev, gen_batch)
        else:
            record = _evaluate(out, tok, args.seed, dev, gen_batch)
        record = {part if part == "evaluate" else "training": record, "seconds": time.time() - t0, **env}
        write_json_atomic(out / ("metrics.json" if part == "evaluate" else f"training-{part}.json"), record)
        results[part] = record
    return results


if __name__ == "__main__":
    main()
