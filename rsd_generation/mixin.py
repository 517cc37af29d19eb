"""`RSDGenerationMixin`: `generate(..., assistant_model=draft, reward_model=prm)` runs RSD; anything else is stock."""

from __future__ import annotations

import copy
import functools

import torch
from transformers import GenerationMixin, PreTrainedModel, StoppingCriteriaList

from .decoding import CATCH_UP, RSDOptions, check_prompts, rsd_decode, stop_string_criteria
from .fast import check_fast_path
from .rewards import RewardModel
from .schedule import Scheduler
from .weighting import DEFAULT_THRESHOLD, Budget, get_weighting

RSD_KWARGS = (
    "rsd_threshold",
    "rsd_budget",
    "rsd_weighting",
    "rsd_weighting_kwargs",
    "rsd_step_separator",
    "rsd_max_step_tokens",
    "rsd_max_steps",
    "reward_prompts",
    "rsd_generator",
    "rsd_fast_path",
    "rsd_schedule",
    "rsd_catch_up",
    "rsd_max_batch_size",
    "rsd_speculative",
)
# vocabularies that differ by at most this many rows are taken as one tokenizer with padded embeddings
MAX_VOCAB_PADDING = 1024


class RSDGenerationMixin(GenerationMixin):
    """Adds reward-guided speculative decoding to `generate`.

    Without `reward_model`, `generate` is transformers' own (assisted generation included).
    """

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, reward_model=None, **kwargs):
        r"""Generate, with RSD when `reward_model` is given.

        Args:
            reward_model (`RewardModel`, *optional*): from `rsd.load_reward_model`; enables RSD, with the draft
                given as `assistant_model` and the target being this model.
            rsd_threshold (`float`, default 0.7): δ of the binary and logistic weightings, p of the constant one.
            rsd_budget (`float`, *optional*): instead of δ, the largest share γ of steps the target may write; δ is
                then chosen online, a binary weighting's (`weighting.Budget`), over all rows of the call.
            rsd_weighting (`str` or `Callable`, default `"binary"`): `"binary"`, `"constant"`, `"clip"`,
                `"sigmoidal"`, `"logistic"`, or a callable mapping rewards `(R,)` to ω in [0, 1].
            rsd_weighting_kwargs (`dict`, *optional*): `alpha` for logistic, `p` for constant.
            rsd_step_separator (`str`, default `"\n\n"`): text that ends a step (matched on text, not tokens).
            rsd_max_step_tokens (`int`, default 512): a step also ends after this many tokens.
            rsd_max_steps (`int`, *optional*): a row stops after this many committed steps.
            reward_prompts (`list[str]`, *optional*): the problem text the PRM sees per row; default: the decoded
                prompt.
            rsd_generator (`torch.Generator` or `list[torch.Generator]`, *optional*): RNG for sampling and acceptance
                draws; a list gives each row its own stream (one per prompt), so a sampled row is what it is alone
                with that generator.
            rsd_fast_path (`str` or `bool`, default `"auto"`): `"auto"` (CUDA graphs for supported models on a GPU,
                else the plain path), `"off"` (dynamic caches, eager forwards), `"static"` (fixed-shape caches,
                eager), `"graphs"` (fixed-shape caches, CUDA-graph-captured forwards) or `"compile"` (as graphs,
                with the one-token forward compiled by `torch.compile` first).
            rsd_schedule (`str` or `int`, default `"eager"`): when the target runs in a batch: `"eager"` (as soon as
                a row's step is rejected; rows move in lockstep), an int k (once k rows wait, the others drafting
                on meanwhile) or `"throughput"` (when the target would commit steps at least as fast as the draft,
                by measured tick times). Outputs do not depend on it (greedy); speed does.
            rsd_catch_up (`str`, default `"auto"`): how the target catches up on a row's accepted draft steps:
                `"lazy"` (in one chunk, when it next writes a step of that row) or `"along"` (one token in each of
                the forwards it runs for other rows' steps: no chunk padded to the longest queue, but it also reads
                steps of rows it may never write for); `"auto"`: along on the CUDA-graph paths, lazy elsewhere.
                Outputs do not depend on it; speed and the target's token count (and FLOPs) do. Where
                `rsd_speculative` regenerates the rejected steps, the catch-up stays lazy.
            rsd_max_batch_size (`int`, *optional*): decode at most this many rows at once; the other prompts wait
                in a queue and take the place of rows that finish (outputs keep the prompts' order).
            rsd_speculative (`int`, default 0): γ > 0 regenerates rejected steps by speculative decoding (paper §4):
                the target verifies the rejected step in one forward and keeps the prefix it agrees with, then the
                draft proposes γ tokens at a time. Greedy decoding without logits processors or user stopping
                criteria only (otherwise the target writes alone); the tokens are the same either way.
            kwargs: everything `GenerationMixin.generate` takes (`tokenizer` is required with `reward_model`).
        Returns:
            `RSDGenerateOutput` (`sequences`, `rsd_stats`) with `return_dict_in_generate=True`, else the sequences.
        """
        rsd = {k: kwargs.pop(k) for k in RSD_KWARGS if k in kwargs}
        if reward_model is None:
            if rsd:
                raise ValueError(f"{', '.join(sorted(rsd))} only apply with reward_model=; none was given")
            return super().generate(inputs, generation_config, **kwargs)
        draft = kwargs.pop("assistant_model", None)
        options = _rsd_options(self, draft, reward_model, kwargs, rsd)
        check_inputs(inputs, kwargs)
        generation_config = _take_stop_strings(generation_config, kwargs, options.tokenizer)
        loop = functools.partial(rsd_decode, options=options)
        return super().generate(inputs, generation_config, custom_generate=loop, **kwargs)


