"""The `vllm.general_plugins` entry point of rsd-generation: registers the Skywork PRM layout with vLLM."""

from __future__ import annotations

ARCHITECTURE = "Qwen2ForPrmModel"


def register() -> None:
    """Make vLLM serve `Qwen2ForPrmModel` checkpoints (Skywork-o1-Open-PRM's layout) as pooling models."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "rsd_generation.vllm_prm:Qwen2ForPrmModel")
