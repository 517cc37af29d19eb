"""The benchmark's methods. Each runs one batch of questions and returns one result dict per question.

A result holds the response text, the FLOPs per model in both accountings (`flops`: every position a model
processes, 2·N each; `decode_flops`: the paper's, 2·N per generated token and 2·N_prm per PRM call) and the RSD
step counts where they apply. The runner (`benchmarks.cli`) adds the question, the grade and the wall-clock.

Baselines built here (majority voting, best-of-N, process best-of-N, beam search) are charged as an implementation
that shares the prompt's KV cache between samples would be: the prompt once per question, then every token of every
sample or candidate step. RSD and speculative decoding are charged what they actually processed.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

import rsd_generation as rsd

MODELS = ("draft", "target", "reward")


@dataclass(frozen=True)
class Setting:
    """One row of the results: a method and its parameters. `name` is the row's label (unique per method)."""

    method: str
    name: str
    params: dict = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        """Identifies the row in records and on resume."""
        return f"{self.method}|{self.name}"


@dataclass
class Models:
    """What the methods run on: one tokenizer shared by the policies, the policies and the reward models."""

    tokenizer: object
    draft: PreTrainedModel
    target: PreTrainedModel
    prms: dict[str, rsd.RewardModel]  # by name, e.g. "small", "large"
    merged: dict[str, tuple[PreTrainedModel, rsd.RewardModel]] = field(default_factory=dict)  # "draft*", "target*"
    separator: str = "\n\n"
    max_new_tokens: int = 256
    max_step_tokens: int = 64
    temperature: float = 0.7  # of the sampling baselines (majority, best-of-N, search)
    do_sample: bool = False  # of the single-sample methods (target, draft, SD, RSD)
    schedule: str | int = "eager"  # rsd_schedule of RSD
    slots: int | None = None  # rsd_max_batch_size of RSD (rows decoded at once; more prompts queue)
    servers: dict = field(default_factory=dict)  # --backend vllm: `serving.Servers` by PRM name, and "policies"


@dataclass
class Batch:
    """Questions of one batch: policy prompts, the problem text the PRM sees, and a seed."""

    prompts: list[str]
    problems: list[str]
    seed: int
    answer_key: Callable[[int, str], object]  # (row, response) -> the answer used for voting


# -- FLOPs accountings (pure) ------------------------------------------------------------------------------------
def plain_positions(prompt_len: int, lengths: list[int]) -> int:
    """Positions a decoder processes for samples of `lengths` new tokens after one shared prompt: the prompt once,
    then each sample's tokens but its last (a generated token is fed back only to produce the next one)."""
    return prompt_len + sum(max(n - 1, 0) for n in lengths)


def costs(n_params: dict[str, int], positions: dict[str, int], generated: dict[str, int]) -> dict:
    """`flops` (2·N per processed position) and `decode_flops` (2·N per generated token or PRM call), per model."""
    return {
        "flops": {k: 2 * n_params[k] * v for k, v in positions.items()},
        "decode_flops": {k: 2 * n_params[k] * v for k, v in generated.items()},
    }


def n_params(models: Models, prm: rsd.RewardModel | None = None, draft=None, target=None) -> dict[str, int]:
    """Parameter counts of the models a method uses."""
    out = {"draft": (draft or models.draft).num_parameters(), "target": (target or models.target).num_parameters()}
    if prm is not None:
        out["reward"] = prm.num_parameters
    return out


# -- helpers -------------------------------------------------------------------------------------------------------
def seed_for(setting: Setting, first_id: str, seed: int) -> int:
    """A batch's seed: the same on a resumed run, different across settings and batches."""
    return zlib.crc32(f"{seed}|{setting.key}|{first_id}".encode())


