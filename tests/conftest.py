"""Tiny random models and a tiny tokenizer, built in fixtures (CPU, seconds)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import rsd_generation as rsd
from rsd_generation.testing import build_tokenizer, make_lm, save_qwen_prm, save_value_head_prm

# rsd-bench grades with math-verify (the [bench] extra); where it is missing (the GPU image) its tests skip, saying so
NEEDS_BENCH = pytest.mark.skipif(
    importlib.util.find_spec("math_verify") is None,
    reason="needs the [bench] extra (math-verify, which rsd-bench grades with): pip install 'rsd-generation[bench]'",
)


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def qwen_pair(tok):
    """(target, draft): two different tiny Qwen2 models sharing the tokenizer."""
    return make_lm("qwen2", len(tok), seed=1, hidden_size=48), make_lm("qwen2", len(tok), seed=2)


@pytest.fixture(scope="session")
def llama_pair(tok):
    """(target, draft): two different tiny Llama models sharing the tokenizer."""
    return make_lm("llama", len(tok), seed=3, hidden_size=48), make_lm("llama", len(tok), seed=4)


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
        **encode(tok, prompts).to(target.device),
        tokenizer=tok,
        assistant_model=draft,
        reward_model=prm,
        return_dict_in_generate=True,
        **kw,
    )


class EndRowZeroEarly:
    """A logits processor that forces EOS as row 0's 3rd new token; rows are told apart by their prompt."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for r, ids in enumerate(input_ids.tolist()):
            text = self.tok.decode(ids, skip_special_tokens=True)
            if text.startswith(PROMPTS[0]) and len(text) - len(PROMPTS[0]) >= 2:
                scores[r] = -float("inf")
                scores[r, self.tok.eos_token_id] = 0.0
        return scores


def median_reward(target, draft, prm, tok, prompts) -> float:
    """A threshold that splits the draft's step rewards in two (so both branches run), halfway between two of them:
    a threshold equal to a reward would let paths that round differently decide that step differently."""
    out = rsd_generate(target, draft, prm, tok, prompts, rsd_threshold=0.0)
    rewards = sorted(s["reward"] for row in out.rsd_stats["steps"] for s in row)
    k = len(rewards) // 2
    return (rewards[k - 1] + rewards[k]) / 2 if k else rewards[0]


def skywork_reference(
    tok, backbone, v_head: dict, problem: str, steps: list[str], reference: bool = False
) -> list[float]:
    """Value-head rewards computed directly: one forward of the whole text, sigmoid(v_head(h)) at step tokens.

    Input: `bos + problem + "\\n"`, then each step tokenized on its own followed by the step token. Skywork's README
    format: the stripped step and the "\\n" token; with `reference`, the RSD reference's (`prepare_input` with
    `step_token="\\n\\n"`): the response split at "\\n\\n", each piece as it is, then the "\\n\\n" token.
    """
    step_id = tok.encode("\n\n" if reference else "\n", add_special_tokens=False)[-1]
    ids = tok.encode(tok.bos_token + problem + "\n", add_special_tokens=False)
    positions = []
    pieces = "".join(steps).split("\n\n") if reference else [s.strip() for s in steps]
    for piece in [p for p in pieces if p] if reference else pieces:
        ids += [*tok.encode(piece, add_special_tokens=False), step_id]
        positions.append(len(ids) - 1)
    with torch.no_grad():
        h = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, positions]
    return torch.sigmoid(h @ v_head["v_head.summary.weight"].T + v_head["v_head.summary.bias"]).squeeze(-1).tolist()


# the decoding paths a test runs on: the graph path only where there is a GPU (it says so where not)
PATHS = ["off", "static", pytest.param("graphs", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA GPU"))]  # fmt: skip


def on_device(pair, path: str) -> tuple:
    """The models, copied to the GPU for the graph path (the session's models stay where they are)."""
    return tuple(copy.deepcopy(m).to("cuda") for m in pair) if path == "graphs" else pair


def prm_on_device(prm, path: str):
    """The reward model on the GPU for the graph path."""
    if path != "graphs":
        return prm
    prm = copy.copy(prm)
    prm.backbone, prm.head = copy.deepcopy(prm.backbone).to("cuda"), copy.deepcopy(prm.head).to("cuda")
    return prm
