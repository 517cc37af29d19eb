"""Weighting functions (Table 1) and the acceptance criterion (Algorithm 2) on hand-made tensors."""

import math

import pytest
import torch

import rsd_generation as rsd

R = torch.tensor([-0.5, 0.0, 0.3, 0.7, 1.0, 2.0])


def test_binary_is_indicator_of_r_at_least_delta():
    assert rsd.binary(R, delta=0.7).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert rsd.binary(R, delta=0.0).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_constant_clip_sigmoidal_logistic_exact_values():
    assert rsd.constant(R, p=0.25).tolist() == [0.25] * 6
    assert rsd.clip(R).tolist() == pytest.approx([0.0, 0.0, 0.3, 0.7, 1.0, 1.0])
    assert rsd.sigmoidal(torch.tensor([-0.5, 0.0, 1.0, 3.0])).tolist() == pytest.approx([0.0, 0.0, 0.5, 0.75])
    expected = [1 / (1 + math.exp(-10 * (r - 0.7))) for r in R.tolist()]
    assert rsd.logistic(R, delta=0.7, alpha=10.0).tolist() == pytest.approx(expected, rel=1e-6)


def test_get_weighting_binds_threshold_and_params():
    assert rsd.get_weighting("binary", 0.5)(R).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert rsd.get_weighting("constant", 0.4)(R).tolist() == pytest.approx([0.4] * 6)
    assert rsd.get_weighting("constant", 0.4, p=0.9)(R).tolist() == pytest.approx([0.9] * 6)
    assert rsd.get_weighting("logistic", 0.3, alpha=2.0)(torch.tensor([0.3])).item() == pytest.approx(0.5)
    f = lambda r: r * 0
    assert rsd.get_weighting(f, 0.7)(R).tolist() == [0.0] * 6  # a callable is used as given, its output checked
    with pytest.raises(ValueError, match=r"one weight per row, a tensor of shape \(6,\) like its input; got \(1,\)"):
        rsd.get_weighting(lambda r: r[:1], 0.7)(R)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("binary", float("nan")), {}, "rsd_threshold must be a real number"),
        (("softmax", 0.7), {}, "unknown rsd_weighting 'softmax'"),
        (("constant", 0.7), {"p": 1.5}, "p in [0, 1], got 1.5"),
        (("binary", 0.7), {"alpha": 3.0}, "not understood by 'binary'"),
        ((lambda r: r, 0.7), {"alpha": 3.0}, "only apply to named weightings"),
    ],
)
def test_get_weighting_errors_name_the_value(args, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rsd.get_weighting(*args, **kwargs)


def test_accept_is_deterministic_at_zero_and_one():
    omega = torch.tensor([0.0, 1.0, float("nan"), 1.0])
    assert rsd.accept(omega, None).tolist() == [False, True, False, True]
    # u is never read where ω ∈ {0, 1}: even u = 0 cannot accept ω = 0, u = 1 cannot reject ω = 1
    assert rsd.accept(omega, torch.tensor([0.0, 1.0, 0.0, 1.0])).tolist() == [False, True, False, True]


def test_accept_uses_u_only_where_omega_is_fractional():
    omega = torch.tensor([0.3, 0.3, 0.3])
    assert rsd.accept(omega, torch.tensor([0.1, 0.3, 0.31])).tolist() == [True, True, False]


def test_acceptance_frequency_matches_omega_under_seed():
    torch.manual_seed(0)
    omega = torch.tensor([0.1, 0.5, 0.9]).repeat(20000, 1).T.reshape(-1)
    hits = rsd.accept(omega, torch.rand(len(omega))).float().reshape(3, -1).mean(1)
    # binomial std at n=20000 is <= 0.0036; allow 4 sigma
    assert hits.tolist() == pytest.approx([0.1, 0.5, 0.9], abs=0.015)


def test_a_budget_never_exceeds_its_share_and_uses_it():
    g = torch.Generator().manual_seed(0)
    for gamma in (0.1, 0.3, 0.5):
        budget, rejected, n = rsd.Budget(gamma), 0, 0
        for size in [1, 1, 3, 16, 1, 7, 2] * 20:
            r = torch.rand(size, generator=g)
            omega = budget(r)
            assert set(omega.tolist()) <= {0.0, 1.0}
            rejected, n = rejected + int((omega == 0).sum()), n + size
            assert rejected <= gamma * n + 1e-9  # never over budget, at any point
        assert rejected == budget.rejected and rejected >= (gamma - 0.05) * n  # and it spends nearly all of it
        assert budget.delta == pytest.approx(float(torch.quantile(torch.tensor(budget.rewards), gamma)))


def test_a_budget_rejects_the_lowest_rewards_below_its_quantile():
    budget = rsd.Budget(0.5)
    assert budget(torch.tensor([0.9, 0.8])).tolist() == [1.0, 0.0]  # δ = 0.85, room for 1 of 2
    budget = rsd.Budget(0.5)
    assert budget(torch.tensor([0.9, 0.1, 0.2, 0.95])).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert budget.delta == pytest.approx(0.55)
    # now δ = 0.2 and room for 1 more (3 of 7): of 0.15 and 0.05, both below δ, the lowest goes
    assert budget(torch.tensor([0.15, 0.05, 0.99])).tolist() == [1.0, 0.0, 1.0]
    assert rsd.Budget(0.0)(torch.tensor([0.0, -1.0])).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.3", True, float("nan")])
def test_a_bad_budget_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=f"rsd_budget must be a share of steps in \\[0, 1\\], got {bad!r}"):
        rsd.Budget(bad)