def encode(tok, prompts: list[str], device) -> dict:
    """Left-padded prompts (no special tokens added: prompts are already formatted)."""
    tok.padding_side = "left"
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def trim(ids: list[int], eos: set[int]) -> list[int]:
    """New tokens up to and including the first EOS (the rest is padding)."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def _eos(model, tok) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return set(eos) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def sample(model, tok, prompts: list[str], n: int, do_sample: bool, temperature: float, max_new: int, **kw):
    """`n` continuations per prompt: (new token lists `[B][n]`, prompt lengths `[B]`)."""
    enc = encode(tok, prompts, _device(model))
    extra = {"temperature": temperature, "top_p": 1.0, "top_k": 0} if do_sample else {}
    gen = model.generate(
        **enc, do_sample=do_sample, num_return_sequences=n, max_new_tokens=max_new,
        pad_token_id=tok.pad_token_id, **extra, **kw,
    )  # fmt: skip
    new = gen[:, enc["input_ids"].shape[1] :].tolist()
    eos = _eos(model, tok)
    out = [[trim(new[b * n + j], eos) for j in range(n)] for b in range(len(prompts))]
    return out, enc["attention_mask"].sum(1).tolist()


def split(text: str, sep: str) -> list[str]:
    """A response's steps (the separator kept on all but the last), empty pieces dropped."""
    parts = text.split(sep)
    steps = [p + sep for p in parts[:-1]] + [parts[-1]]
    return [s for s in steps if s.strip()]


# -- methods -------------------------------------------------------------------------------------------------------
def run_plain(models: Models, setting: Setting, batch: Batch) -> list[dict]:
    """Target only or draft only: one (greedy unless `do_sample`) response per question."""
    model = models.target if setting.method == "target" else models.draft
    role = "target" if setting.method == "target" else "draft"
    torch.manual_seed(batch.seed)
    new, plen = sample(model, models.tokenizer, batch.prompts, 1, models.do_sample, 1.0, models.max_new_tokens)
    out = []
    for ids, p in zip(new, plen, strict=True):
        c = costs({role: model.num_parameters()}, {role: plain_positions(p, [len(ids[0])])}, {role: len(ids[0])})
        out.append(
            {"response": models.tokenizer.decode(ids[0], skip_special_tokens=True), "new_tokens": len(ids[0]), **c}
        )
    return out


SD_GAMMA = 4  # tokens the draft proposes per target forward in speculative decoding


def run_sd(models: Models, setting: Setting, batch: Batch) -> list[dict]:
    """Speculative decoding, batched: `rsd.speculative_generate` with the draft (greedy: the target's own tokens;
    with `do_sample` the target samples alone, at temperature 1)."""
    tok, target = models.tokenizer, models.target
    enc = encode(tok, batch.prompts, _device(target))
    torch.manual_seed(batch.seed)
    extra = {"temperature": 1.0, "top_p": 1.0, "top_k": 0} if models.do_sample else {}
    res = rsd.speculative_generate(
        target, models.draft, **enc, gamma=SD_GAMMA, max_new_tokens=models.max_new_tokens,
        do_sample=models.do_sample, pad_token_id=tok.pad_token_id, return_dict_in_generate=True, **extra,
    )  # fmt: skip
    st, eos = res.rsd_stats, _eos(target, tok)
    new = res.sequences[:, enc["input_ids"].shape[1] :].tolist()
    out = []
    for j, row in enumerate(new):
        ids = trim(row, eos)
        positions = {k: v[j] for k, v in st["row_forward_tokens"].items()}
        # decode FLOPs: one target forward verifies a block (one decode step); each proposed token one draft step
        generated = {"target": st["row_target_forwards"][j], "draft": st["row_draft_tokens"][j]}
        c = costs(n_params(models), positions, {k: v for k, v in generated.items() if k in positions})
        out.append({"response": tok.decode(ids, skip_special_tokens=True), "new_tokens": len(ids), **c})
    return out


