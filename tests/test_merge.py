"""PRM + policy merge (issue 4): exact merged tensors, both loads, shared backbone, RSD with the merge, refusals."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, encode, rsd_generate, skywork_reference
from rsd_generation.merging import MergeError, merge_prm_with_policy
from rsd_generation.merging.cli import main as cli
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

import rsd_generation as rsd
from rsd_generation.rewards import checkpoint_tensor_files
from rsd_generation.testing import make_lm, save_value_head_prm

PROBLEM, STEPS = "12*3+4=", ["12*3=36.\n\n", "36+4=40.\n\n"]


def _weights(path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds (index files and value_head.safetensors included)."""
    files = checkpoint_tensor_files(path)
    return {n: t for f in set(files.values()) for n, t in load_file(f).items()}


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, tok):
    return save_value_head_prm(tmp_path_factory.mktemp("prm"), tok, seed=5)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def policy_dir(request, tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("policy")
    make_lm("qwen2", len(tok), seed=1, tie_word_embeddings=request.param).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def merged_dir(policy_dir, prm_dir, tmp_path_factory):
    return merge_prm_with_policy(policy_dir, prm_dir, tmp_path_factory.mktemp("m") / "merged")


def _policy_head(policy: dict) -> torch.Tensor:
    return policy.get("lm_head.weight", policy["model.embed_tokens.weight"])


def test_merged_tensors_equal_the_formula(policy_dir, prm_dir, merged_dir):
    P, R, M = load_file(policy_dir / "model.safetensors"), _weights(prm_dir), _weights(merged_dir)
    shared = [n for n in P if n != "lm_head.weight"]
    assert set(M) == {*shared, "lm_head.weight", "v_head.summary.weight", "v_head.summary.bias"}
    for name in shared:
        torch.testing.assert_close(M[name], 0.6 * P[name] + 0.4 * R[name], rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(M["lm_head.weight"], _policy_head(P))  # bit for bit, tied policy included
    for name in ("v_head.summary.weight", "v_head.summary.bias"):
        assert torch.equal(M[name], R[name])
    cfg = json.loads((merged_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] is False
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (merged_dir / name).read_bytes() == (policy_dir / name).read_bytes()


def _reference(policy_dir, prm_dir, tok) -> Qwen2ForCausalLM:
    """The merged policy built by hand from the formula."""
    P, R = load_file(policy_dir / "model.safetensors"), _weights(prm_dir)
    ref = make_lm("qwen2", len(tok), seed=0, tie_word_embeddings=False)
    state = {n: 0.6 * P[n] + 0.4 * R[n] for n in P if n != "lm_head.weight"}
    state["lm_head.weight"] = _policy_head(P)
    ref.load_state_dict(state)
    return ref


def test_output_loads_as_policy_and_as_prm(policy_dir, prm_dir, merged_dir, tok, caplog, capsys):
    ref = _reference(policy_dir, prm_dir, tok)
    with caplog.at_level(logging.WARNING):
        AutoModelForCausalLM.from_pretrained(prm_dir)  # control: the PRM checkpoint itself reports its v_head
    assert "v_head" in caplog.text + capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        policy = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    report = caplog.text + capsys.readouterr().err
    assert "v_head" not in report and "unexpected" not in report.lower()
    ids = encode(tok, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(policy(**ids).logits, ref(**ids).logits, rtol=1e-5, atol=1e-5)
    prm = rsd.load_reward_model(merged_dir, tokenizer=tok)
    assert isinstance(prm, rsd.ValueHeadPRM)
    expected = skywork_reference(tok, ref.model, _weights(prm_dir), PROBLEM, STEPS, reference=True)  # no record
    assert prm.score_steps(PROBLEM, STEPS) == pytest.approx(expected, abs=1e-5)


def test_prm_shares_the_loaded_policy_backbone(merged_dir, tok):
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    shared = rsd.load_reward_model(merged_dir, tokenizer=tok, backbone=merged)
    assert shared.backbone is merged.model
    assert (
        shared.backbone.layers[0].mlp.up_proj.weight.data_ptr() == merged.model.layers[0].mlp.up_proj.weight.data_ptr()
    )
    alone = rsd.load_reward_model(merged_dir, tokenizer=tok)
    assert shared.score_steps(PROBLEM, STEPS) == pytest.approx(alone.score_steps(PROBLEM, STEPS), abs=1e-6)


def test_rsd_with_the_merged_model_in_both_table4_setups(merged_dir, tok):
    merged = rsd.with_rsd(AutoModelForCausalLM.from_pretrained(merged_dir).eval())
    prm = rsd.load_reward_model(merged_dir, tokenizer=tok, backbone=merged)  # two models in memory, not three
    other = make_lm("qwen2", len(tok), seed=1, hidden_size=48)
    enc = encode(tok, PROMPTS)
    for target, draft in ((other, merged), (merged, make_lm("qwen2", len(tok), seed=2))):  # draft*=PRM*, target*=PRM*
        accepted = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=0.0)
        assert torch.equal(accepted.sequences, draft.generate(**enc, max_new_tokens=24, do_sample=False))
        rejected = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=1.5)
        assert torch.equal(rejected.sequences, target.generate(**enc, max_new_tokens=24, do_sample=False))


def _nothing_written(out) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ((-0.2, 1.2), "weights must be >= 0, got policy -0.2"),
        ((0.6, 0.6), "weights must sum to 1, got policy 0.6 \\+ prm 0.6"),
        ((float("nan"), 0.4), "policy_weight must be a finite number, got nan"),
    ],
)
def test_bad_weights_are_refused_before_writing(policy_dir, prm_dir, tmp_path, weights, message):
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=message):
        merge_prm_with_policy(policy_dir, prm_dir, out, *weights)
    assert _nothing_written(out)


