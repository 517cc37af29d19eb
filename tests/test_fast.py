"""The fast path (fixed-shape caches) gives the plain path's tokens, counts and limits; its cache keeps RowCache's
contract through rollback, compaction, growth and rows leaving. On CPU it runs eagerly ("static"); the graph modes
are exercised on a GPU by `tests/test_fast.py` run there (see the README) and by `benchmarks.speed`."""

import copy

import pytest
import torch
from conftest import PROMPTS, EndRowZeroEarly, encode, median_reward, rsd_generate
from transformers import LogitsProcessorList, StoppingCriteriaList

import rsd_generation as rsd
from rsd_generation import fast
from rsd_generation.decoding import RowIds, Sampling, StepRules, catch_up_mode, decode_step
from rsd_generation.fast import StaticRowCache, fast_mode, release_fast_caches, row_cache
from rsd_generation.kv import RowCache, causal_lm_forward, pad_right
from rsd_generation.testing import make_lm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEEDS_CUDA = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs (and their compiled variant) need a CUDA GPU")
MODES = ["static", pytest.param("graphs", marks=NEEDS_CUDA), pytest.param("compile", marks=NEEDS_CUDA)]


@pytest.fixture(params=["qwen_pair", "llama_pair"])
def pair(request):
    """Copies on DEVICE: `Module.to` moves in place, and the session's models must stay on the CPU for other tests."""
    return tuple(copy.deepcopy(m).to(DEVICE) for m in request.getfixturevalue(request.param))


@pytest.fixture
def dev_prm(skywork_path, tok):
    return rsd.load_reward_model(skywork_path, tokenizer=tok, device_map=DEVICE)


def _same(a, b) -> None:
    """Same tokens and the same per-step decisions and counts."""
    assert torch.equal(a.sequences.cpu(), b.sequences.cpu())
    sa, sb = a.rsd_stats, b.rsd_stats
    assert [[(s["text"], s["source"], s["accepted"]) for s in row] for row in sa["steps"]] == [
        [(s["text"], s["source"], s["accepted"]) for s in row] for row in sb["steps"]
    ]
    assert sa["forward_tokens"] == sb["forward_tokens"]
    assert [r["forward_tokens"] for r in sa["per_row"]] == [r["forward_tokens"] for r in sb["per_row"]]


@pytest.mark.parametrize("mode", MODES)
def test_fast_path_gives_the_plain_paths_tokens(pair, dev_prm, tok, mode):
    target, draft = pair
    delta = median_reward(target, draft, dev_prm, tok, PROMPTS)  # both branches run
    along = catch_up_mode("auto", fast_mode(mode, target))  # the catch-up the fast path runs, on the plain too
    for d in (0.0, delta, 1.5):
        plain = rsd_generate(target, draft, dev_prm, tok, PROMPTS, rsd_threshold=d, rsd_fast_path="off",
                             rsd_catch_up=along)  # fmt: skip
        fast = rsd_generate(target, draft, dev_prm, tok, PROMPTS, rsd_threshold=d, rsd_fast_path=mode)
        _same(fast, plain)
        if d == delta:
            sources = {s["source"] for row in plain.rsd_stats["steps"] for s in row}
            assert sources == {"draft", "target"}


@pytest.mark.parametrize("mode", MODES)
def test_fast_path_limits_are_the_models_own_greedy_output(pair, dev_prm, tok, mode):
    target, draft = pair
    enc = encode(tok, PROMPTS).to(DEVICE)
    for delta, reference in ((0.0, draft), (1.5, target)):
        out = rsd_generate(target, draft, dev_prm, tok, PROMPTS, rsd_threshold=delta, rsd_fast_path=mode)
        expected = reference.generate(**enc, max_new_tokens=24, do_sample=False)
        assert torch.equal(out.sequences, expected)