def run_rsd(models: Models, setting: Setting, batch: Batch) -> list[dict]:
    """RSD through `target.generate(..., assistant_model=draft, reward_model=prm)`; `merged` picks a Table 4 row."""
    p = setting.params
    draft, target = models.draft, models.target
    if p.get("merged") == "draft*":  # the merged draft is the draft and, with its shared backbone, the PRM
        draft, prm = models.merged["draft*"]
    elif p.get("merged") == "target*":
        target, prm = models.merged["target*"]
    else:
        prm = models.prms[p["prm"]]
    target = rsd.with_rsd(target)
    enc = encode(models.tokenizer, batch.prompts, _device(target))
    if "budget" in p:  # δ chosen online, at most a share γ of the steps to the target
        rule = {"rsd_budget": p["budget"]}
    else:
        rule = {"rsd_threshold": p["delta"], "rsd_weighting": p.get("weighting", "binary"),
                "rsd_weighting_kwargs": p.get("weighting_kwargs")}  # fmt: skip
    res = target.generate(
        **enc, tokenizer=models.tokenizer, assistant_model=draft, reward_model=prm, **rule,
        rsd_step_separator=models.separator,
        rsd_max_step_tokens=models.max_step_tokens, reward_prompts=batch.problems,
        rsd_generator=torch.Generator(_device(target)).manual_seed(batch.seed), rsd_schedule=models.schedule,
        rsd_max_batch_size=models.slots,
        max_new_tokens=models.max_new_tokens, do_sample=models.do_sample, pad_token_id=models.tokenizer.pad_token_id,
        return_dict_in_generate=True,
    )  # fmt: skip
    st = res.rsd_stats
    out = []
    for row, steps in zip(st["per_row"], st["steps"], strict=True):
        text = "".join(s["text"] for s in steps if s["accepted"])
        out.append(
            {
                "response": text,
                "new_tokens": row["draft_tokens"] + row["target_tokens"],
                "flops": row["flops"],
                "decode_flops": row["decode_flops"],
                "draft_steps": row["draft_steps"],
                "accepted_steps": row["accepted_steps"],
                "draft_only": all(s["source"] == "draft" for s in steps),
                "step_rewards": [(s["reward"], s["accepted"]) for s in steps if s["source"] == "draft"],
            }
        )
    return out


def run_sampled(models: Models, setting: Setting, batch: Batch) -> list[dict]:
    """Majority voting@N (`method="majority"`) or PRM best-of-N (`"best_of_n"`) over N draft samples."""
    n, tok = setting.params["n"], models.tokenizer
    torch.manual_seed(batch.seed)
    new, plen = sample(models.draft, tok, batch.prompts, n, True, models.temperature, models.max_new_tokens)
    prm = models.prms.get(setting.params.get("prm", ""))
    out = []
    for row, (ids, p) in enumerate(zip(new, plen, strict=True)):
        texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
        positions = {"draft": plain_positions(p, [len(x) for x in ids])}
        generated = {"draft": sum(len(x) for x in ids)}
        if setting.method == "majority":
            keys = [batch.answer_key(row, t) for t in texts]
            votes = Counter(k for k in keys if k is not None)
            best = keys.index(votes.most_common(1)[0][0]) if votes else 0
            c = costs(n_params(models), positions, generated)
        else:
            steps = [split(t, models.separator) or [""] for t in texts]
            r = prm.score_last([batch.problems[row]] * n, [s[:-1] for s in steps], [s[-1] for s in steps])
            best = int(torch.argmax(r))
            positions["reward"] = len(prm.prefix_ids(batch.problems[row])) + sum(
                len(prm.step_ids(x)) for s in steps for x in s
            )
            generated["reward"] = n  # one PRM call per scored solution
            c = costs(n_params(models, prm), positions, generated)
        out.append({"response": texts[best], "new_tokens": len(ids[best]), **c})
    return out


def _step(text_ids: list[int], tok, sep: str, eos: set[int]) -> tuple[list[int], bool]:
    """Cut a sampled continuation after its first separator; whether the response ends there (EOS, or no
    separator within the step budget)."""
    for k in range(1, len(text_ids) + 1):
        if text_ids[k - 1] in eos:
            return text_ids[:k], True
        if sep in tok.decode(text_ids[:k], skip_special_tokens=True):
            return text_ids[:k], False
    return text_ids, True