def test_unnormalized_weights_are_used_as_given(policy_dir, prm_dir, tmp_path):
    out = merge_prm_with_policy(policy_dir, prm_dir, tmp_path / "out", 0.7, 0.7, normalize=False)
    P, R, M = load_file(policy_dir / "model.safetensors"), _weights(prm_dir), _weights(out)
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(M[name], 0.7 * P[name] + 0.7 * R[name], rtol=1e-6, atol=1e-7)


def test_differing_backbones_are_refused_naming_the_tensor(policy_dir, tmp_path, tok):
    # a PRM whose backbone is wider than the policy's
    make_lm("qwen2", len(tok), seed=3, hidden_size=48, tie_word_embeddings=False).save_pretrained(tmp_path / "w")
    weights = load_file(tmp_path / "w" / "model.safetensors")
    weights["v_head.summary.weight"], weights["v_head.summary.bias"] = torch.zeros(1, 48), torch.zeros(1)
    save_file(weights, tmp_path / "w" / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(
        MergeError, match=r"backbones differ, first at model.embed_tokens.weight: policy \(81, 32\), prm \(81, 48\)"
    ):
        merge_prm_with_policy(policy_dir, tmp_path / "w", out)
    assert _nothing_written(out)


def test_prm_without_value_head_is_refused(policy_dir, tmp_path, tok):
    plain = tmp_path / "plain"
    make_lm("qwen2", len(tok), seed=3).save_pretrained(plain)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="has no value head"):
        merge_prm_with_policy(policy_dir, plain, out)
    assert _nothing_written(out)


