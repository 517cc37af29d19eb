"""Fused QKV and gate/up projections (`rsd_generation.fused`): the same outputs as the model's own forward, no
weight stored twice, the model unchanged for everything else, and a model whose parameters were replaced laid out
again."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from rsd_generation.fast import row_cache
from rsd_generation.fused import fused_layout, grouped_attention, why_not_fused
from rsd_generation.kv import RowCache, causal_lm_forward, pad_right
from rsd_generation.testing import make_lm, make_qwen3

MODELS = {
    "qwen2": lambda v: make_lm("qwen2", v, seed=1),  # q/k/v biases
    "llama": lambda v: make_lm("llama", v, seed=2, mlp_bias=True),  # gate/up biases
    "qwen3": make_qwen3,
}


@pytest.mark.parametrize("kind", MODELS)
def test_fused_forwards_give_the_models_own_outputs(tok, kind):
    """Prompts, a rejected step, and one-token steps over a fused static cache give what a dynamic cache through
    the model's own forward gives, row for row."""
    model = MODELS[kind](len(tok))
    plain = RowCache(causal_lm_forward(model), model.config, 3, torch.device("cpu"))
    fused = row_cache(model, f"fused-test-{kind}", 3, 0, "static", 64)
    assert fused.fused is not None and len(fused.fused) == model.config.num_hidden_layers
    chunks = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    for c in (plain, fused):
        c.feed(*pad_right(chunks, 0))
        c.feed(torch.tensor([[20, 21], [22, 23], [24, 25]]), torch.ones(3, 2, dtype=torch.bool))
        c.drop_from(torch.tensor([True, False, True]), torch.full((3,), c.length - 2))
    for t in range(3):
        ids = torch.tensor([[30 + t], [40 + t], [50 + t]])
        a = plain.feed(ids, torch.ones(3, 1, dtype=torch.bool))
        b = fused.feed(ids, torch.ones(3, 1, dtype=torch.bool))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_parameters_become_views_and_the_model_is_unchanged(tok, tmp_path):
    model = make_lm("qwen2", len(tok), seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logits = model(input_ids=ids).logits
    layers = fused_layout(model.model)
    attn, mlp, f = model.model.layers[0].self_attn, model.model.layers[0].mlp, layers[0]
    storage = f.qkv.untyped_storage().data_ptr()
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight):
        assert p.untyped_storage().data_ptr() == storage  # one copy of the weights
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == f.gate_up.untyped_storage().data_ptr()
    assert attn.q_proj.bias.untyped_storage().data_ptr() == f.qkv_bias.untyped_storage().data_ptr()
    assert fused_layout(model.model) is layers  # laid out once
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(model(input_ids=ids).logits, logits)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for k, v in again.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_replaced_parameters_are_laid_out_again(tok):
    """After `.to(dtype)` the parameters are new tensors: the layout and a kept cache follow them."""
    model = make_lm("qwen2", len(tok), seed=8)
    cache = row_cache(model, "fused-refresh", 1, 0, "static", 64)
    old = cache.fused
    model.to(torch.float64)
    cache = row_cache(model, "fused-refresh", 1, 0, "static", 64)  # the kept cache, reset
    assert cache.fused is not old and cache.fused[0].qkv.dtype == torch.float64
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == cache.fused[0].qkv.untyped_storage().data_ptr()


def test_layers_that_do_not_fit_keep_the_models_forward(tok):
    model = make_lm("qwen2", len(tok), seed=9)
    model.model.layers[1].mlp.up_proj.bias = torch.nn.Parameter(torch.zeros(model.config.intermediate_size))
    assert "differ in dtype, device or bias" in why_not_fused(model.model)
    assert fused_layout(model.model) is None
    assert row_cache(model, "fused-none", 1, 0, "static", 64).fused is None
    hooked = make_lm("qwen2", len(tok), seed=9)
    hooked.model.layers[0].self_attn.k_proj._hf_hook = object()  # as accelerate's dispatch_model marks a module
    assert "dispatched by accelerate" in why_not_fused(hooked.model)


@pytest.mark.parametrize("G", [1, 3])
def test_grouped_attention_equals_attention_over_repeated_keys(G):
    """Grouping the queries that share a key/value head gives what repeating each key and value G times gives."""
    g = torch.Generator().manual_seed(0)
    N, Hkv, W, C, D = 2, 2, 3, 8, 4
    q = torch.randn(N, Hkv * G, W, D, generator=g)
    keys, values = torch.randn(N, Hkv, C, D, generator=g), torch.randn(N, Hkv, C, D, generator=g)
    allowed = torch.rand(N, 1, W, C, generator=g) < 0.7
    allowed[..., 0] = True
    mask = torch.zeros(N, 1, W, C).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = F.scaled_dot_product_attention(
        q, keys.repeat_interleave(G, 1), values.repeat_interleave(G, 1), attn_mask=mask, scale=0.3
    )
    masks: dict = {}
    torch.testing.assert_close(grouped_attention(q, keys, values, mask, 0.3, masks), ref, rtol=1e-5, atol=1e-5)
    assert (G in masks) == (G > 1)  # the grouped mask is built once per forward


def test_unfuse_gives_the_parameters_their_own_storage(tok, tmp_path):
    """safetensors' save_model refuses parameters that share a buffer none covers; after `unfuse` it saves the same
    values, and the next layout fuses again."""
    from safetensors.torch import load_file, save_model

    from rsd_generation.fused import unfuse

    model = make_lm("qwen2", len(tok), seed=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused_layout(model.model)
    with pytest.raises(RuntimeError):
        save_model(model, str(tmp_path / "fused.safetensors"))
    unfuse(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    save_model(model, str(tmp_path / "own.safetensors"))
    saved = load_file(tmp_path / "own.safetensors")
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"} <= set(saved)
    for k, v in before.items():  # (save_model leaves out a tied head)
        assert torch.equal(saved.get(k, v), v), k
    assert fused_layout(model.model) is not None  # laid out again on the next use