def test_rows_leaving_early_keep_the_others_exact(qwen_pair, prm, tok):
    """Row 0 ends at its 3rd token; the rows that go on give what the plain path gives."""
    target, draft = qwen_pair
    eos = tok.eos_token_id
    delta = median_reward(target, draft, prm, tok, PROMPTS)
    kw = dict(rsd_threshold=delta, logits_processor=LogitsProcessorList([EndRowZeroEarly(tok)]), max_new_tokens=40)
    plain = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_fast_path="off", **kw)
    fast = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_fast_path="static", **kw)
    _same(fast, plain)
    P = encode(tok, PROMPTS)["input_ids"].shape[1]
    assert eos in fast.sequences[0, P : P + 4].tolist()  # row 0 did leave early


def test_static_cache_follows_row_cache_through_rollback_compaction_growth_and_rows_leaving(tok):
    """On a GPU the static cache captures graphs, and recaptures them after growing."""
    model = make_lm("qwen2", len(tok), seed=1).to(DEVICE)
    plain = RowCache(causal_lm_forward(model), model.config, 3, model.device)
    head = lambda h: model.lm_head(h).float()
    static = StaticRowCache(model.base_model, head, model.config, 3, capacity=8, graphs=DEVICE == "cuda")
    chunks = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    outs = []
    for c in (plain, static):
        o = [c.feed(*pad_right(chunks, 0))]
        start = c.length
        o.append(c.feed(torch.tensor([[20, 21], [22, 23], [24, 25]]), torch.ones(3, 2, dtype=torch.bool)))
        c.drop_from(torch.tensor([True, False, True]), torch.full((3,), start))  # rows 0 and 2 reject the step
        c.compact(min_masked=0.1)
        o.append(c.feed(torch.tensor([[30], [31], [32]]), torch.ones(3, 1, dtype=torch.bool)))
        c.keep(torch.tensor([0, 2]))  # row 1 leaves
        for _ in range(6):  # past the static cache's 8 columns: it grows
            ids = torch.randint(1, 40, (2, 3), generator=torch.Generator().manual_seed(len(o)))
            o.append(c.feed(ids, torch.tensor([[True, True, False], [True, True, True]])))
        outs.append(o)
    assert static.kv.capacity > 8
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert plain.row_tokens.tolist() == static.row_tokens.tolist()
    assert plain.forward_tokens == static.forward_tokens


def test_which_chunks_replay_a_graph_and_which_run_eagerly_unpadded(tok):
    """With graphs on, one-token steps and short verifications replay graphs (gathered rows too); a chunk wider than
    8 tokens replays one over all rows only up to MAX_GRAPH_POSITIONS positions at its bucketed width (a PRM's
    40-token step: at 16 rows, not at 64, where it runs eagerly at 40 columns instead of 64); gathered wide chunks,
    long windows and chunks wider than the last bucket run eagerly; without graphs nothing replays."""
    model = make_lm("qwen2", len(tok), seed=1)
    cache = StaticRowCache(model.base_model, lambda h: h, model.config, 64, capacity=8)
    cache.graphs = True  # the decision alone: nothing is run
    assert fast.MAX_GRAPH_POSITIONS == 1024 and fast.MAX_GATHERED_GRAPH_WIDTH == 8
    decide = cache._graphed  # (tokens, output window, rows, gathered)
    assert decide(1, None, 64, False) and decide(1, None, 3, True) and decide(5, 5, 64, False)
    assert decide(8, None, 128, True)  # a short chunk over gathered rows
    assert decide(40, None, 16, False) and not decide(40, None, 64, False)  # 16 x 64 positions; 64 x 64
    assert decide(9, None, 64, False) and not decide(9, None, 65, False)  # bucket 16: 1024 positions, then more
    assert not decide(9, None, 2, True)  # a catch-up over a few rows
    assert decide(5, 16, 4, False) and not decide(5, 17, 4, False)  # output windows up to 16
    assert not decide(129, None, 1, False)  # wider than the last bucket
    cache.graphs = False
    assert not decide(1, None, 1, False)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_the_rotary_table_gives_what_the_models_embedding_gives(tok, kind):
    """A fused forward looks cos and sin up by position (`fast.rope_table`, sized to the cache and rebuilt when it
    grows): the values the model's rotary embedding computes, exactly, at every position; none where the
    embedding rescales with the length (dynamic scaling)."""
    model = make_lm(kind, len(tok), seed=1)
    cache = row_cache(model, f"rope-{kind}", 2, 0, "static", 40)
    cos, sin = cache.kv.rope
    pos, like = torch.tensor([[0, 7, 39], [3, 3, 12]]), model.model.embed_tokens.weight[None, :1]
    want = model.model.rotary_emb(like, pos)
    assert torch.equal(cos[pos], want[0]) and torch.equal(sin[pos], want[1])
    cache._grow(100)
    assert cache.kv.rope[0].shape[0] == cache.kv.capacity >= 100
    pos = torch.tensor([[99]])
    assert torch.equal(cache.kv.rope[0][pos], model.model.rotary_emb(like, pos)[0])
    scaled = make_lm(kind, len(tok), seed=1, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                               "rope_theta": 10000.0})  # fmt: skip
    assert fast.rope_table(scaled.model, 40) is None
    fast.ROPE_TABLE = False
    try:
        assert fast.rope_table(model.model, 40) is None
    finally:
        fast.ROPE_TABLE = True