def test_existing_output_is_kept_unless_forced(policy_dir, prm_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="exists; pass force=True"):
        merge_prm_with_policy(policy_dir, prm_dir, out)
    with pytest.raises(MergeError, match="not an earlier rsd-merge output"):  # --force replaces merges, nothing else
        merge_prm_with_policy(policy_dir, prm_dir, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    merge_prm_with_policy(policy_dir, prm_dir, out, force=True)  # an empty directory may be replaced
    (out / "keep.txt").write_text("from an earlier merge")
    merge_prm_with_policy(policy_dir, prm_dir, out, force=True)  # as may an earlier merge
    assert not (out / "keep.txt").exists() and (out / "value_head.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial or old copies left behind
    file = tmp_path / "file"
    file.write_text("mine")
    with pytest.raises(MergeError, match="is a file"):
        merge_prm_with_policy(policy_dir, prm_dir, file, force=True)
    assert file.read_text() == "mine"


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["policy", "prm", "parent", "inside", "symlink"])
def test_a_merge_never_writes_over_its_inputs(tok, tmp_path, where):
    models = tmp_path / "models"
    policy = models / "policy"
    make_lm("qwen2", len(tok), seed=1).save_pretrained(policy)
    tok.save_pretrained(policy)
    prm = save_value_head_prm(models / "prm", tok, seed=5)
    (models / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(policy)
    out = {"policy": policy, "prm": prm, "parent": models, "inside": policy / "merged", "symlink": tmp_path / "link"}
    before = _tree(tmp_path)
    for force in (False, True):
        with pytest.raises(MergeError, match=r"overlaps the (policy|prm) checkpoint"):
            merge_prm_with_policy(policy, prm, out[where], force=force)
        assert cli(["--policy", str(policy), "--prm", str(prm), "--output", str(out[where]), "--force"]) == 2
    assert _tree(tmp_path) == before


def test_without_the_merge_extra_the_error_says_what_to_install(policy_dir, prm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mergekit", None)  # as if mergekit were not installed
    out = tmp_path / "out"
    assert cli(["--policy", str(policy_dir), "--prm", str(prm_dir), "--output", str(out)]) == 2
    assert "pip install 'rsd-generation[merge]'" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flag", ["--policy", "--prm"])
def test_a_missing_input_is_named(policy_dir, prm_dir, tmp_path, capsys, flag):
    args = {"--policy": str(policy_dir), "--prm": str(prm_dir)}
    args[flag] = str(tmp_path / "no-such-model")
    assert cli([*[x for kv in args.items() for x in kv], "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model' does not exist" in err and flag.lstrip("-") in err
    assert not (tmp_path / "out").exists()


def test_a_merge_failing_half_way_leaves_nothing(policy_dir, prm_dir, tmp_path, monkeypatch):
    import mergekit.merge

    def broken(config, out_path, options, **kw):
        (tmp_path / "seen").write_text(out_path)
        (Path(out_path) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(mergekit.merge, "run_merge", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        merge_prm_with_policy(policy_dir, prm_dir, out)
    assert not out.exists() and not Path((tmp_path / "seen").read_text()).exists()


def test_cli(policy_dir, prm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--policy", str(policy_dir), "--prm", str(prm_dir), "--output", str(out)]
    assert cli([*args, "--dtype", "float32"]) == 0 and (out / "value_head.safetensors").exists()
    assert cli(args) == 2
    assert "exists; pass force=True (--force)" in capsys.readouterr().err
    assert cli([*args, "--force", "--policy-weight", "0.5", "--prm-weight", "0.4"]) == 2
    assert "--no-normalize" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0 and "value_head.safetensors" in capsys.readouterr().out


def test_checkpoint_without_architectures_is_refused(policy_dir, prm_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in policy_dir.iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["architectures"]
    (bare / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="names no architectures"):
        merge_prm_with_policy(bare, prm_dir, out)
    assert _nothing_written(out)


def test_the_prms_recorded_input_format_goes_with_its_head(policy_dir, tmp_path, tok):
    """A merged checkpoint scores in the format its PRM was trained in; a PRM with no record gives a merge with none
    (the loader's default, the RSD reference's format)."""
    from rsd_generation.rewards import PRM_FORMAT_FILE, read_prm_format, write_prm_format

    prm = save_value_head_prm(tmp_path / "prm", tok, seed=5)
    assert read_prm_format(merge_prm_with_policy(policy_dir, prm, tmp_path / "plain")) is None
    write_prm_format(prm, "\n", True)
    out = merge_prm_with_policy(policy_dir, prm, tmp_path / "recorded")
    assert (out / PRM_FORMAT_FILE).read_bytes() == (prm / PRM_FORMAT_FILE).read_bytes()
    assert rsd.load_reward_model(out, tokenizer=tok).input_format == {"step_token": "\n", "strip_steps": True}
