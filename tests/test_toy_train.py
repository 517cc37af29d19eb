"""Pieces of the toy training script that must agree with the rest of the project."""

import pytest
import torch
from rsd_generation.benchmarks.cli import TOY
from rsd_generation.benchmarks.toy.task import Problem, split_steps, step_labels
from rsd_generation.benchmarks.toy.tokenizer import build_toy_tokenizer
from rsd_generation.benchmarks.toy.train import prm_example, roc_auc

import rsd_generation as rsd
from rsd_generation.rewards import read_prm_format


def test_roc_auc_on_a_hand_computed_case():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs won 3 of 4
    assert roc_auc(torch.tensor([0.9, 0.5, 0.4, 0.1]), torch.tensor([1.0, 0.0, 1.0, 0.0])) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == pytest.approx(0.5)  # ties count half
    assert torch.isnan(torch.tensor(roc_auc(torch.tensor([0.3]), torch.tensor([1.0]))))


def test_prm_training_layout_is_what_the_adapter_feeds():
    """The PRMs are trained on exactly the token layout `ValueHeadPRM` scores at inference."""
    tok = build_toy_tokenizer()
    p = Problem(numbers=(37, 8, 12, 5), ops=("+", "*", "-"), level=2)
    steps = split_steps("8*12=96\n\n37+96=134\n\n134-5=129\n\nThe answer is 129.")
    ids, pos, labels = prm_example(tok, p, steps, step_labels(p, steps))
    adapter = rsd.ValueHeadPRM.__new__(rsd.ValueHeadPRM)  # format methods only: no model needed
    adapter.tokenizer, adapter.step_token_id = tok, tok.encode("\n", add_special_tokens=False)[-1]
    fmt = read_prm_format(TOY / "prm-small")  # what the shipped PRMs record
    adapter.step_token, adapter.strip_steps = fmt["step_token"], fmt["strip_steps"]
    assert fmt == {"step_token": "\n", "strip_steps": True}
    expected = adapter.prefix_ids(p.prompt)
    for s in steps:
        expected += adapter.step_ids(s)
    assert ids == expected
    assert [ids[q] for q in pos] == [adapter.step_token_id] * 4
    assert labels == [1.0, 0.0, 0.0, 0.0]