def test_static_caches_are_reused_across_calls_and_per_role(qwen_pair, prm, tok):
    target, draft = qwen_pair
    release_fast_caches()
    a = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=0.5, rsd_fast_path="static")
    kept = {role: fast._CACHES[m.base_model][role] for m, role in ((draft, "draft"), (target, "target"))}
    b = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=0.5, rsd_fast_path="static")
    for m, role in ((draft, "draft"), (target, "target")):
        assert fast._CACHES[m.base_model][role] is kept[role]  # the same buffers served the second call
    _same(a, b)
    assert row_cache(draft, "target", 3, 0, "static", 256) is not kept["draft"]  # one model in two roles: two caches
    # one model as draft and target at once (each role its own cache): the draft's own output
    same = rsd_generate(draft, draft, prm, tok, PROMPTS, rsd_threshold=0.5, rsd_fast_path="static")
    expected = draft.generate(**encode(tok, PROMPTS).to(draft.device), max_new_tokens=24, do_sample=False)
    assert torch.equal(same.sequences, expected)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU fallback of the graph modes")
@pytest.mark.parametrize("mode", ["graphs", "compile"])
def test_graph_modes_on_cpu_say_they_run_static(qwen_pair, prm, tok, mode):
    target, draft = qwen_pair
    with pytest.warns(UserWarning, match=f"rsd_fast_path='{mode}' needs a CUDA device.*running 'static'"):
        out = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=0.5, rsd_fast_path=mode)
    _same(out, rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=0.5, rsd_fast_path="static"))


def test_static_caches_are_sized_by_what_can_be_needed(qwen_pair, prm, tok):
    target, draft = qwen_pair
    release_fast_caches()
    kw = dict(rsd_threshold=0.5, max_new_tokens=24)
    huge = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_fast_path="static", rsd_max_step_tokens=4_000_000, **kw)
    for m in (draft, target):  # prompt + 24 new + one step of at most 24, rounded up to 256 columns
        assert fast._CACHES[m.base_model]["draft" if m is draft else "target"].kv.capacity == 256
    plain = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_fast_path="off", rsd_max_step_tokens=4_000_000, **kw)
    _same(huge, plain)
    release_fast_caches()


@pytest.mark.parametrize(
    ("value", "message"),
    [("fast", "rsd_fast_path must be one of"), (3, "got 3")],
)
def test_bad_fast_path_is_refused_with_the_value_named(qwen_pair, prm, tok, value, message):
    target, draft = qwen_pair
    with pytest.raises(ValueError, match=message):
        rsd_generate(target, draft, prm, tok, PROMPTS, rsd_fast_path=value)