def check_inputs(inputs: torch.Tensor | None, kwargs: dict) -> None:
    """Refuse empty prompts before `generate` runs (it fails on them with an IndexError of its own)."""
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.ndim == 2:
        mask = kwargs.get("attention_mask")
        check_prompts(mask if isinstance(mask, torch.Tensor) else torch.ones_like(ids))


def _take_stop_strings(generation_config, kwargs: dict, tokenizer):
    """Turn `stop_strings` into a `StopStringCriteria` ourselves: generate drops the tokenizer it needs when
    `custom_generate` is a callable. Returns the generation config without stop strings."""
    stop = kwargs.pop("stop_strings", None)
    if generation_config is not None and generation_config.stop_strings:
        generation_config = copy.deepcopy(generation_config)
        stop, generation_config.stop_strings = stop or generation_config.stop_strings, None
    if stop:
        user = list(kwargs.get("stopping_criteria") or [])
        kwargs["stopping_criteria"] = StoppingCriteriaList([*user, stop_string_criteria(tokenizer, stop)])
    return generation_config


def _rsd_options(target: PreTrainedModel, draft, reward_model, kwargs: dict, rsd: dict) -> RSDOptions:
    """Validate RSD's inputs once, at the boundary; pops what generate must not see (`streamer`)."""
    if draft is None:
        raise ValueError("reward_model= needs the draft model as assistant_model=; got none")
    if not isinstance(reward_model, RewardModel):
        raise ValueError(
            f"reward_model must be a RewardModel from rsd.load_reward_model(...), got {type(reward_model).__name__}"
        )
    if not isinstance(draft, PreTrainedModel) or draft.get_output_embeddings() is None:
        raise ValueError(
            f"assistant_model must be a causal LM with an output head (AutoModelForCausalLM), got "
            f"{type(draft).__name__}; a reward model's backbone cannot draft: load the checkpoint as a causal LM"
        )
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        raise ValueError("RSD needs tokenizer= (the policies' tokenizer) to find step boundaries and talk to the PRM")
    _check_shared_vocab(target, draft, tokenizer, kwargs.pop("assistant_tokenizer", None))
    threshold = rsd.get("rsd_threshold", DEFAULT_THRESHOLD)
    if rsd.get("rsd_budget") is not None:
        given = [k for k in ("rsd_threshold", "rsd_weighting", "rsd_weighting_kwargs") if rsd.get(k) is not None]
        if given:
            raise ValueError(f"rsd_budget chooses a binary weighting's δ itself; drop {', '.join(given)}")
        omega = Budget(rsd["rsd_budget"])
    else:
        omega = get_weighting(rsd.get("rsd_weighting", "binary"), threshold, **(rsd.get("rsd_weighting_kwargs") or {}))
    separator = rsd.get("rsd_step_separator", "\n\n")
    if not isinstance(separator, str) or not separator:
        raise ValueError(f"rsd_step_separator must be a non-empty string, got {separator!r}")
    max_step_tokens = check_int("rsd_max_step_tokens", rsd.get("rsd_max_step_tokens", 512), 1)
    max_steps = check_int("rsd_max_steps", rsd.get("rsd_max_steps"), 1, optional=True)
    generator = rsd.get("rsd_generator")
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            bad = next(type(g).__name__ for g in generator if not isinstance(g, torch.Generator))
            raise ValueError(f"rsd_generator must be a torch.Generator or a list of them, got a list holding {bad}")
        generator = list(generator)  # one per row (checked against the batch size in the loop)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"rsd_generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    check_fast_path(rsd.get("rsd_fast_path", "auto"), target)
    schedule = Scheduler(rsd.get("rsd_schedule", "eager")).policy  # validates the value, naming it
    catch_up = rsd.get("rsd_catch_up", "auto")
    if catch_up not in CATCH_UP:
        raise ValueError(f"rsd_catch_up must be one of {CATCH_UP}, got {catch_up!r}")
    max_batch_size = check_int("rsd_max_batch_size", rsd.get("rsd_max_batch_size"), 1, optional=True)
    speculative = check_int("rsd_speculative", rsd.get("rsd_speculative", 0), 0, what=" (γ, 0: off)")
    reward_prompts = rsd.get("reward_prompts")
    if reward_prompts is not None and (
        isinstance(reward_prompts, str) or not all(isinstance(p, str) for p in reward_prompts)
    ):
        raise ValueError(
            f"reward_prompts must be a list of strings, one problem per row; got {type(reward_prompts).__name__}"
            + (f" {reward_prompts[:40]!r}" if isinstance(reward_prompts, str) else "")
        )
    return RSDOptions(
        draft=draft,
        reward_model=reward_model,
        tokenizer=tokenizer,
        omega=omega,
        separator=separator,
        max_step_tokens=max_step_tokens,
        max_steps=max_steps,
        reward_prompts=reward_prompts,
        streamer=kwargs.pop("streamer", None),
        generator=generator,
        fast_path=rsd.get("rsd_fast_path", "auto"),
        schedule=schedule,
        catch_up=catch_up,
        max_batch_size=max_batch_size,
        speculative=speculative,
    )


