"""Reward model adapters: scores equal a reference computed directly from the checkpoint; kind detection."""

import json
import re
import string

import pytest
import torch
from conftest import PROMPTS, median_reward, rsd_generate, skywork_reference
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen2ForSequenceClassification, Qwen2Model

import rsd_generation as rsd
from rsd_generation.testing import make_lm, save_qwen_prm, save_value_head_prm

PROBLEM = "12*3+4="
STEPS = ["12*3=36.\n\n", "36+4=40.\n\n", "answer 40"]


def _hidden(path, ids: list[int]) -> torch.Tensor:
    """Last hidden states of the checkpoint's backbone over the whole sequence at once (no cache): [T, H]."""
    backbone = Qwen2Model.from_pretrained(path).eval()
    with torch.no_grad():
        return backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_value_head_scores_equal_reference_from_hidden_states(skywork_path, tok):
    """With no recorded format a value-head PRM reads the RSD reference's input (each step as split at "\\n\\n",
    then the "\\n\\n" token); `step_token="\\n"` gives Skywork's README input (stripped steps, the "\\n" token)."""
    w = load_file(skywork_path / "model.safetensors")
    backbone = Qwen2Model.from_pretrained(skywork_path).eval()
    steps = [" " + STEPS[0], *STEPS[1:]]  # a leading space: kept by the reference's input, stripped by Skywork's
    prm = rsd.load_reward_model(skywork_path, tokenizer=tok)
    assert isinstance(prm, rsd.ValueHeadPRM) and prm.input_format == {"step_token": "\n\n", "strip_steps": False}
    reference = skywork_reference(tok, backbone, w, PROBLEM, steps, reference=True)
    assert prm.score_steps(PROBLEM, steps) == pytest.approx(reference, abs=1e-5)
    skywork = rsd.load_reward_model(skywork_path, tokenizer=tok, step_token="\n")
    assert skywork.input_format == {"step_token": "\n", "strip_steps": True}
    expected = skywork_reference(tok, backbone, w, PROBLEM, steps)
    assert skywork.score_steps(PROBLEM, steps) == pytest.approx(expected, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(reference, expected, strict=True)) > 1e-3  # the formats differ here


def test_a_recorded_input_format_is_used_and_a_bad_one_refused(tmp_path, tok):
    path = save_value_head_prm(tmp_path / "prm", tok)
    rsd.rewards.write_prm_format(path, "\n", True)
    assert rsd.load_reward_model(path, tokenizer=tok).input_format == {"step_token": "\n", "strip_steps": True}
    given = rsd.load_reward_model(path, tokenizer=tok, step_token="\n\n", strip_steps=False)  # arguments win
    assert given.input_format == {"step_token": "\n\n", "strip_steps": False}
    (path / rsd.rewards.PRM_FORMAT_FILE).write_text('{"step_token": "", "strip_steps": true}')
    with pytest.raises(ValueError, match=r"rsd_prm_format\.json must hold"):
        rsd.load_reward_model(path, tokenizer=tok)


def test_an_input_format_for_another_kind_is_refused(qwen_prm_path, tok):
    with pytest.raises(ValueError, match="step_token and strip_steps set a value_head PRM's input format"):
        rsd.load_reward_model(qwen_prm_path, tokenizer=tok, step_token="\n")


def test_qwen_prm_scores_equal_reference_from_hidden_states(qwen_prm_path, tok):
    prm = rsd.load_reward_model(qwen_prm_path, tokenizer=tok)
    assert isinstance(prm, rsd.QwenPRM)
    messages = [
        {"role": "system", "content": rsd.rewards.QWEN_PRM_SYSTEM},
        {"role": "user", "content": PROBLEM},
        {"role": "assistant", "content": "<extra_0>".join(s.strip() for s in STEPS) + "<extra_0>"},
    ]
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    sep = tok.convert_tokens_to_ids("<extra_0>")
    positions = [i for i, t in enumerate(ids) if t == sep]
    w = load_file(qwen_prm_path / "model.safetensors")
    h = _hidden(qwen_prm_path, ids)[positions]
    logits = torch.relu(h @ w["score.0.weight"].T + w["score.0.bias"]) @ w["score.2.weight"].T + w["score.2.bias"]
    expected = torch.softmax(logits, -1)[:, 1]
    assert prm.score_steps(PROBLEM, STEPS) == pytest.approx(expected.tolist(), abs=1e-5)


