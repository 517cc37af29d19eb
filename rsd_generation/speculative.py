"""Batched speculative decoding (greedy, lossless): the baseline RSD is measured against, on the same caches.

transformers' assisted generation refuses batches. Here each row proposes, verifies and finishes on its own: the
draft proposes γ tokens, the target verifies them in one forward and keeps the prefix it agrees with plus its own
next token (`decoding.speculative_step`, the step being the whole answer).
"""

from __future__ import annotations

import functools

import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList

from .decoding import (
    RowIds,
    RSDGenerateOutput,
    StepRules,
    check_prompts,
    decode_step,
    sampling,
    speculation_possible,
    speculative_step,
    user_criteria,
)
from .fast import check_fast_path, fast_mode, row_cache
from .kv import pad_right
from .mixin import check_inputs, check_int


def speculative_generate(
    target: PreTrainedModel, draft: PreTrainedModel, inputs: torch.Tensor | None = None, gamma: int = 4,
    fast_path: str | bool = "auto", **kwargs,
):  # fmt: skip
    """Speculative decoding of a batch: `target.generate(...)` with `draft` proposing `gamma` tokens at a time.

    Greedy decoding gives the target's own tokens (tested against `target.generate`); sampling follows the
    speculative sampling rule, so samples are distributed as the target's (temperature, top-k, top-p, min-p).
    With other logits processors or user stopping criteria the target decodes alone (same caches, no draft).

    Args:
        target, draft (`PreTrainedModel`): causal LMs sharing a tokenizer.
        inputs, kwargs: as for `generate` (`input_ids`, `attention_mask`, `max_new_tokens`, ...).
        gamma (`int`): tokens the draft proposes per target forward (>= 1).
        fast_path (`str` or `bool`): as `rsd_fast_path`.
    Returns:
        the sequences `(B, P + N)`, or with `return_dict_in_generate=True` an `RSDGenerateOutput` whose `rsd_stats`
        hold `forward_calls`, `forward_tokens` and `num_parameters` per model, and per row `row_forward_tokens`
        (per model), `row_target_forwards` and `row_draft_tokens`.
    """
    check_int("gamma", gamma, 1, what=" (tokens proposed per target forward)")
    if not isinstance(draft, PreTrainedModel) or draft.get_output_embeddings() is None:
        raise ValueError(f"draft must be a causal LM with an output head, got {type(draft).__name__}")
    check_fast_path(fast_path, target)
    check_inputs(inputs, kwargs)
    loop = functools.partial(sd_decode, draft=draft, gamma=gamma, fast_path=fast_path)
    return GenerationMixin.generate(target, inputs, custom_generate=loop, **kwargs)


def sd_decode(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    draft: PreTrainedModel,
    gamma: int,
    fast_path: str | bool = "auto",
    **model_kwargs,
) -> RSDGenerateOutput | torch.LongTensor:
    """The `custom_generate` loop of `speculative_generate`: prompts `(B, P)`, left-padded."""
    B, P = input_ids.shape
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    check_prompts(mask)
    prompts = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), mask.cpu(), strict=True)]
    max_new = generation_config.max_length - P
    s = sampling(generation_config, logits_processor, None, model, draft)
    rules = StepRules(None, max_new, user_criteria(stopping_criteria))  # the whole answer is one "step"
    capacity = P + max_new + gamma + 64
    M = row_cache(model, "target", B, s.pad, fast_mode(fast_path, model), capacity)
    M.pending = [list(p) for p in prompts]
    ctx = RowIds(input_ids.cpu(), s.pad)
    rows, budget = torch.ones(B, dtype=torch.bool), torch.full((B,), max_new)
    m, work = None, {}
    if not speculation_possible(s, rules):  # not verifiable token by token: the target alone
        new, _, _ = decode_step(M, ctx, rows, budget, s, rules)
        work = {"verifications": [len(y) for y in new], "proposed": [0] * B}  # one target forward per token
    else:
        m = row_cache(draft, "draft", B, s.pad, fast_mode(fast_path, draft), capacity)
        m.pending = [list(p) for p in prompts]
        new = speculative_step(m, M, ctx, rows, budget, s, rules, [[] for _ in range(B)], gamma, work)
    out, _ = pad_right(new, s.pad)  # out: [B, N], rows that ended early right-padded as in HF
    sequences = torch.cat([input_ids, out.to(input_ids.device)], 1)  # sequences: [B, P + N]
    if not generation_config.return_dict_in_generate:
        return sequences
    caches = {"target": M} if m is None else {"draft": m, "target": M}
    stats = {
        "forward_calls": {k: c.forward_calls for k, c in caches.items()},
        "forward_tokens": {k: c.forward_tokens for k, c in caches.items()},
        "num_parameters": {"draft": draft.num_parameters(), "target": model.num_parameters()},
        # per row: positions each model processed, target forwards it took part in, draft tokens proposed for it
        "row_forward_tokens": {k: c.row_tokens.tolist() for k, c in caches.items()},
        "row_target_forwards": work["verifications"],
        "row_draft_tokens": work["proposed"],
    }
    return RSDGenerateOutput(sequences=sequences, rsd_stats=stats)
