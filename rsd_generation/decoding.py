"""The RSD decoding loop (paper, Algorithms 1 and 2), run by `generate` through its `custom_generate` hook."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinPLogitsWarper,
    PreTrainedModel,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .fast import fast_mode, row_cache
from .kv import RowCache, pad_right
from .rewards import RewardModel
from .schedule import Scheduler
from .stats import RSDStats, Step
from .weighting import Weighting, accept, needs_draw


@dataclass
class RSDGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus `rsd_stats` (see `RSDStats.as_dict`)."""

    rsd_stats: dict | None = None


CATCH_UP = ("auto", "lazy", "along")  # rsd_catch_up values


def catch_up_mode(catch_up: str, fast: str) -> str:
    """The catch-up a run uses (`"lazy"` or `"along"`) for `rsd_catch_up` and the target's decoding path `fast`
    (see `fast_mode`): `"auto"` is `"along"` where forwards are CUDA graphs, weight-bound at the batch sizes RSD
    runs, so tokens riding in them cost next to nothing (measured faster on an H100 at 16 and 64 rows), and
    `"lazy"` elsewhere, where every position costs compute and rows never written for again need no catch-up."""
    if catch_up != "auto":
        return catch_up
    return "along" if fast in ("graphs", "compile") else "lazy"


@dataclass
class RSDOptions:
    """Validated RSD options, bound to the loop by `RSDGenerationMixin.generate`."""

    draft: PreTrainedModel
    reward_model: RewardModel
    tokenizer: object
    omega: Weighting
    separator: str
    max_step_tokens: int
    max_steps: int | None
    reward_prompts: Sequence[str] | None
    streamer: object | None
    generator: torch.Generator | None
    fast_path: str | bool = "auto"
    schedule: str | int = "eager"
    catch_up: str = "auto"  # "along": the target's forwards feed other rows' queued tokens (see `catch_up_mode`)
    max_batch_size: int | None = None
    speculative: int = 0  # γ of RSD∘SD (0: the target writes rejected steps alone)


@dataclass
class Sampling:
    """What both policies share when picking a token."""

    processors: LogitsProcessorList
    do_sample: bool
    generator: torch.Generator | list[torch.Generator] | None  # a list: one stream per original row
    vocab: int  # logits beyond the smaller model's vocabulary (padding rows) are never picked
    eos: torch.Tensor  # eos: [E]
    pad: int


@dataclass
class StepRules:
    """When a step (and the row) ends, besides EOS."""

    separator: StepSeparator | None  # None: no step boundary (plain decoding)
    max_step_tokens: int
    user: StoppingCriteriaList


_STOP_CRITERIA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stop_string_criteria(tokenizer, stop_strings: str | Sequence[str]) -> StopStringCriteria:
    """A `StopStringCriteria`, built once per tokenizer and strings (it indexes the whole vocabulary: seconds
    for a 150k-token one) and reused by later `generate` calls."""
    per_tokenizer = _STOP_CRITERIA.setdefault(tokenizer, {})
    key = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
    if key not in per_tokenizer:
        per_tokenizer[key] = StopStringCriteria(tokenizer, list(key))
    return per_tokenizer[key]


def separator_tables(criteria: StopStringCriteria) -> tuple[torch.Tensor, torch.Tensor]:
    """A step separator as an automaton over tokens, built from what a one-string `StopStringCriteria` indexed:
    `(next_state, ends)`, both `(S, V')`, for the S states it reaches (state 0: nothing matched yet) and each
    token of its table (ids past it read its last column, as the criteria clamp them).

    A state is the set of lengths k for which the text so far ends in the separator's first k characters (bytes,
    for byte-level tokenizers); the criteria's table gives, per token, its length, where it may sit inside the
    separator (`valid positions`: characters after it, its start may run off the separator's) and how much of the
    separator's end it may hold (`end overlaps`: the separator may also lie inside it). A token ends the step when
    it holds the whole separator, or its end overlap e meets a state holding L - e. So the step ends at the token
    where the criteria, which check the text's end after each token, first match; unlike them it does not stop
    looking after L tokens, so a separator around tokens with empty text still counts."""
    vec = criteria.embedding_vec.long()  # vec: [V', P + E + 1]
    P, E = criteria.max_valid_positions, criteria.max_valid_end_lens
    L = int(criteria.target_lens[0])
    if L > 62:  # a state is a bit mask of prefix lengths in an int64
        raise ValueError(f"a step separator may be at most 62 characters (or bytes) long, got {L}")
    positions, overlaps, length = vec[:, :P], vec[:, P : P + E], vec[:, -1:]  # [V', P], [V', E], [V', 1]
    inside = positions > 0  # inside: [V', P]
    cover = inside & (positions + length >= L)  # the token holds the separator's first L - i characters, or more
    need = (L - positions - length).clamp(0, L)  # need: [V', P], what the text before must already end in
    at = (L - positions).clamp(0, L)  # at: [V', P], the prefix length after the token
    holds = overlaps > 0  # holds: [V', E]

    def step(state: int) -> tuple[torch.Tensor, torch.Tensor]:  # state: a bit mask of prefix lengths
        has = lambda k: (state >> k) & 1 == 1
        keep = inside & (cover | ((need > 0) & has(need)))  # keep: [V', P]
        after = (keep.long() << at).sum(1)  # after: [V'] (distinct positions: distinct bits)
        ends = (holds & ((overlaps >= L) | has((L - overlaps).clamp(0, L)))).any(1)  # ends: [V']
        return after, ends

    index, rows_next, rows_ends = {0: 0}, [], []  # index: state index of each reached mask
    while len(rows_next) < len(index):  # breadth first over the reachable states (at most L for one string)
        after, ends = step(list(index)[len(rows_next)])
        seen, back = after.unique(return_inverse=True)  # back: [V'], each token's next mask as an index into seen
        for m in seen.tolist():
            index.setdefault(m, len(index))
        rows_next.append((seen, back))
        rows_ends.append(ends)
    next_state = torch.stack([torch.tensor([index[m] for m in seen.tolist()])[back] for seen, back in rows_next])
    return next_state, torch.stack(rows_ends)  # next_state: [S, V']


