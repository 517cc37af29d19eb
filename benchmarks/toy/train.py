"""Train the toy models: a small and a large policy on toy solutions, and a small and a large value-head PRM.

Seeded and reproducible. The policies learn from reference solutions (every level, fresh problems each step); each
PRM is fine-tuned from its own policy (shared ancestry, as Skywork's PRM and Qwen2.5-Math) on the draft's sampled
solutions, with prefix-correct step labels, in Skywork's input layout. Then both policies are graded greedy on
held-out problems and both PRMs are scored by ROC-AUC on held-out draft steps; the metrics go to metrics.json.

    python -m rsd_generation.benchmarks.toy.train [--output benchmarks/toy/models] [--device cuda] [--scale 1.0]
        [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import Qwen2Config, Qwen2ForCausalLM

from rsd_generation.rewards import write_prm_format

from ..io import refuse_overwrite, write_json_atomic
from .task import LEVELS, Problem, is_correct, problems, split_steps, step_labels
from .tokenizer import build_toy_tokenizer

SMALL = dict(hidden_size=96, intermediate_size=288, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
LARGE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)
MAX_LEN = 192


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


def train_policy(model, tok, steps: int, batch: int, lr: float, seed: int, device) -> list[float]:
    """Next-token loss on the solution tokens of fresh reference solutions; returns the loss curve."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    eos = tok.eos_token_id
    losses = []
    for step in tqdm(range(steps), desc="policy", mininterval=5):
        _set_lr(opt, lr, step, steps, warmup=100)
        probs = [Problem(*_sample_fields(rng)) for _ in range(batch)]
        prompts = tok([p.prompt for p in probs], add_special_tokens=False)["input_ids"]
        sols = tok([p.solution() for p in probs], add_special_tokens=False)["input_ids"]
        seqs = [pr + sol + [eos] for pr, sol in zip(prompts, sols, strict=True)]
        ids, mask = _batch(seqs, eos, device)
        labels = ids.masked_fill(mask == 0, -100)
        for i, pr in enumerate(prompts):
            labels[i, : len(pr)] = -100
        with _autocast(device):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses.append(_update(opt, model.parameters(), loss))
    return losses[:: max(1, steps // 50)]


def _autocast(device) -> torch.autocast:
    """bf16 autocast on CUDA (weights and optimiser stay float32); a no-op elsewhere."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sample_fields(rng: random.Random) -> tuple:
    """A random problem's fields (any level)."""
    from .task import generate_problem

    p = generate_problem(rng, rng.choice(LEVELS))
    return p.numbers, p.ops, p.level


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
    """A policy's backbone with Skywork's value head (`v_head.summary`)."""

    def __init__(self, policy: Qwen2ForCausalLM):
        super().__init__()
        self.backbone = policy.model
        self.v_head = nn.Module()
        self.v_head.summary = nn.Linear(policy.config.hidden_size, 1)

    def forward(self, ids, mask):
        """Reward logits at every position: [B, T]."""
        return self.v_head.summary(self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state).squeeze(-1)


def prm_example(tok, problem: Problem, steps: list[str], labels: list[bool]) -> tuple[list, list, list]:
    """Skywork's layout (prompt + "\\n", then each stripped step and the "\\n" token), the step-token positions
    and their labels."""
    nl = tok.encode("\n", add_special_tokens=False)[-1]
    ids = tok.encode(problem.prompt + "\n", add_special_tokens=False)
    pos = []
    for s in steps:
        ids += [*tok.encode(s.strip(), add_special_tokens=False), nl]
        pos.append(len(ids) - 1)
    return ids, pos, [float(x) for x in labels]


def prm_data(tok, probs: list[Problem], texts: list[str]) -> list[tuple]:
    """Examples from sampled solutions (steps beyond MAX_LEN dropped)."""
    out = []
    for p, t in zip(probs, texts, strict=True):
        steps = split_steps(t)
        if not steps:
            continue
        ids, pos, lab = prm_example(tok, p, steps, step_labels(p, steps))
        keep = [i for i, q in enumerate(pos) if q < MAX_LEN]
        if keep:
            out.append((ids[:MAX_LEN], [pos[i] for i in keep], [lab[i] for i in keep]))
    return out


def _prm_batch(examples, pad, device):
    """Ids, mask, and label/position tensors of a PRM batch."""
    ids, mask = _batch([e[0] for e in examples], pad, device)
    target = torch.full(ids.shape, -1.0, device=device)
    for i, (_, pos, lab) in enumerate(examples):
        target[i, pos] = torch.tensor(lab, device=device)
    return ids, mask, target


def train_prm(
    prm: PRMHead, data: list[tuple], valid: list[tuple], pad: int, steps: int, batch: int, lr: float, seed: int, device
) -> tuple[list[float], list[float]]:
    """BCE on the step-token rewards, keeping the weights of the best validation ROC-AUC (checked every 250 steps,
    the large PRM overfits its training samples otherwise); returns the loss curve and the validation AUCs."""
    prm.to(device).train()
    opt = torch.optim.AdamW(prm.parameters(), lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    losses, aucs, best = [], [], None
    for step in tqdm(range(steps), desc="prm", mininterval=5):
        _set_lr(opt, lr, step, steps, warmup=50)
        ids, mask, target = _prm_batch(rng.sample(data, min(batch, len(data))), pad, device)
        with _autocast(device):
            logits = prm(ids, mask).float()
        sel = target >= 0
        losses.append(_update(opt, prm.parameters(), F.binary_cross_entropy_with_logits(logits[sel], target[sel])))
        if (step + 1) % 250 == 0 or step + 1 == steps:
            aucs.append(roc_auc(*prm_scores(prm, valid, pad, device)))
            if best is None or aucs[-1] > max(aucs[:-1]):
                best = {k: v.detach().clone() for k, v in prm.state_dict().items()}
            prm.train()
    prm.load_state_dict(best)
    return losses[:: max(1, steps // 50)], aucs


@torch.no_grad()
def prm_scores(prm: PRMHead, data: list[tuple], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards and labels of every step of `data`."""
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


def save_prm(prm: PRMHead, policy_cls_config: Qwen2Config, tok, path: Path) -> None:
    """Skywork's layout: the backbone as a Qwen2 causal LM plus `v_head.summary.*`, architecture Qwen2ForPrmModel."""
    lm = Qwen2ForCausalLM(policy_cls_config)
    lm.model = prm.backbone
    lm.tie_weights()
    save_policy(lm, tok, path)
    weights = load_file(path / "model.safetensors")
    for k, v in prm.v_head.summary.state_dict().items():
        weights[f"v_head.summary.{k}"] = v.detach().to("cpu", torch.bfloat16).contiguous()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForPrmModel"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    write_prm_format(path, "\n", True)  # trained on Skywork's README format (prm_example), so scored in it


def accuracy(probs: list[Problem], texts: list[str]) -> dict:
    """Overall and per-level accuracy."""
    ok = [is_correct(p, t) for p, t in zip(probs, texts, strict=True)]
    per = {lv: [o for o, p in zip(ok, probs, strict=True) if p.level == lv] for lv in LEVELS}
    return {"overall": sum(ok) / len(ok), "per_level": {lv: sum(v) / len(v) for lv, v in per.items() if v}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="benchmarks/toy/models")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every step count (0.01 to check on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prms-only", action="store_true", help="load the policies from --output, train the PRMs only")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.output)
    if not args.prms_only:
        refuse_overwrite(out / "metrics.json", args.force)
    t0 = time.time()
    seconds: dict[str, float] = {}
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    gen_batch = 2000 if dev.type == "cuda" else 250
    tok = build_toy_tokenizer()
    eos, vocab = tok.eos_token_id, len(tok)
    n = lambda k: max(2, int(k * args.scale))

    curves: dict = {}
    if args.prms_only:
        draft, target = (Qwen2ForCausalLM.from_pretrained(out / m, dtype=torch.float32) for m in ("draft", "target"))
    else:
        draft = new_policy(SMALL, vocab, eos, args.seed + 1)
        target = new_policy(LARGE, vocab, eos, args.seed + 2)
        curves["draft"] = train_policy(draft, tok, n(3000), 256, 3e-3, args.seed + 3, dev)
        seconds["train_draft"] = time.time() - t0
        curves["target"] = train_policy(target, tok, n(4000), 256, 1e-3, args.seed + 4, dev)
        seconds["train_target"] = time.time() - t0 - sum(seconds.values())

    held_out = problems(10**6 + args.seed, 500)
    metrics: dict = {"draft": accuracy(held_out, solve(draft, tok, held_out, dev, batch=gen_batch))}
    metrics["target"] = accuracy(held_out, solve(target, tok, held_out, dev, batch=gen_batch))
    print("accuracy", json.dumps(metrics), flush=True)
    if not args.prms_only:  # saved now: a later failure keeps them
        for name, model in (("draft", draft), ("target", target)):
            if (out / name).exists():
                shutil.rmtree(out / name)
            save_policy(model, tok, out / name)
    seconds["eval_policies"] = time.time() - t0 - sum(seconds.values())

    train_probs = problems(2 * 10**6 + args.seed, n(40000))
    train_data = prm_data(tok, train_probs, solve(draft, tok, train_probs, dev, do_sample=True, batch=gen_batch))
    eval_data = prm_data(tok, held_out, solve(draft, tok, held_out, dev, do_sample=True, batch=gen_batch))
    valid_probs = problems(3 * 10**6 + args.seed, 1000)  # for early stopping; disjoint from the held-out set
    valid_data = prm_data(tok, valid_probs, solve(draft, tok, valid_probs, dev, do_sample=True, batch=gen_batch))
    labels_seen = torch.tensor([x for e in train_data for x in e[2]])
    metrics["prm_train_steps"], metrics["prm_train_positive_share"] = len(labels_seen), float(labels_seen.mean())
    seconds["sample_prm_data"] = time.time() - t0 - sum(seconds.values())
    for name, policy, steps, lr in (("prm_small", draft, n(3000), 1e-3), ("prm_large", target, n(3000), 3e-4)):
        base = new_policy(SMALL if name == "prm_small" else LARGE, vocab, eos, 0)
        base.load_state_dict(policy.state_dict())
        prm = PRMHead(base)
        curves[name], valid_auc = train_prm(prm, train_data, valid_data, eos, steps, 128, lr, args.seed + 5, dev)
        scores, labels = prm_scores(prm, eval_data, eos, dev)
        metrics[name] = {"auc": roc_auc(scores, labels), "eval_steps": len(labels), "valid_auc_every_250": valid_auc}
        print(name, metrics[name], flush=True)
        path = out / name.replace("_", "-")
        if path.exists():
            shutil.rmtree(path)
        save_prm(prm, base.config, tok, path)
        seconds[f"train_{name}"] = time.time() - t0 - sum(seconds.values())
    metrics["parameters"] = {"draft": draft.num_parameters(), "target": target.num_parameters()}
    metrics["checkpoint_bytes"] = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    result = {
        "metrics": metrics,
        "curves": curves,
        "seconds": {**seconds, "total": time.time() - t0},
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": " ".join(
            ["python -m rsd_generation.benchmarks.toy.train", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    name = "metrics-prms.json" if args.prms_only else "metrics.json"
    write_json_atomic(out / name, result)
    print(json.dumps({"metrics": metrics, "seconds": result["seconds"]}, indent=1))
    return result


if __name__ == "__main__":
    main()
