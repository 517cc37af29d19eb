"""RowCache: per-row masking, compaction and gathered forwards leave each row's attention unchanged."""

import pytest
import torch

from rsd_generation.fast import row_cache
from rsd_generation.kv import RowCache, causal_lm_forward, pad_right
from rsd_generation.testing import make_lm


def test_compaction_drops_masked_columns_without_changing_outputs(tok):
    model = make_lm("qwen2", len(tok), seed=1)
    caches = [RowCache(causal_lm_forward(model), model.config, 3, torch.device("cpu")) for _ in range(2)]
    chunks = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    for c in caches:
        ids, valid = pad_right(chunks, 0)
        c.feed(ids, valid)
        c.feed(torch.tensor([[20, 21], [22, 23], [24, 25]]), torch.ones(3, 2, dtype=torch.bool))  # a draft step
        c.drop_from(torch.tensor([True, False, True]), torch.full((3,), 4))  # rows 0 and 2 reject it
    assert caches[1].compact(min_masked=0.25)
    assert caches[1].length == 4 < caches[0].length == 6  # widest row keeps 4 valid positions (row 1: 2 + 2)
    assert caches[1].mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    assert not caches[1].compact(min_masked=0.0)  # nothing left to drop
    nxt = torch.tensor([[30], [31], [32]])
    a = caches[0].feed(nxt, torch.ones(3, 1, dtype=torch.bool))
    b = caches[1].feed(nxt, torch.ones(3, 1, dtype=torch.bool))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and both equal each row run alone on exactly its kept tokens
    for r, kept in enumerate([[5, 6, 7, 8], [9, 10, 22, 23], [11, 12, 13]]):
        alone = model(input_ids=torch.tensor([[*kept, 30 + r]])).logits[0, -1]
        torch.testing.assert_close(a[r], alone, rtol=1e-4, atol=1e-4)


def test_pad_helpers():
    ids, valid = pad_right([[1, 2], [], [3]], 0)
    assert ids.tolist() == [[1, 2], [0, 0], [3, 0]] and valid.sum(1).tolist() == [2, 0, 1]


def test_rows_left_with_no_valid_column_can_shrink_and_be_fed_again(tok):
    """Rows whose every column is masked (the rows that used them left) compact to an empty cache that `keep`
    can still shrink: the remaining row then feeds and gets the output it would get alone."""
    model = make_lm("qwen2", len(tok), seed=1)
    c = RowCache(causal_lm_forward(model), model.config, 4, torch.device("cpu"))
    c.feed(*pad_right([[5, 6, 7], [], [], []], 0))  # only row 0 is fed; rows 1-3 hold masked padding
    c.keep(torch.tensor([1, 2, 3]))  # row 0 finishes
    assert c.compact()
    assert c.length == 0
    c.keep(torch.tensor([2]))  # down to one row while the cache is empty
    out = c.feed(torch.tensor([[9, 10]]), torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(out[0], model(input_ids=torch.tensor([[9, 10]])).logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["off", "static"])
def test_a_chunk_for_few_rows_runs_those_rows_alone_with_the_same_outputs(tok, path):
    """A chunk that only some rows take part in (at most half) runs over those rows alone: the outputs and every
    later output are the ones the whole batch gives, and no padded row is processed."""
    model = make_lm("qwen2", len(tok), seed=1)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16]]
    caches = [row_cache(model, f"gather-{path}-{k}", 5, 0, path, 64) for k in range(2)]
    for c in caches:
        c.feed(*pad_right(prompts, 0))
    chunks = [[], [20, 21, 22], [], [23], []]  # rows 1 and 3 of 5
    ids, valid = pad_right(chunks, 0)
    gathered = caches[0].feed(ids, valid)
    whole = caches[1].feed(ids, valid, rows=torch.arange(5))  # every row named: the whole batch runs
    for r in (1, 3):
        torch.testing.assert_close(gathered[r], whole[r], rtol=1e-5, atol=1e-5)
    assert caches[0].padded_tokens - caches[1].padded_tokens == 2 * 3 - 5 * 3  # 2 rows x 3 positions, not 5 x 3
    assert caches[0].forward_tokens == caches[1].forward_tokens == 12 + 4
    assert torch.equal(caches[0].mask, caches[1].mask)
    # a device-side mask with a host-side list of rows (decode_step's one-token forwards) gathers too
    tok_ids, alive = (
        torch.tensor([[30], [31], [32], [33], [34]]),
        torch.tensor([[False], [True], [False], [True], [False]]),
    )
    a = caches[0].feed(tok_ids, alive, rows=torch.tensor([1, 3]))
    b = caches[1].feed(tok_ids, alive, rows=torch.arange(5))
    for r in (1, 3):
        torch.testing.assert_close(a[r], b[r], rtol=1e-5, atol=1e-5)
    # then every row goes on as if nothing were gathered, and each equals the row alone on its tokens
    nxt = torch.tensor([[40], [41], [42], [43], [44]])
    a = caches[0].feed(nxt, torch.ones(5, 1, dtype=torch.bool))
    b = caches[1].feed(nxt, torch.ones(5, 1, dtype=torch.bool))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    kept = [[5, 6, 7, 8, 40], [9, 10, 20, 21, 22, 31, 41], [11, 12, 13, 42], [14, 23, 33, 43], [15, 16, 44]]
    for r, ids_r in enumerate(kept):
        alone = model(input_ids=torch.tensor([ids_r])).logits[0, -1]
        torch.testing.assert_close(a[r], alone, rtol=1e-4, atol=1e-4)