class StepSeparator:
    """Ends a step when its text comes to hold the separator (a token may merge it with neighbours, as ".\n\n"):
    an automaton over tokens (`separator_tables`), one lookup per token and row, where transformers'
    `StopStringCriteria` would run a few dozen tensor operations on the step so far.
    """

    def __init__(self, tokenizer, separator: str):
        self.next_state, self.ends = separator_tables(stop_string_criteria(tokenizer, [separator]))  # [S, V']
        self._host = (self.next_state.tolist(), self.ends.tolist())  # for checks on the host
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def start(self, rows: int, device: torch.device) -> torch.Tensor:
        """`(rows,)` states at a step's start: nothing of the separator seen."""
        return torch.zeros(rows, dtype=torch.long, device=device)

    def advance(self, state: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed each row's token `(R,)`: its next state `(R,)`, and whether the token ended the step `(R,)`."""
        if tok.device not in self._on:
            self._on[tok.device] = (self.next_state.to(tok.device), self.ends.to(tok.device))
        next_state, ends = self._on[tok.device]
        t = tok.clamp(0, next_state.shape[1] - 1)
        return next_state[state, t], ends[state, t]

    def advance_host(self, state: int, tok: int) -> tuple[int, bool]:
        """`advance` for one row on the host: the state after `tok`, and whether `tok` ended the step."""
        next_state, ends = self._host
        t = min(max(tok, 0), len(next_state[0]) - 1)
        return next_state[state][t], bool(ends[state][t])

    def ended(self, step: Sequence[int]) -> bool:
        """Whether the step's last token (of a step not ended before it) ends it, on the host."""
        state = 0
        for t in step[:-1]:
            state, _ = self.advance_host(state, t)
        return bool(step) and self.advance_host(state, step[-1])[1]


class HostFlag:
    """A device bool read by the host without draining the stream: copied to pinned memory behind an event."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def set(self, x: torch.Tensor) -> HostFlag:
        """Start copying `x` (a 0-d bool tensor)."""
        self.host.copy_(x, non_blocking=self.cuda)
        if self.cuda:
            self.event.record(torch.cuda.current_stream(x.device))
        return self

    def get(self) -> bool:
        """Wait only for the copy, then read it."""
        if self.cuda:
            self.event.synchronize()
        return bool(self.host)


_SEPARATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_separator(tokenizer, separator: str) -> StepSeparator:
    """A `StepSeparator`, built once per tokenizer and separator."""
    per_tokenizer = _SEPARATORS.setdefault(tokenizer, {})
    if separator not in per_tokenizer:
        per_tokenizer[separator] = StepSeparator(tokenizer, separator)
    return per_tokenizer[separator]


class RowIds:
    """Each row's ids as `generate` hands them to logits processors and stopping criteria: the batch's `(B, P)`
    left-padded prompts followed by the row's new tokens, at the full batch size and in the original row order.

    Rows whose new tokens differ in number go in separate calls (one per length), so processors that keep
    per-row state (the repetition penalty's prompt padding) or count new tokens (`min_new_tokens`) see exactly
    what they see for that row in `generate`; the other rows of such a call are filler and their output unused.

    Args:
        prompts (`torch.LongTensor` of shape `(B, P)`): the prompts, left-padded, as given to `generate`.
        pad (`int`): the id of filler positions.
    """

    def __init__(self, prompts: torch.Tensor, pad: int):
        self.prompts = prompts  # prompts: [B, P]
        self.pad = pad
        self.out: list[list[int]] = [[] for _ in range(len(prompts))]  # committed new tokens per original row

    def groups(self, rows: torch.Tensor, selected: torch.Tensor, device: torch.device) -> list[tuple]:
        """The selected cache rows grouped by committed length, each as (cache rows `(G,)`, original rows `(G,)`,
        ids so far `(B, P + c)`, whether the group is the whole batch in order), the tensors on `device`.

        Args:
            rows (`torch.LongTensor` of shape `(R,)`): the original row of each cache row.
            selected (`torch.BoolTensor` of shape `(R,)`): the cache rows that write now.
        """
        by_length: dict[int, list[tuple[int, int]]] = {}
        for j, (i, sel) in enumerate(zip(rows.tolist(), selected.tolist(), strict=True)):
            if sel:
                by_length.setdefault(len(self.out[i]), []).append((j, i))
        B, P = self.prompts.shape
        groups = []
        for c, members in by_length.items():
            js, orig = (torch.tensor(x) for x in zip(*members, strict=True))
            ids = torch.full((B, P + c), self.pad, dtype=torch.long)  # ids: [B, P + c]
            ids[:, :P] = self.prompts.cpu()
            if c:
                ids[orig, P:] = torch.tensor([self.out[i] for i in orig.tolist()], dtype=torch.long)
            whole = len(js) == B == len(rows) and bool((js == orig).all())  # decided here, on the host
            groups.append((js.to(device), orig.to(device), ids.to(device), whole))
        return groups


def _per_row(fn, groups, step: torch.Tensor, scores: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Call a processor or criterion list `fn(ids (B, L), scores (B, V))` once per group of `RowIds.groups`, and
    write each group's rows of the result into `out` (`(R, V)` or `(R,)`, indexed by cache row)."""
    for js, orig, ids, whole in groups:
        B = ids.shape[0]
        if whole:  # the whole batch, in order: no scatter
            full_step, full_scores = step, scores
        else:
            full_step = step.new_zeros(B, step.shape[1])  # full_step: [B, t], filler outside the group
            full_step[orig] = step[js]
            full_scores = scores.new_zeros(B, scores.shape[1])  # full_scores: [B, V]
            full_scores[orig] = scores[js]
        res = fn(torch.cat([ids, full_step], 1), full_scores)
        out[js] = res.to(out.device)[orig]
    return out


def _pick(scores: torch.Tensor, s: Sampling, rows: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Greedy or multinomial choice, as `GenerationMixin._sample` does it: `(R, V)` -> `(R,)`. With one generator
    per row, only the `alive` rows draw, each from its own (`rows`: original row of each cache row)."""
    if not s.do_sample:
        return scores.argmax(-1)
    probs = torch.softmax(scores, -1)  # probs: [R, V]
    if not isinstance(s.generator, list):
        return _draw(probs, s.generator)
    tok = torch.zeros(len(probs), dtype=torch.long, device=probs.device)  # tok: [R]
    for j in alive.nonzero().flatten().tolist():
        tok[j] = _draw(probs[j : j + 1], s.generator[int(rows[j])])[0]
    return tok


def _acceptance_draws(omega: torch.Tensor, generator, rows: torch.Tensor) -> torch.Tensor | None:
    """u ~ U(0, 1) for the decisions `omega` `(D,)` leaves to chance (None when none does). With one generator per
    row (`rows`: the original rows), only the undecided rows draw, each from its own."""
    if not needs_draw(omega):
        return None
    if isinstance(generator, list):
        pairs = zip(rows.tolist(), omega.tolist(), strict=True)
        return torch.tensor([_uniform(generator[i]) if 0 < w < 1 else 1.0 for i, w in pairs])
    dev = generator.device if generator is not None else "cpu"
    return torch.rand(len(omega), generator=generator, device=dev).cpu()


def row_generator(generator, row: int) -> torch.Generator | None:
    """The stream of original row `row`: its own when there is one per row, else the shared one."""
    return generator[row] if isinstance(generator, list) else generator


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One sample per row of `probs` `(R, V)`, drawn where the generator lives (e.g. a CPU generator, GPU model)."""
    if generator is not None and generator.device.type != probs.device.type:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _uniform(generator: torch.Generator | None) -> float:
    """One draw of U(0, 1) from the generator (the global one when None)."""
    return float(torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu"))


# logits processors that depend on the scores alone, not on the ids: applied at once to a window of verified
# positions in speculative sampling
SCORE_ONLY = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)


def speculation_possible(s: Sampling, rules: StepRules) -> bool:
    """Whether `speculative_step` can verify token by token: no user stopping criterion, and under greedy no logits
    processor, under sampling only processors that read the scores alone (temperature, top-k, top-p, min-p)."""
    if len(rules.user):
        return False
    if not s.do_sample:
        return not len(s.processors)
    return all(isinstance(p, SCORE_ONLY) for p in s.processors)


def decode_step(
    cache: RowCache,
    ctx: RowIds,
    rows: torch.Tensor,
    budget: torch.Tensor,
    s: Sampling,
    rules: StepRules,
    probs: list[torch.Tensor] | None = None,
    ride: torch.Tensor | None = None,
) -> tuple[list[list[int]], int, torch.Tensor]:
    """Let one policy write one step for the selected rows (others only carry masked padding).

    Its queued tokens are fed first (prompt, catch-up or the last committed token). The step's last token stays
    queued, since the next step (or a rollback) decides whether it is ever needed. Rows in `ride` catch up along
    the way: each of the step's forwards also feeds the next of their queued tokens (all but the last), so a
    target that writes a few rows' steps catches the others up on their accepted drafts in forwards it runs
    anyway, instead of in a later chunk padded to the longest queue.

    Args:
        cache (`RowCache`): the policy's cache.
        ctx (`RowIds`): the prompts and committed tokens, for logits processors and stopping criteria.
        rows (`torch.BoolTensor` of shape `(R,)`): rows that write a step.
        budget (`torch.LongTensor` of shape `(R,)`): new tokens each row may still generate (>= 1 where selected).
        probs (`list`, *optional*): under sampling, receives the distribution `(R, V)` each token was drawn from.
        ride (`torch.BoolTensor` of shape `(R,)`, *optional*): unselected rows that feed queued tokens along.
    Returns:
        the step tokens per row (empty for unselected rows), the first cache column of the step (for rollback),
        and `(R,)` bools: the step ended by a user stopping criterion.
    """
    dev = cache.device
    writing = rows.cpu().nonzero().flatten()  # writing: [N'], the rows that write a step
    # tokens after which every row has ended, known on the host (a proposal of gamma tokens always ends there)
    limit = min(rules.max_step_tokens, int(budget.cpu()[writing].max())) if len(writing) else 0
    along, along_ok, taken = riding(cache.pending, rows.cpu(), ride, limit)  # along, along_ok: [R, F] or None
    active = (rows.cpu() | (torch.tensor(taken) > 0)).nonzero().flatten()  # active: [N], the rows each one-token
    # forward runs (see RowCache.feed)
    rows, budget, eos = rows.to(dev), budget.to(dev), s.eos.to(dev)
    groups = ctx.groups(cache.rows, rows, dev) if len(s.processors) or len(rules.user) else []
    ahead = getattr(cache, "run_ahead", False)  # queue each forward before the host learns whether it is needed
    going_on = HostFlag(dev)
    logits = cache.feed_pending(rows)  # logits: [R, V]
    start = cache.length
    alive, user_stop = rows.clone(), torch.zeros_like(rows)  # alive, user_stop: [R]
    n = torch.zeros_like(budget)  # n: [R], tokens written this step
    most = budget.clamp_max(rules.max_step_tokens)  # most: [R], tokens each row's step may have
    step = torch.zeros(len(rows), 0, dtype=torch.long, device=dev)  # step: [R, t], tokens written so far
    where = rules.separator.start(len(rows), dev) if rules.separator is not None else None  # where: [R]
    if along is not None:  # on the device once (a copy per forward would wait for the device's queue)
        along, along_ok = along.to(dev), along_ok.to(dev)
    fed = 0  # one-token forwards run this step
    while True:
        scores = logits[:, : s.vocab]  # scores: [R, V]
        if len(s.processors):
            scores = _per_row(s.processors, groups, step, scores, scores.clone())
        if probs is not None and s.do_sample:
            probs.append(torch.softmax(scores, -1))  # the draft's q for speculative sampling
        tok = torch.where(alive, _pick(scores, s, cache.rows, alive), s.pad)  # tok: [R]
        step = torch.cat([step, tok[:, None]], 1)
        n += alive
        ended = n >= most
        if len(eos):
            ended |= torch.isin(tok, eos)
        if rules.separator is not None:
            where, hit = rules.separator.advance(where, tok)
            ended |= hit
        if len(rules.user):
            hit = _per_row(rules.user, groups, step, scores, torch.zeros_like(alive))
            user_stop |= alive & hit
            ended |= hit
        alive &= ~ended
        if step.shape[1] >= limit:  # every row has ended: no flag to wait for, no forward to queue
            break
        going_on.set(alive.any())
        if ahead:  # the GPU runs this forward while the host reads the flag (wasted, all rows masked, at the end)
            logits = feed_one(cache, tok, alive, along, along_ok, fed, active)
            fed += 1
        if not going_on.get():
            break
        if not ahead:
            logits = feed_one(cache, tok, alive, along, along_ok, fed, active)
            fed += 1
    written = step.cpu()  # one copy for every row (row by row, each would wait for the device)
    steps = [written[i, :k].tolist() for i, k in enumerate(n.tolist())]
    for i, sel in enumerate(rows.tolist()):
        if sel:
            cache.pending[i] = steps[i][-1:]
        elif taken[i]:  # the riders' tokens the forwards fed leave their queues
            cache.pending[i] = cache.pending[i][min(taken[i], fed) :]
    return steps, start, user_stop.cpu()


def riding(
    pending: list[list[int]], rows: torch.Tensor, ride: torch.Tensor | None, limit: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int]]:
    """The queued tokens rows in `ride` (and not in `rows`) feed along a step of at most `limit` forwards: all but
    the last of each queue (the next step needs the logits after it), at most `limit`. Returns `(ids, valid)`
    `(R, F)` on the host (None when no row rides) and the count per row."""
    R = len(pending)
    if ride is None:
        return None, None, [0] * R
    taken = [min(len(p) - 1, limit) if bool(r) and not bool(w) else 0
             for p, r, w in zip(pending, ride.tolist(), rows.tolist(), strict=True)]  # fmt: skip
    if not any(taken):
        return None, None, taken
    ids, valid = pad_right([p[:k] for p, k in zip(pending, taken, strict=True)], 0)  # ids, valid: [R, F]
    return ids, valid, taken


def feed_one(cache: RowCache, tok, alive, along, along_ok, t: int, active) -> torch.Tensor:
    """A step's one-token forward: the alive rows' new tokens `tok` `(R,)`, and the riders' `t`-th queued token
    (`along`, `along_ok`: `(R, F)`, see `riding`)."""
    if along is None or t >= along.shape[1]:
        return cache.feed(tok[:, None], alive[:, None], rows=active)
    ok = along_ok[:, t].to(alive.device)
    ids = torch.where(ok, along[:, t].to(tok.device), tok)  # ids: [R]
    return cache.feed(ids[:, None], (alive | ok)[:, None], rows=active)


def sampling(generation_config: GenerationConfig, processors: LogitsProcessorList, generator, *models) -> Sampling:
    """How the policies pick tokens, from `generate`'s config and processors (EOS and pad as `generate` sets them;
    only the vocabulary all `models` share is picked from)."""
    eos = torch.tensor(_token_ids(generation_config.eos_token_id), dtype=torch.long)  # eos: [E]
    pad_ids = _token_ids(generation_config.pad_token_id)
    pad = pad_ids[0] if pad_ids else (int(eos[0]) if len(eos) else 0)  # generate's choice: the first EOS
    vocab = min(_vocab_size(model) for model in models)
    return Sampling(processors, generation_config.do_sample, generator, vocab, eos, pad)


def user_criteria(stopping_criteria: StoppingCriteriaList) -> StoppingCriteriaList:
    """The user's stopping criteria (the length and EOS criteria `generate` adds are handled by the loop)."""
    return StoppingCriteriaList(
        [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    )


def _token_ids(ids) -> list[int]:
    """A generation config's token id field (None, an int, a list or a tensor) as a list of ints."""
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def speculative_step(
    m: RowCache,
    M: RowCache,
    ctx: RowIds,
    rows: torch.Tensor,
    budget: torch.Tensor,
    s: Sampling,
    rules: StepRules,
    proposals: list[list[int]],
    gamma: int,
    work: dict[str, list[int]] | None = None,
) -> list[list[int]]:
    """Let the target write one step for the selected rows by speculative decoding (paper §4).

    The target verifies a proposal in one forward, keeps the prefix it agrees with and adds its own next token;
    then the draft proposes the next `gamma` tokens; until the step ends. Greedy: token for token what
    `decode_step(M, ...)` writes, and the first proposal may be the rejected draft step. Sampling: the speculative
    sampling rule, so the step is distributed as the target's own; proposals are fresh draft samples (a rejected
    step is not one: the PRM's rejection conditions it). `speculation_possible` says when this applies.
    Both caches end as `decode_step` leaves them: the step in the target's cache with its last token queued; the
    draft holds the proposal tokens the target accepted and owes the rest of the step.

    Args:
        m, M (`RowCache`): the draft's and the target's caches, their queues set (the draft owes what it lacks of
            the context; the target its catch-up).
        rows (`torch.BoolTensor` of shape `(R,)`): rows that write a step.
        budget (`torch.LongTensor` of shape `(R,)`): new tokens each row may still generate (>= 1 where selected).
        proposals (`list[list[int]]`): per row, the first proposal (the rejected draft step).
        work (`dict`, *optional*): filled per row with `"verifications"` (target forwards the row took part in)
            and `"proposed"` (tokens the draft proposed for it), for cost accounting.
    Returns:
        the step tokens per row (empty for unselected rows).
    """
    R, eos = len(rows), set(s.eos.tolist())
    limit = [min(rules.max_step_tokens, int(b)) for b in budget.tolist()]  # tokens each row's step may have
    alive = rows.tolist()
    step: list[list[int]] = [[] for _ in range(R)]
    where = [0] * R  # each row's separator state after its step so far (one lookup a token, not a rescan)
    prop = [list(p[: limit[j]]) if alive[j] else [] for j, p in enumerate(proposals)]
    q: list[torch.Tensor] = []  # the draft's distributions of the proposal (sampling; none for a given proposal)
    assert not (s.do_sample and any(prop)), "under sampling proposals must be fresh draft samples"
    if work is not None:
        work.update(verifications=[0] * R, proposed=[0] * R)
    # tokens of each row's proposal that the draft's cache holds, from column `start` on (None: a given proposal,
    # which it does not hold); the draft keeps those the target accepts
    fed: list[int | None] = [None] * R
    start = 0
    while any(alive):
        # the target verifies: its queue, then the proposal, in one forward; logits at the proposal's positions
        chunks = [M.pending[j] + prop[j] if alive[j] else [] for j in range(R)]
        first = [M.length + len(M.pending[j]) for j in range(R)]  # first: cache column of each proposal
        window = max(len(prop[j]) + 1 for j in range(R) if alive[j])
        ids, valid = pad_right(chunks, M.pad_token_id)
        for j in range(R):
            if alive[j]:
                M.pending[j] = []
        logits = M.feed(ids, valid, window=window)  # logits: [R, W, V]
        if s.do_sample:  # the target's distributions p at the verified positions (processors read scores only)
            scores = logits[..., : s.vocab].flatten(0, 1)  # scores: [R * W, V]
            p = torch.softmax(s.processors(ids.new_zeros(len(scores), 1), scores), -1).view(R, window, -1)
            gens = [row_generator(s.generator, int(i)) for i in M.rows]
            picks = [_accept_or_resample(p[j, window - len(prop[j]) - 1 :], prop[j], q, j, gens[j])
                     if alive[j] else [] for j in range(R)]  # fmt: skip
        else:
            picks = logits[..., : s.vocab].argmax(-1).tolist()  # picks: [R][W], the target's greedy tokens
            picks = [picks[j][window - len(prop[j]) - 1 :] for j in range(R)]
        verified = torch.zeros(R, dtype=torch.bool)  # verified: [R]
        keep = torch.zeros(R, dtype=torch.long)  # keep: [R], first target column to drop
        trim = torch.zeros(R, dtype=torch.bool)  # trim: [R], rows whose draft cache holds rejected proposal tokens
        cut = torch.zeros(R, dtype=torch.long)  # cut: [R], first draft column to drop
        for j in range(R):
            if not alive[j]:
                continue
            new = []
            for k, tok in enumerate(picks[j]):
                new.append(tok)
                step[j].append(tok)
                hit = False
                if rules.separator is not None:
                    where[j], hit = rules.separator.advance_host(where[j], tok)
                if hit or tok in eos or len(step[j]) >= limit[j]:
                    alive[j] = False
                    break
                if k == len(prop[j]) or tok != prop[j][k]:
                    break
            verified[j], keep[j] = True, first[j] + len(new) - 1
            if work is not None:
                work["verifications"][j] += 1
            M.pending[j] = [new[-1]]  # the step's last token stays queued
            if fed[j] is None:  # the draft catches up on what the target wrote
                m.pending[j] += new
            else:  # it keeps the accepted proposal tokens it holds and is fed the rest
                a = next((i for i, (x, y) in enumerate(zip(new, prop[j], strict=False)) if x != y), len(new))
                kept = min(a, fed[j])  # new[:kept] == prop[j][:kept], in the draft's cache already
                trim[j], cut[j] = True, start + kept
                m.pending[j] = new[kept:]
        M.drop_from(verified, keep)  # proposal tokens past the agreed prefix leave the target's cache
        m.drop_from(trim, cut)  # and the draft's
        if not any(alive):
            break
        # the draft proposes the next gamma tokens of the rows still writing
        going = torch.tensor(alive)
        left = torch.tensor([limit[j] - len(step[j]) for j in range(R)])  # left: [R]
        q: list[torch.Tensor] = []  # q: [t][R, V], the draft's distributions (sampling)
        prop, start, _ = decode_step(m, ctx, going, left, s, StepRules(rules.separator, gamma, rules.user), q)
        if work is not None:
            for j in range(R):
                work["proposed"][j] += len(prop[j])
        # decode_step fed all but each proposal's last token (queued) from column `start` on
        fed = [max(len(prop[j]) - 1, 0) if alive[j] else None for j in range(R)]
    return step


def _accept_or_resample(
    p: torch.Tensor, prop: list[int], q: list[torch.Tensor], j: int, generator: torch.Generator | None
) -> list[int]:
    """Speculative sampling for one row: keep proposal token x_k with probability min(1, p_k(x_k) / q_k(x_k)); at
    the first rejection draw from norm(max(0, p_k - q_k)) and stop; if all are kept, draw one more from p. The
    tokens are distributed as the target's own samples.

    Args:
        p (`torch.Tensor` of shape `(len(prop) + 1, V)`): the target's distributions at the proposal's positions.
        prop (`list[int]`): the proposal; `q[k][j]` the draft's distribution `(V,)` its token k was drawn from.
    """
    out = []
    for k, x in enumerate(prop):
        p_k, q_k = p[k], q[k][j].to(p.device)
        if _uniform(generator) * float(q_k[x]) <= float(p_k[x]):  # u <= p/q without dividing by a zero q
            out.append(x)
            continue
        residual = (p_k - q_k).clamp_min(0)  # residual: [V]
        total = float(residual.sum())
        out.append(int(_draw((residual / total if total > 0 else p_k)[None], generator)[0]))
        return out
    out.append(int(_draw(p[len(prop)][None], generator)[0]))
    return out


def _vocab_size(model: PreTrainedModel) -> int:
    """Rows of the model's output embedding."""
    return model.get_output_embeddings().weight.shape[0]


def rsd_decode(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    options: RSDOptions,
    **model_kwargs,
) -> RSDGenerateOutput | torch.LongTensor:
    """Reward-guided speculative decoding of a batch of left-padded prompts.

    For each row and step i: the draft m writes ŷ_i from z_i, the PRM scores r_i = r(ŷ_i | z_i), the step is kept
    with probability ω(r_i) (Algorithm 2), otherwise the target M writes y_i from z_i. Rows decide and finish on
    their own; each model's cache is extended, never recomputed.

    Args:
        model (`PreTrainedModel`): the target M.
        input_ids (`torch.LongTensor` of shape `(B, P)`): prompts, left-padded.
        options (`RSDOptions`): draft, reward model and RSD settings.
    Returns:
        `RSDGenerateOutput` if `return_dict_in_generate`, else the `(B, P + new)` sequences.
    """
    o, target, draft, prm = options, model, options.draft, options.reward_model
    B, P = input_ids.shape
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)  # all ones: generate dropped it
    _check_config(generation_config, attention_mask, B, o)
    prompts = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
    max_new = generation_config.max_length - P
    s = sampling(generation_config, logits_processor, o.generator, target, draft)
    eos, pad = s.eos, s.pad
    user = user_criteria(stopping_criteria)
    rules = StepRules(step_separator(o.tokenizer, o.separator), o.max_step_tokens, user)
    problems = (
        list(o.reward_prompts)
        if o.reward_prompts is not None
        else o.tokenizer.batch_decode(prompts, skip_special_tokens=True)
    )
    if o.streamer is not None:
        o.streamer.put(input_ids.cpu())

    # static caches: every committed column, plus one step in flight (a row's step never exceeds its budget)
    capacity = P + max_new + min(o.max_step_tokens, max_new) + 64
    S = min(B, o.max_batch_size or B)  # slots: rows decoded at once; the other prompts wait in a queue
    target_path = fast_mode(o.fast_path, target)
    m = row_cache(draft, "draft", S, pad, fast_mode(o.fast_path, draft), capacity)
    M = row_cache(target, "target", S, pad, target_path, capacity)
    catch_up = catch_up_mode(o.catch_up, target_path)
    m.pending, M.pending = [list(p) for p in prompts[:S]], [list(p) for p in prompts[:S]]
    prm.start(problems[:S], fast_path=fast_mode(o.fast_path, prm.backbone), capacity=2 * max_new + 64)
    queue = list(range(S, B))  # original rows not started yet, in prompt order
    stats = RSDStats(steps=[[] for _ in range(B)])
    ctx = RowIds(input_ids.cpu(), pad)  # z_i per row, as processors and stopping criteria take it
    out = ctx.out  # committed new tokens per original row
    rows = torch.arange(S)  # rows: [R], original index of each active row

    sched = Scheduler(o.schedule)
    # RSD∘SD where each verified position can be checked (see speculation_possible)
    speculative = bool(o.speculative) and speculation_possible(s, rules)
    rejected_steps: dict[int, list[int]] = {}  # original row -> its rejected draft step, while it waits
    waiting = torch.zeros(S, dtype=torch.bool)  # waiting: [R], rows whose step was rejected, for the target to write

    while len(rows):
        R = len(rows)
        for c in (m, M, prm.state):  # a tick boundary: no provisional columns are pending a decision
            c.compact()
        budget = torch.tensor([max_new - len(out[i]) for i in rows.tolist()])  # budget: [R]
        done = torch.zeros(R, dtype=torch.bool)  # done: [R]
        t0 = sched.start()

        if sched.run_target(int(waiting.sum()), int((~waiting).sum())):
            # 4. rejected steps: the target writes y_i ~ M(· | z_i) after catching up on the accepted drafts
            if speculative:  # verifying the rejected step first, then the draft's proposals (greedy: exact)
                proposals = [
                    rejected_steps.pop(int(i), []) if w else [] for i, w in zip(rows, waiting.tolist(), strict=True)
                ]
                for j in waiting.nonzero().flatten().tolist():
                    m.pending[j] = []  # the draft holds the context (its rejected step left its cache)
                y = speculative_step(m, M, ctx, waiting, budget, s, rules, proposals, o.speculative)
                stop = torch.zeros(R, dtype=torch.bool)
            else:
                ride = ~waiting if catch_up == "along" else None  # the others catch up in the same forwards
                y, _, stop = decode_step(M, ctx, waiting, budget, s, rules, ride=ride)
            sched.done("target", t0)
            for j in waiting.nonzero().flatten().tolist():
                i, text = int(rows[j]), o.tokenizer.decode(y[j], skip_special_tokens=True)
                stats.steps[i].append(Step(text, len(y[j]), "target", None, True))
                if not speculative:
                    m.pending[j] = y[j]  # the draft catches up with its next step
                prm.replace(j, text)
                done[j] = _commit(out[i], y[j], bool(stop[j]), stats.steps[i], eos, max_new, o)
            waiting[:] = False
        else:
            drafting = ~waiting  # drafting: [R]
            # 1. draft step: ŷ_i ~ m(· | z_i)
            y_hat, m_start, stop_hat = decode_step(m, ctx, drafting, budget, s, rules)
            texts = [o.tokenizer.decode(y, skip_special_tokens=True) if d else None
                     for y, d in zip(y_hat, drafting.tolist(), strict=True)]  # fmt: skip

            # 2. reward: r_i = r(ŷ_i | z_i)
            r = prm.score(texts)  # r: [R], NaN for rows not drafting
            nan = torch.isnan(r) & drafting
            if nan.any():
                warnings.warn(
                    f"reward model returned NaN for {int(nan.sum())} step(s); counted as rejections", stacklevel=2
                )

            # 3. acceptance: keep ŷ_i with probability ω(r_i)
            omega = o.omega(r[drafting].nan_to_num(0.0))  # omega: [D]
            u = _acceptance_draws(omega, o.generator, rows[drafting])  # u: [D] or None
            accepted = torch.zeros(R, dtype=torch.bool)  # accepted: [R]
            accepted[drafting] = accept(omega, u) & ~nan[drafting]
            rejected = drafting & ~accepted
            m.drop_from(rejected, torch.full((R,), m_start))  # a rejected step leaves the draft's cache
            prm.decide(accepted)
            sched.done("draft", t0, float(accepted[drafting].float().mean()))

            # 5. commit the accepted steps; the rejected rows wait for the target
            for j in drafting.nonzero().flatten().tolist():
                i = int(rows[j])
                stats.steps[i].append(Step(texts[j], len(y_hat[j]), "draft", float(r[j]), bool(accepted[j])))
                if accepted[j]:
                    M.pending[j] += y_hat[j]  # the target catches up when it is next called
                    done[j] = _commit(out[i], y_hat[j], bool(stop_hat[j]), stats.steps[i], eos, max_new, o)
                elif speculative and not s.do_sample:
                    rejected_steps[i] = y_hat[j]  # the target's first proposal (greedy: the draft's own output)
            waiting |= rejected

        keep = (~done).nonzero().flatten()  # keep: [R']
        if len(keep) < R:
            for c in (m, M):
                c.keep(keep)
            prm.keep(keep)
            rows, waiting = rows[keep], waiting[keep]
        if queue and len(rows) < S:  # finished rows free their slots: the next prompts join
            new, queue = torch.tensor(queue[: S - len(rows)]), queue[S - len(rows) :]  # new: [N]
            for c in (m, M):
                c.add(new, [prompts[i] for i in new.tolist()])
            prm.add(new, [problems[i] for i in new.tolist()])
            rows, waiting = torch.cat([rows, new]), torch.cat([waiting, torch.zeros(len(new), dtype=torch.bool)])

    if o.streamer is not None:
        o.streamer.end()
    new, _ = pad_right(out, pad)  # new: [B, N], rows that finished early right-padded as in HF
    sequences = torch.cat([input_ids, new.to(input_ids.device)], 1)  # sequences: [B, P + N]
    if not generation_config.return_dict_in_generate:
        return sequences
    stats.prm_calls = prm.calls
    stats.ticks = dict(sched.ticks)
    stats.forward_tokens = {"draft": m.forward_tokens, "target": M.forward_tokens, "reward": prm.forward_tokens}
    stats.padded_tokens = {"draft": m.padded_tokens, "target": M.padded_tokens, "reward": prm.state.padded_tokens}
    stats.forward_calls = {"draft": m.forward_calls, "target": M.forward_calls, "reward": prm.state.forward_calls}
    stats.row_forward_tokens = {
        "draft": m.row_tokens.tolist(),
        "target": M.row_tokens.tolist(),
        "reward": prm.row_tokens,
    }
    stats.num_parameters = {
        "draft": draft.num_parameters(),
        "target": target.num_parameters(),
        "reward": prm.num_parameters,
    }
    return RSDGenerateOutput(sequences=sequences, rsd_stats=stats.as_dict())


def _commit(out: list[int], y: list[int], stop: bool, steps: list[Step], eos: torch.Tensor, max_new: int,
            o: RSDOptions) -> bool:  # fmt: skip
    """Append a step `y` to a row's output `out` (and the streamer); whether the row is now done (EOS, its token
    budget, a user stopping criterion, or `rsd_max_steps` committed steps)."""
    out += y
    if o.streamer is not None:
        o.streamer.put(torch.tensor(y))
    n_steps = sum(st.accepted for st in steps)
    return (
        bool(torch.isin(torch.tensor(y[-1:], dtype=torch.long), eos).any())
        or len(out) >= max_new
        or stop
        or (o.max_steps is not None and n_steps >= o.max_steps)
    )


def check_prompts(attention_mask: torch.Tensor) -> None:
    """Refuse empty prompts, naming the rows: `attention_mask` `(B, P)` (all ones when none was given)."""
    B = len(attention_mask)
    empty = (attention_mask.sum(1) == 0).nonzero().flatten().tolist() if attention_mask.numel() else list(range(B))
    if empty:
        raise ValueError(
            f"every prompt needs at least one token; row(s) {empty} of {B} are empty (no input_ids, or an "
            "attention_mask of all 0)"
        )


def _check_config(generation_config: GenerationConfig, attention_mask: torch.Tensor, B: int, o: RSDOptions) -> None:
    """Refuse settings RSD cannot honour, naming the value."""
    if generation_config.num_beams and generation_config.num_beams > 1:
        raise ValueError(f"RSD decodes one sequence per prompt; num_beams must be 1, got {generation_config.num_beams}")
    if (generation_config.num_return_sequences or 1) > 1:
        raise ValueError(
            f"RSD returns one sequence per prompt; num_return_sequences must be 1, got "
            f"{generation_config.num_return_sequences} (repeat the prompts instead)"
        )
    check_prompts(attention_mask)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "RSD needs left padding, but the attention_mask ends in 0 (right padding); set padding_side='left'"
        )
    if o.reward_prompts is not None and len(o.reward_prompts) != B:
        raise ValueError(f"reward_prompts must give one problem per row: got {len(o.reward_prompts)} for {B} rows")
    if isinstance(o.generator, list) and len(o.generator) != B:
        raise ValueError(f"rsd_generator as a list needs one generator per row: got {len(o.generator)} for {B} rows")
    if o.streamer is not None and B > 1:
        raise ValueError(f"a streamer takes one row; got a batch of {B}")
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            warnings.warn(f"{flag} is not supported by RSD and is ignored", stacklevel=3)
