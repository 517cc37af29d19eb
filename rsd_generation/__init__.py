"""Reward-Guided Speculative Decoding (Liao et al. 2025) as a transformers generation mode."""

from .decoding import RSDGenerateOutput, rsd_decode
from .fast import release_fast_caches
from .mixin import RSDGenerationMixin, with_rsd
from .rewards import (
    QwenPRM,
    RewardModel,
    SequenceClassificationRM,
    ValueHeadPRM,
    detect_kind,
    load_reward_format,
    load_reward_model,
)
from .speculative import speculative_generate
from .stats import RSDStats, Step
from .weighting import WEIGHTINGS, Budget, accept, binary, clip, constant, get_weighting, logistic, sigmoidal

__all__ = [
    "WEIGHTINGS",
    "Budget",
    "QwenPRM",
    "RSDGenerateOutput",
    "RSDGenerationMixin",
    "RSDStats",
    "RewardModel",
    "SequenceClassificationRM",
    "Step",
    "ValueHeadPRM",
    "accept",
    "binary",
    "clip",
    "constant",
    "detect_kind",
    "get_weighting",
    "load_reward_format",
    "load_reward_model",
    "logistic",
    "release_fast_caches",
    "rsd_decode",
    "sigmoidal",
    "speculative_generate",
    "with_rsd",
]