def test_a_gathered_forward_that_fails_leaves_the_cache_as_it_was(tok):
    """An exception inside a gathered forward (an interrupt, an out-of-memory error) restores every layer's keys
    and values, so the cache goes on as if the chunk had never been fed."""
    model = make_lm("qwen2", len(tok), seed=1)
    c = RowCache(causal_lm_forward(model), model.config, 4, torch.device("cpu"))
    c.feed(*pad_right([[5, 6, 7], [8, 9], [10], [11, 12]], 0))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in c.cache.layers]
    forward = c.forward

    def failing(**kw):
        forward(**kw)  # the layers have appended the chunk when the error comes
        raise KeyboardInterrupt

    c.forward = failing
    with pytest.raises(KeyboardInterrupt):
        c.feed(*pad_right([[20, 21], [], [], []], 0))  # 1 row of 4: gathered
    c.forward = forward
    assert c.length == 3 and c.forward_tokens == 8
    for layer, (k, v) in zip(c.cache.layers, before, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    out = c.feed(*pad_right([[20, 21], [], [], []], 0))
    alone = model(input_ids=torch.tensor([[5, 6, 7, 20, 21]])).logits[0, -1]
    torch.testing.assert_close(out[0], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["off", "static"])
def test_long_queues_go_in_slices_with_the_outputs_of_one_forward(tok, path, monkeypatch):
    """Queues over more than MAX_CHUNK_POSITIONS positions (prompts at a large batch) are fed in slices of columns:
    each row's output is at its own last token, whichever slice holds it, and the cache, the counts and every later
    output are those of one forward over the whole queue (rows of different lengths, one with no tokens)."""
    from rsd_generation import kv

    model = make_lm("qwen2", len(tok), seed=1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [], [14, 15, 16, 17, 18]]
    caches = [row_cache(model, f"slices-{path}-{k}", 4, 0, path, 64) for k in range(2)]
    outs = []
    for k, c in enumerate(caches):
        monkeypatch.setattr(kv, "MAX_CHUNK_POSITIONS", 8 if k else 10**6)  # 8 // 4 rows: 2 columns per forward
        c.pending = [list(p) for p in prompts]
        outs.append(c.feed_pending(torch.tensor([True, True, False, True])))
    assert [c.forward_calls for c in caches] == [1, 4]  # 7 columns: 2 + 2 + 2 + 1
    for r in (0, 1, 3):
        torch.testing.assert_close(outs[1][r], outs[0][r], rtol=1e-5, atol=1e-5)
        alone = model(input_ids=torch.tensor([prompts[r]])).logits[0, -1]
        torch.testing.assert_close(outs[1][r], alone, rtol=1e-4, atol=1e-4)
    assert caches[0].length == caches[1].length == 7
    assert torch.equal(caches[0].mask, caches[1].mask)
    assert caches[0].row_tokens.tolist() == caches[1].row_tokens.tolist() == [7, 2, 0, 5]
    assert all(c.pending == [[], [], [], []] for c in caches)
    nxt = torch.tensor([[40], [41], [42], [43]])
    a, b = (c.feed(nxt, torch.ones(4, 1, dtype=torch.bool)) for c in caches)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
