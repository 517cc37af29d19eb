"""Tiny models and a tiny tokenizer for tests and the demo (no hub access needed)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from .mixin import with_rsd

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level BPE with merged tokens "\\n\\n" and ".\\n\\n" (as Qwen has), Qwen-like specials, left padding."""
    chars = list(string.ascii_letters + string.digits + " .,+-*/=()?:\n")
    vocab = {t: i for i, t in enumerate([*SPECIALS, *chars, "\n\n", ".\n\n"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "\n"), (".", "\n\n")]))
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


def tiny_config(kind: str, vocab: int, **overrides) -> Qwen2Config | LlamaConfig:
    """A picollama-sized config (hidden 32, 2 layers) of `kind` "qwen2" or "llama"."""
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
    base.update(overrides)
    return (Qwen2Config if kind == "qwen2" else LlamaConfig)(**base)


def make_lm(kind: str, vocab: int, seed: int, **overrides) -> Qwen2ForCausalLM | LlamaForCausalLM:
    """A tiny random causal LM with RSD mixed in, eval mode, float32.

    The output layer is scaled up so that greedy choices have clear margins and sampling is far from uniform.
    """
    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM
    model = cls(tiny_config(kind, vocab, **overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return with_rsd(model)


def make_qwen3(vocab: int, seed: int = 4) -> Qwen3ForCausalLM:
    """A tiny random Qwen3 (per-head q/k norms) with grouped-query attention, eval mode, float32."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return Qwen3ForCausalLM(cfg).eval()


def save_value_head_prm(path: Path, tok, seed: int = 5, architecture: str = "Qwen2ForPrmModel") -> Path:
    """Write a tiny PRM checkpoint in Skywork's layout: Qwen2 weights + `v_head.summary` in the safetensors."""
    path = Path(path)
    make_lm("qwen2", len(tok), seed=seed, tie_word_embeddings=False).save_pretrained(path)
    tok.save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    weights["v_head.summary.weight"] = torch.randn(1, 32, generator=g)
    weights["v_head.summary.bias"] = torch.randn(1, generator=g)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    set_architecture(path, architecture)
    return path


def save_qwen_prm(path: Path, tok, seed: int = 6) -> Path:
    """Write a tiny PRM checkpoint in Qwen2.5-Math-PRM's layout: backbone + `score` Linear-ReLU-Linear(H, 2)."""
    path = Path(path)
    make_lm("qwen2", len(tok), seed=seed).model.save_pretrained(path)
    tok.save_pretrained(path)
    weights = {f"model.{k}": v for k, v in load_file(path / "model.safetensors").items()}
    g = torch.Generator().manual_seed(seed)
    weights["score.0.weight"] = torch.randn(32, 32, generator=g) * 0.3
    weights["score.0.bias"] = torch.randn(32, generator=g) * 0.1
    weights["score.2.weight"] = torch.randn(2, 32, generator=g) * 0.3
    weights["score.2.bias"] = torch.randn(2, generator=g) * 0.1
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    set_architecture(path, "Qwen2ForProcessRewardModel")
    return path


def set_architecture(path: Path, architecture: str) -> None:
    """Rewrite config.json's `architectures` (checkpoints of PRMs name classes transformers lacks)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg["architectures"] = [architecture]
    (Path(path) / "config.json").write_text(json.dumps(cfg, indent=2))