def _check_shared_vocab(target: PreTrainedModel, draft: PreTrainedModel, tokenizer, assistant_tokenizer) -> None:
    """Draft and target must share a tokenizer; vocabularies may differ by embedding padding only."""
    if assistant_tokenizer is not None and assistant_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError("draft and target must share a tokenizer, but assistant_tokenizer differs from tokenizer")
    vt = target.config.get_text_config().vocab_size
    vd = draft.config.get_text_config().vocab_size
    if vt == vd:
        return
    n = len(tokenizer)
    if min(vt, vd) < n or abs(vt - vd) > MAX_VOCAB_PADDING:
        raise ValueError(
            f"draft and target must share a tokenizer: vocab sizes {vd} (draft) and {vt} (target) differ by more than "
            f"padding (allowed: both >= the tokenizer's {n} tokens, at most {MAX_VOCAB_PADDING} apart)"
        )


@functools.cache
def _rsd_class(cls: type) -> type:
    """`cls` with `RSDGenerationMixin` in front, keeping `cls`'s name (save_pretrained writes it to config)."""
    return type(
        cls.__name__, (RSDGenerationMixin, cls), {"__qualname__": cls.__qualname__, "__module__": cls.__module__}
    )


def with_rsd(model: PreTrainedModel) -> PreTrainedModel:
    """Mix `RSDGenerationMixin` into a loaded model's class, in place (idempotent); returns the model."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"with_rsd takes a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(model, RSDGenerationMixin):
        model.__class__ = _rsd_class(type(model))
    return model


def check_int(name: str, value, minimum: int, optional: bool = False, what: str = "") -> int | None:
    """`value` if it is an int >= `minimum` (a bool is not; None too when `optional`), else a ValueError naming it."""
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        allowed = f"{'None or ' if optional else ''}an int >= {minimum}{what}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value