def run_search(models: Models, setting: Setting, batch: Batch) -> list[dict]:
    """Step-level search with the PRM: keep `beam` partial solutions, expand each into `expand` sampled next steps,
    keep the `beam` best by reward. Process best-of-N is beam 1, expand N; beam search is beam b, expand e."""
    b, e, tok, sep = setting.params["beam"], setting.params["expand"], models.tokenizer, models.separator
    prm = models.prms[setting.params["prm"]]
    eos = _eos(models.draft, tok)
    torch.manual_seed(batch.seed)
    Q = len(batch.prompts)
    # a beam: (steps as text, steps as ids, last reward); finished beams move to `done`
    active: list[list[tuple]] = [[([], [], 0.0)] for _ in range(Q)]
    done: list[list[tuple]] = [[] for _ in range(Q)]
    per_q = [dict(draft=[0, 0], reward=[0, 0]) for _ in range(Q)]  # [positions, generated] per question
    for q in range(Q):
        per_q[q]["draft"][0] = len(tok.encode(batch.prompts[q], add_special_tokens=False))
        per_q[q]["reward"][0] = len(prm.prefix_ids(batch.problems[q]))
    while any(active):
        flat = [(q, beam) for q in range(Q) for beam in active[q]]
        contexts = [batch.prompts[q] + "".join(beam[0]) for q, beam in flat]
        budget = min(models.max_step_tokens, models.max_new_tokens)
        new, _ = sample(
            models.draft, tok, contexts, e, True, models.temperature, budget, stop_strings=[sep], tokenizer=tok
        )
        cands = []  # (q, steps, ids, finished)
        for (q, beam), outs in zip(flat, new, strict=True):
            for ids in outs:
                ids, final = _step(ids, tok, sep, eos)
                text = tok.decode(ids, skip_special_tokens=True)
                total = sum(len(x) for x in beam[1]) + len(ids)
                cands.append((q, [*beam[0], text], [*beam[1], ids], final or total >= models.max_new_tokens))
                per_q[q]["draft"][0] += len(ids)
                per_q[q]["draft"][1] += len(ids)
        r = prm.score_last(
            [batch.problems[q] for q, *_ in cands], [c[1][:-1] for c in cands], [c[1][-1] for c in cands]
        )
        for q, steps, _, _ in cands:
            per_q[q]["reward"][0] += len(prm.step_ids(steps[-1]))
            per_q[q]["reward"][1] += 1
        by_q: list[list[tuple]] = [[] for _ in range(Q)]
        for reward, c in zip(r.tolist(), cands, strict=True):
            by_q[c[0]].append((reward, c))
        for q in range(Q):
            mine = sorted(by_q[q], key=lambda x: x[0], reverse=True)
            slots = b - len(done[q])
            active[q] = []
            for reward, (_, steps, ids, final) in mine[: max(slots, 0)]:
                (done[q] if final else active[q]).append((steps, ids, reward))
    out = []
    for q in range(Q):
        steps, ids, _ = max(done[q], key=lambda beam: beam[2])
        c = costs(
            n_params(models, prm),
            {k: v[0] for k, v in per_q[q].items()},
            {k: v[1] for k, v in per_q[q].items()},
        )
        out.append({"response": "".join(steps), "new_tokens": sum(len(x) for x in ids), **c})
    return out


METHODS: dict[str, Callable[[Models, Setting, Batch], list[dict]]] = {
    "target": run_plain,
    "draft": run_plain,
    "sd": run_sd,
    "rsd": run_rsd,
    "majority": run_sampled,
    "best_of_n": run_sampled,
    "rsd_merged": run_rsd,
    "process_best_of_n": run_search,
    "beam_search": run_search,
}
