"""Limit behaviours with the models on every device pairing this machine has (CPU only in CI; CUDA on a GPU)."""

import copy
import itertools

import pytest
import torch
from conftest import PROMPTS, encode, rsd_generate

import rsd_generation as rsd

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PAIRINGS = [
    pytest.param(d, t, marks=[NEEDS_GPU] if "cuda" in (d, t) else [])
    for d, t in itertools.product(["cpu", "cuda"], repeat=2)
]


@pytest.mark.parametrize(("draft_device", "target_device"), PAIRINGS)
def test_limits_hold_wherever_the_models_sit(qwen_pair, skywork_path, tok, draft_device, target_device):
    target, draft = (copy.deepcopy(m) for m in qwen_pair)
    target, draft = target.to(target_device), draft.to(draft_device)
    prm = rsd.load_reward_model(skywork_path, tokenizer=tok, device_map=draft_device)
    enc = encode(tok, PROMPTS)
    for delta, reference in ((0.0, draft), (1.5, target)):
        out = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=delta)
        expected = reference.generate(**enc.to(reference.device), max_new_tokens=24, do_sample=False)
        assert torch.equal(out.sequences.cpu(), expected.cpu())


@NEEDS_GPU
def test_a_cpu_generator_samples_for_models_on_a_gpu(qwen_pair, skywork_path, tok):
    target, draft = (copy.deepcopy(m).to("cuda") for m in qwen_pair)
    prm = rsd.load_reward_model(skywork_path, tokenizer=tok, device_map="cuda")
    kw = dict(rsd_weighting="clip", do_sample=True, top_k=20)
    runs = [
        rsd_generate(target, draft, prm, tok, PROMPTS, rsd_generator=torch.Generator().manual_seed(5), **kw)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].rsd_stats["steps"] == runs[1].rsd_stats["steps"]
