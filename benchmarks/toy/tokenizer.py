"""The toy models' tokenizer: a byte-level BPE with Qwen2's exact pipeline, trained on toy solutions.

transformers loads any checkpoint whose config says `qwen2` with its own `Qwen2Tokenizer`, which rebuilds the
pipeline (NFC, Qwen's split regex, byte-level) around the saved vocabulary and merges. Building the toy tokenizer
with the same pipeline makes `AutoTokenizer.from_pretrained(toy_model_dir)` tokenize exactly as it was trained.
Digits stay single tokens (as in Qwen), and "\\n\\n" becomes one token.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from .task import problems

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus(seed: int = 12345, n: int = 2000) -> list[str]:
    """Prompts and reference solutions of every level, the text the BPE merges are learned from."""
    return [p.prompt + p.solution() for p in problems(seed, n)]


def build_toy_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train the toy tokenizer (deterministic: a fixed corpus); EOS and padding are `<|endoftext|>`, as in Qwen."""
    tk = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",
    )
