"""Skywork-layout value-head PRMs (architecture `Qwen2ForPrmModel`, head `v_head.summary` in the safetensors) as
vLLM pooling models, so that `vllm serve <Skywork PRM>` works with no edited config.

vLLM imports this module through the registry entry `register` adds (the `vllm.general_plugins` entry point of
this package); nothing here is imported without vLLM. Per token, the pooling endpoint returns the value head's
output; the reward of a step is its sigmoid at the step token, as `ValueHeadPRM` computes it in process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.pooler.tokwise import pooler_for_token_classify
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.interfaces_base import default_pooling_type
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors


@default_pooling_type(tok_pooling_type="ALL")
class Qwen2ForPrmModel(nn.Module, SupportsPP):
    """A Qwen2 body and Skywork's value head `v_head.summary` (Linear(H, 1)): one output per token."""

    is_pooling_model = True
    hf_to_vllm_mapper = Qwen2Model.hf_to_vllm_mapper
    packed_modules_mapping: ClassVar[dict] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        config.num_labels = 1
        self.model = Qwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.head_dtype = vllm_config.model_config.head_dtype
        self.v_head = nn.Module()
        self.v_head.summary = nn.Linear(config.hidden_size, 1, dtype=self.head_dtype)
        self.pooler = pooler_for_token_classify(vllm_config.model_config.pooler_config)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings."""
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """The value head's output at every token, `(T, 1)`."""
        hidden = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        if isinstance(hidden, IntermediateTensors):
            return hidden
        return self.v_head.summary(hidden.to(self.head_dtype))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The body and the value head; the checkpoint's LM head is not used."""
        return AutoWeightsLoader(self, ignore_unexpected_prefixes=["lm_head."]).load_weights(weights)