def test_explicit_fast_path_on_an_unsupported_model_is_refused(tok):
    model = make_lm("qwen2", len(tok), seed=1)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation 'flash_attention_2' takes no 4-D mask"):
        fast_mode("graphs", model)
    assert fast_mode("auto", model) == "off"
    assert fast_mode("auto", make_lm("qwen2", len(tok), seed=1)) == "off"  # supported, but on the CPU
    assert fast_mode("static", make_lm("llama", len(tok), seed=1)) == "static"


def test_feeding_outside_no_grad_keeps_no_autograd_graph(tok):
    """Keys written in place under grad mode would chain every forward's graph onto the buffers (memory grows per
    token); the cache runs without grad wherever it is called from."""
    model = make_lm("qwen2", len(tok), seed=1).to(DEVICE)
    c = StaticRowCache(model.base_model, model.lm_head, model.config, 2, capacity=16, graphs=DEVICE == "cuda")
    with torch.enable_grad():
        out = c.feed(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.bool))
        out = c.feed(torch.tensor([[9], [10]]), torch.ones(2, 1, dtype=torch.bool))
    assert not out.requires_grad
    assert not any(k.requires_grad or k.grad_fn is not None for k in c.kv.keys + c.kv.values)


def test_kept_caches_do_not_keep_a_model_alive(tok, prm):
    import gc
    import weakref

    target, draft = make_lm("qwen2", len(tok), seed=7), make_lm("qwen2", len(tok), seed=8)
    rsd_generate(rsd.with_rsd(target), draft, prm, tok, PROMPTS, rsd_threshold=0.5, rsd_fast_path="static")
    assert fast._CACHES.get(draft.base_model)  # kept for the next call
    gone = weakref.ref(draft.base_model)  # the key of the kept-caches table
    del draft
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize(("max_step_tokens", "budget", "forwards"), [(4, 100, 4), (10, 3, 3)])
def test_a_step_whose_end_the_host_knows_queues_no_extra_forward(tok, max_step_tokens, budget, forwards):
    """On the static path a step runs each forward before the host knows it is needed; when every row must end at
    the step's token limit or its budget (a proposal of γ tokens), no forward is queued after the last token."""
    model = make_lm("qwen2", len(tok), seed=3)
    cache = row_cache(model, f"run-ahead-{max_step_tokens}", 2, 0, "static", 64)
    cache.pending = [[5, 6, 7], [8, 9]]
    s = Sampling(LogitsProcessorList(), False, None, len(tok), torch.empty(0, dtype=torch.long), 0)
    rules = StepRules(None, max_step_tokens, StoppingCriteriaList())
    rows = torch.ones(2, dtype=torch.bool)
    steps, _, _ = decode_step(
        cache, RowIds(torch.zeros(2, 3, dtype=torch.long), 0), rows, torch.full((2,), budget), s, rules
    )
    assert [len(y) for y in steps] == [forwards, forwards]
    assert cache.forward_calls == forwards  # the prompt chunk and one forward per later token


def test_captures_pause_the_garbage_collector(monkeypatch):
    """A capture runs in thread-local error mode with Python's cyclic collector paused (a collection freeing a
    released cache's graph mid-capture would reset it, which invalidates the capture), and leaves it as it was, after
    an error too."""
    import contextlib
    import gc

    from rsd_generation import kernels

    seen = []

    @contextlib.contextmanager
    def graph(graph, pool=None, stream=None, capture_error_mode=None):  # torch.cuda.graph, without a GPU
        seen.append(("capture", gc.isenabled(), capture_error_mode))
        yield

    monkeypatch.setattr(torch.cuda, "graph", graph)
    assert gc.isenabled()
    with kernels.capturing(object(), None):
        seen.append(("body", gc.isenabled()))
    assert seen == [("capture", True, "thread_local"), ("body", False)] and gc.isenabled()
    with pytest.raises(RuntimeError, match="inside"), kernels.capturing(object(), None):
        raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()
    try:  # a caller's paused collector stays paused
        with kernels.capturing(object(), None):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