def test_sequence_classification_scores_the_response_so_far(tmp_path, tok):
    torch.manual_seed(8)
    model = make_lm("qwen2", len(tok), seed=8)
    rm = Qwen2ForSequenceClassification(model.config.__class__(**{**model.config.to_dict(), "num_labels": 1})).eval()
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prm = rsd.load_reward_model(tmp_path, tokenizer=tok)
    assert isinstance(prm, rsd.SequenceClassificationRM)
    got = prm.score_steps(PROBLEM, STEPS)
    for k in range(1, len(STEPS) + 1):
        chat = [{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": "".join(STEPS[:k])}]
        ids = tok.encode(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)
        with torch.no_grad():
            expected = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert got[k - 1] == pytest.approx(expected, abs=1e-5)
    # an already loaded model works too
    assert rsd.load_reward_model(rm, tokenizer=tok).score_steps(PROBLEM, STEPS) == pytest.approx(got, abs=1e-6)


def test_rejected_steps_leave_the_prm_cache(prm):
    """Score a step, reject it for a replacement, score the next: equals scoring the committed text fresh."""
    prm.start([PROBLEM, PROBLEM])
    prm.score(["wrong 1=2.\n\n", STEPS[0]])
    prm.resolve(torch.tensor([False, True]), [STEPS[0], None])
    got = prm.score([STEPS[1], STEPS[1]])
    fresh = prm.score_steps(PROBLEM, STEPS[:2])[-1]
    assert got.tolist() == pytest.approx([fresh, fresh], abs=1e-5)


def _shuffled_tokenizer() -> PreTrainedTokenizerFast:
    """Another tokenizer for the same text: other ids, other specials."""
    chars = list(reversed(string.ascii_letters + string.digits + " .,+-*/=()?:\n"))
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", *chars, "\n\n"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "\n")]))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def test_prm_with_its_own_tokenizer_scores_what_the_policy_wrote(qwen_pair, tok, tmp_path):
    """Rewards recorded during RSD equal a fresh scoring, in the PRM's tokenization, of the committed text."""
    prm_tok = _shuffled_tokenizer()
    prm = rsd.load_reward_model(save_value_head_prm(tmp_path, prm_tok, seed=11), tokenizer=prm_tok)
    target, draft = qwen_pair
    delta = median_reward(target, draft, prm, tok, PROMPTS)
    out = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=delta)
    for prompt, steps in zip(PROMPTS, out.rsd_stats["steps"], strict=True):
        committed = []
        for s in steps:
            if s["source"] == "draft":
                assert s["reward"] == pytest.approx(prm.score_steps(prompt, [*committed, s["text"]])[-1], abs=1e-5)
            if s["accepted"]:
                committed.append(s["text"])


def test_backbone_is_shared_with_a_loaded_model(skywork_path, tok):
    policy = make_lm("qwen2", len(tok), seed=5, tie_word_embeddings=False)
    prm = rsd.load_reward_model(skywork_path, tokenizer=tok, backbone=policy)
    assert prm.backbone.embed_tokens.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    reference = rsd.load_reward_model(skywork_path, tokenizer=tok)  # same weights (same seed), own copy
    assert prm.score_steps(PROBLEM, STEPS) == pytest.approx(reference.score_steps(PROBLEM, STEPS), abs=1e-5)


def test_detect_kind():
    assert rsd.detect_kind(["Qwen2ForPrmModel"], []) == "value_head"
    assert rsd.detect_kind(["Qwen2ForCausalLM"], ["model.norm.weight", "v_head.summary.weight"]) == "value_head"
    assert rsd.detect_kind(["Qwen2ForProcessRewardModel"], []) == "qwen_prm"
    assert rsd.detect_kind([], ["score.0.weight", "score.2.weight"]) == "qwen_prm"
    assert rsd.detect_kind(["LlamaForSequenceClassification"], []) == "sequence_classification"
    assert rsd.detect_kind(["Qwen2ForCausalLM"], ["lm_head.weight"]) is None


def test_undetectable_kind_is_refused(tmp_path, tok):
    make_lm("qwen2", len(tok), seed=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"cannot detect the reward model kind .*Qwen2ForCausalLM.*pass kind="):
        rsd.load_reward_model(tmp_path, tokenizer=tok)
    with pytest.raises(ValueError, match="unknown reward model kind 'orm'"):
        rsd.load_reward_model(tmp_path, kind="orm", tokenizer=tok)


@pytest.mark.parametrize("given", ["{tmp}/no-such-prm", "./no-such-prm", "~/no-such-prm-here", "{tmp}/a-file"])
def test_a_local_path_that_is_no_folder_is_named(tmp_path, tok, given, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a model")
    path = given.replace("{tmp}", str(tmp_path))
    why = "is a file, not a checkpoint directory" if path.endswith("a-file") else "does not exist"
    with pytest.raises(ValueError, match=f"reward model '{re.escape(path)}' {why}"):
        rsd.load_reward_model(path, tokenizer=tok)


def test_head_shape_mismatch_is_refused(tmp_path, tok, skywork_path):
    save_qwen_prm(tmp_path, tok)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForProcessRewardModel"]
    big = make_lm("qwen2", len(tok), seed=1, hidden_size=48)
    with pytest.raises(ValueError, match="head expects hidden size 32, backbone has 48"):
        rsd.load_reward_model(tmp_path, tokenizer=tok, backbone=big)


def test_sharded_checkpoint_head_is_found_in_its_shard(tmp_path, tok):
    """A 7B PRM comes in shards: the v_head is read through model.safetensors.index.json."""
    make_lm("qwen2", len(tok), seed=5, tie_word_embeddings=False).save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    last = tmp_path / shards[-1]
    weights = load_file(last)
    head = {"v_head.summary.weight": torch.randn(1, 32), "v_head.summary.bias": torch.randn(1)}
    save_file({**weights, **head}, last, metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(head, shards[-1]))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    prm = rsd.load_reward_model(tmp_path, tokenizer=tok)  # architectures say Qwen2ForCausalLM: detected by tensors
    assert isinstance(prm, rsd.ValueHeadPRM)
    assert torch.equal(prm.head.weight.data, head["v_head.summary.weight"])
    assert torch.equal(prm.head.bias.data, head["v_head.summary.bias"])


@pytest.mark.parametrize("kind", ["value_head", "qwen_prm"])
def test_score_last_equals_incremental_scoring_for_branching_rows(kind, skywork_path, qwen_prm_path, tok):
    """One batched forward over rows with different problems and histories gives each row's incremental reward."""
    prm = rsd.load_reward_model(skywork_path if kind == "value_head" else qwen_prm_path, tokenizer=tok)
    problems = [PROBLEM, "7*8=", PROBLEM]
    histories = [STEPS[:2], [], STEPS[:1]]
    steps = [STEPS[2], "56\n\n", "99+1=100.\n\n"]
    got = prm.score_last(problems, histories, steps)
    expected = [prm.score_steps(p, [*h, s])[-1] for p, h, s in zip(problems, histories, steps, strict=True)]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert len(set(got.tolist())) == 3, "rows must not share a score"


@pytest.mark.parametrize("which", ["skywork", "qwen"])
def test_a_reward_format_is_the_loaded_models_without_its_weights(skywork_path, qwen_prm_path, tok, which):
    """`load_reward_format` gives the input `load_reward_model` builds and its parameter count, over a backbone on the
    meta device (no weight read)."""
    path = skywork_path if which == "skywork" else qwen_prm_path
    loaded, fmt = rsd.load_reward_model(path, tokenizer=tok), rsd.load_reward_format(path, tokenizer=tok)
    assert type(fmt) is type(loaded) and fmt.num_parameters == loaded.num_parameters
    assert all(p.is_meta for p in fmt.backbone.parameters())
    assert fmt.prefix_ids(PROBLEM) == loaded.prefix_ids(PROBLEM)
    assert [fmt.step_ids(s) for s in STEPS] == [loaded.step_ids(s) for s in STEPS]


def test_an_outcome_reward_model_has_no_served_format(tmp_path, tok):
    model = make_lm("qwen2", len(tok), seed=8)
    Qwen2ForSequenceClassification(
        model.config.__class__(**{**model.config.to_dict(), "num_labels": 1})
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only value_head and qwen_prm reward models have a served input format"):
        rsd.load_reward_format(tmp_path, tokenizer=tok)
