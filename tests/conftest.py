"""Tiny random models and a tiny tokenizer, built in fixtures (CPU, seconds)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import rsd_generation as rsd

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level BPE with merged tokens "\\n\\n" and ".\\n\\n" (as Qwen has), left padding."""
    chars = list(string.ascii_letters + string.digits + " .,+-*/=()?:\n")
    vocab = {t: i for i, t in enumerate(SPECIALS + chars + ["\n\n", ".\n\n"])}
    merges = [("\n", "\n"), (".", "\n\n")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<extra_0>"],
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def tiny_config(kind: str, vocab: int, seed: int, **kw):
    """Config of a picollama-sized model (hidden 32, 2 layers)."""
    base = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    base.update(kw)
    return (Qwen2Config if kind == "qwen2" else LlamaConfig)(**base)


def make_lm(kind: str, vocab: int, seed: int, **kw):
    """A tiny random causal LM with RSD mixed in, eval mode, float32."""
    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM
    model = cls(tiny_config(kind, vocab, seed, **kw)).eval()
    # sharpen the output distribution so greedy ties are impossible and sampling is not uniform
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return rsd.with_rsd(model)


@pytest.fixture(scope="session")
def qwen_pair(tok):
    """(target, draft): two different tiny Qwen2 models sharing the tokenizer."""
    return make_lm("qwen2", len(tok), seed=1, hidden_size=48), make_lm("qwen2", len(tok), seed=2)


@pytest.fixture(scope="session")
def llama_pair(tok):
    """(target, draft): two different tiny Llama models sharing the tokenizer."""
    return make_lm("llama", len(tok), seed=3, hidden_size=48), make_lm("llama", len(tok), seed=4)


def save_value_head_prm(path: Path, tok, seed: int = 5, architecture: str = "Qwen2ForPrmModel") -> Path:
    """A tiny PRM checkpoint in Skywork's layout: Qwen2 weights + `v_head.summary` in the safetensors."""
    model = make_lm("qwen2", len(tok), seed=seed, tie_word_embeddings=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    weights["v_head.summary.weight"] = torch.randn(1, 32, generator=g)
    weights["v_head.summary.bias"] = torch.randn(1, generator=g)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    _set_architecture(path, architecture)
    return path


def save_qwen_prm(path: Path, tok, seed: int = 6) -> Path:
    """A tiny PRM checkpoint in Qwen2.5-Math-PRM's layout: backbone + `score` Linear-ReLU-Linear(H, 2)."""
    model = make_lm("qwen2", len(tok), seed=seed)
    model.model.save_pretrained(path)
    tok.save_pretrained(path)
    weights = {f"model.{k}": v for k, v in load_file(path / "model.safetensors").items()}
    g = torch.Generator().manual_seed(seed)
    weights["score.0.weight"] = torch.randn(32, 32, generator=g) * 0.3
    weights["score.0.bias"] = torch.randn(32, generator=g) * 0.1
    weights["score.2.weight"] = torch.randn(2, 32, generator=g) * 0.3
    weights["score.2.bias"] = torch.randn(2, generator=g) * 0.1
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    _set_architecture(path, "Qwen2ForProcessRewardModel")
    return path


def _set_architecture(path: Path, architecture: str) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = [architecture]
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def skywork_path(tmp_path_factory, tok) -> Path:
    return save_value_head_prm(tmp_path_factory.mktemp("skywork"), tok)


@pytest.fixture(scope="session")
def qwen_prm_path(tmp_path_factory, tok) -> Path:
    return save_qwen_prm(tmp_path_factory.mktemp("qwenprm"), tok)


@pytest.fixture(scope="session")
def prm(skywork_path, tok):
    return rsd.load_reward_model(skywork_path, tokenizer=tok)


def encode(tok, prompts: list[str]):
    """Left-padded batch."""
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


PROMPTS = ["1+2=", "12*3+45-6=", "7*8="]  # different lengths: the batch is left-padded


def rsd_generate(target, draft, prm, tok, prompts, **kw):
    """RSD on `prompts` with short fixed-length steps (random models rarely write the separator)."""
    kw.setdefault("max_new_tokens", 24)
    kw.setdefault("rsd_max_step_tokens", 4)
    kw.setdefault("do_sample", False)
    return target.generate(
        **encode(tok, prompts),
        tokenizer=tok,
        assistant_model=draft,
        reward_model=prm,
        return_dict_in_generate=True,
        **kw,
    )


def median_reward(target, draft, prm, tok, prompts) -> float:
    """A threshold that splits the draft's step rewards in two (so both branches run)."""
    out = rsd_generate(target, draft, prm, tok, prompts, rsd_threshold=0.0)
    rewards = sorted(s["reward"] for row in out.rsd_stats["steps"] for s in row)
    return rewards[len(rewards) // 2]
