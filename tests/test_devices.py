"""Limit behaviours with the models on every device pairing this machine has (CPU only in CI; CUDA on a GPU)."""

import copy
import itertools
import json

import pytest
import torch
from conftest import PROMPTS, encode, rsd_generate
from rsd_generation.benchmarks.multigpu import split_device_map

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


NEEDS_2_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (a model split over them by accelerate)"
)
SPLIT_PATHS = ["off", "static", "graphs", "compile"]


def _seeded() -> torch.Generator:
    """A fresh generator for the acceptance draws: each run its own, the same stream."""
    return torch.Generator().manual_seed(2)


def _split(model):
    """A copy of a causal LM spread over two GPUs by accelerate's `dispatch_model`."""
    from accelerate import dispatch_model

    device_map = split_device_map(model.config.num_hidden_layers, 2)
    return dispatch_model(copy.deepcopy(model), device_map=device_map)


@NEEDS_2_GPUS
@pytest.mark.parametrize("path", SPLIT_PATHS)
def test_a_split_target_gives_the_unsplit_tokens(qwen_pair, skywork_path, tok, path):
    """Every path serves a target spread over two GPUs and gives the tokens and decisions of the same target on one:
    all steps accepted, all rejected, and a seeded mixed acceptance."""
    target, draft = qwen_pair
    one, split = copy.deepcopy(target).to("cuda:0"), _split(target)
    draft = copy.deepcopy(draft).to("cuda:0")
    prm = rsd.load_reward_model(skywork_path, tokenizer=tok, device_map="cuda:0")
    cases = [dict(rsd_threshold=0.0), dict(rsd_threshold=1.5), dict(rsd_weighting="constant", rsd_threshold=0.5)]
    if path in ("graphs", "compile"):  # said once, at the split model's first call
        with pytest.warns(UserWarning, match="is spread over .* runs the fixed-shape caches eagerly"):
            rsd_generate(split, draft, prm, tok, PROMPTS, rsd_fast_path=path)
    for kw in cases:
        runs = [
            rsd_generate(m, draft, prm, tok, PROMPTS, rsd_fast_path=path, rsd_generator=_seeded(), **kw)
            for m in (one, split)
        ]
        assert torch.equal(runs[0].sequences.cpu(), runs[1].sequences.cpu()), kw
        assert runs[0].rsd_stats["steps"] == runs[1].rsd_stats["steps"], kw


@NEEDS_2_GPUS
@pytest.mark.parametrize("path", SPLIT_PATHS)
def test_a_split_draft_and_prm_give_the_unsplit_decisions(qwen_pair, skywork_path, tok, path):
    target, draft = qwen_pair
    target, one, split = copy.deepcopy(target).to("cuda:0"), copy.deepcopy(draft).to("cuda:0"), _split(draft)
    n = split.config.num_hidden_layers
    prms = [
        rsd.load_reward_model(skywork_path, tokenizer=tok, device_map="cuda:0"),
        rsd.load_reward_model(skywork_path, tokenizer=tok, device_map=split_device_map(n, 2, prefix="", head=False)),
    ]
    kw = dict(rsd_weighting="constant", rsd_threshold=0.5, rsd_fast_path=path)
    runs = [
        rsd_generate(target, d, p, tok, PROMPTS, rsd_generator=_seeded(), **kw)
        for d, p in ((one, prms[0]), (split, prms[1]))
    ]
    assert torch.equal(runs[0].sequences.cpu(), runs[1].sequences.cpu())
    rewards = [[s["reward"] for row in r.rsd_stats["steps"] for s in row] for r in runs]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-5)


def test_a_model_built_in_place_across_devices_is_the_model_its_weights_make():
    """`split_random_model` allocates each module where the device map puts it and initialises it there: its outputs
    are those of a model constructed normally and given the same weights (so the rotary frequencies, computed rather
    than stored, are not left uninitialised), and every weight was drawn (none is left as allocated)."""
    from rsd_generation.benchmarks import multigpu, speed
    from transformers import Qwen2ForCausalLM

    shapes = {**multigpu.QWEN_72B, **speed.TINY, "hidden_size": 128, "num_hidden_layers": 4, "vocab_size": 300}
    model = multigpu.split_random_model(shapes, 4, ["cpu", "cpu"], torch.float32)
    assert set(model.hf_device_map) >= {"model.layers.3", "lm_head"}
    reference = Qwen2ForCausalLM(model.config).eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, reference(ids).logits)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif not name.endswith(".bias"):
            assert abs(p.std().item() - 0.02) < 0.005, name


@NEEDS_2_GPUS
def test_the_multigpu_script_writes_its_results(tmp_path):
    """`benchmarks.multigpu` on tiny shapes: split and unsplit agree on every path and case, and the large target's
    rows carry the speedups and the floor ratios the README reads."""
    from rsd_generation.benchmarks import multigpu

    out = tmp_path / "multigpu.json"
    multigpu.main(["--tiny", "--batch-sizes", "1", "2", "--new-tokens", "64", "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["complete"] and result["copy_bandwidth_tb_s"] > 0
    equal = result["split_7b"]["equal"]
    assert len(equal) == 2 * 3 * 2 and all(equal.values()), equal
    rows = result["large"]["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for row in rows:
        m = row["modes"]["graphs"]
        assert m["ms_per_forward_over_floor"]["target"] > 0
        assert {"accept80", "accept50"} <= set(m["rsd"]) and m["rsd"]["accept80"]["speedup_vs_best_target_only"] > 0
    with pytest.raises(SystemExit, match="exists"):
        multigpu.main(["--tiny", "--no-large", "--output", str(out)])
