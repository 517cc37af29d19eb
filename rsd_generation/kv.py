"""Per-row KV caches for batched RSD.

Rows of a batch accept and reject steps independently, but `DynamicCache.crop` takes one length for all
rows. `RowCache` keeps one batched `DynamicCache` and a 2-D column mask: a row's discarded positions are
masked out instead of cropped, and position ids are derived from the mask (the number of valid columns
before a token), so a row sees exactly the context it would see alone. Keys are stored after RoPE, so a
masked gap changes nothing in the math.

A forward runs only the rows that have tokens in it when those are at most half of the batch (`gather_rows`):
their cache rows are gathered, the model runs over them alone, and the new columns are written back (masked for
the other rows). A target writing the steps of 2 rows out of 16 then costs 2 rows, not 16.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# forward(input_ids, attention_mask, position_ids, cache_position, cache, last) -> [R, X]
Forward = Callable[..., torch.Tensor]
# queues fed at once (prompts at a large batch) run in slices of columns of at most this many positions (rows times
# columns), so that one forward's activations stay bounded: 256 prompts of 512 tokens in one 7B forward would hold
# about 18 GB of MLP activations; a forward this wide is compute-bound, so slicing costs no speed
MAX_CHUNK_POSITIONS = 16384


class RowCache:
    """One model's cache over R rows, with per-row masking and a per-row queue of tokens not yet fed.

    Args:
        forward (`Callable`): runs the model on a chunk and returns one output per row, taken at `last`
            (the index of each row's last valid token in the chunk), shape `(R, X)`.
        config: the model config, for `DynamicCache`.
        batch_size (`int`): R.
        device (`torch.device`): where the model's inputs live.
        pad_token_id (`int`): the id written at padded (masked) positions.
    """

    def __init__(self, forward: Forward, config, batch_size: int, device: torch.device, pad_token_id: int = 0):
        self.forward = forward
        self.config = config
        self.cache = DynamicCache(config=config)
        self.device = device
        self.pad_token_id = pad_token_id
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # mask: [R, T]
        self.pending: list[list[int]] = [[] for _ in range(batch_size)]
        self.padded_tokens = 0  # masked positions processed alongside them
        self.forward_calls = 0  # model forwards (on a GPU each costs about one decode step at small chunks)
        self.dense = True  # no masked column yet: the model may skip the padding mask (its fast causal path)
        self.rows = torch.arange(batch_size)  # rows: [R], original row of each cache row (rows leave via `keep`)
        self._row_tokens = torch.zeros(batch_size, dtype=torch.long)  # valid positions processed per original row

    @property
    def row_tokens(self) -> torch.Tensor:
        """Valid positions processed per original row, `(B,)` on the CPU."""
        return self._row_tokens.cpu()

    @property
    def forward_tokens(self) -> int:
        """Valid positions processed, all rows."""
        return int(self._row_tokens.sum())

    @property
    def length(self) -> int:
        """Number of cache columns (valid or masked)."""
        return self.mask.shape[1]

    @torch.no_grad()  # inference only, also when called outside generate
    def feed(
        self, ids: torch.Tensor, valid: torch.Tensor, window: int | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Append one chunk to every row and return the output at each row's last valid token.

        Args:
            ids (`torch.LongTensor` of shape `(R, L)`): the chunk, right-padded per row.
            valid (`torch.BoolTensor` of shape `(R, L)`): which chunk positions are real tokens; a row's valid
                positions come first. Rows with none get garbage outputs.
            window (`int`, *optional*): return the outputs at each row's last `window` valid tokens instead (for
                verifying a proposal), `(R, window, X)`; entry `w` is position `n - window + w` of the row's chunk.
            rows (`torch.LongTensor` of shape `(N,)`, *optional*): the rows that may have valid tokens (on the
                host), when `valid` lives on the device; read off `valid` when it is on the CPU.
        Returns:
            `torch.Tensor` of shape `(R, X)` (or `(R, window, X)`).
        """
        sel = gather_rows(valid, rows, len(self.pending))
        if sel is not None and self._can_gather():
            return self._feed_rows(ids, valid, window, sel)
        valid = valid.to(self.device)
        ids = torch.where(valid, ids.to(self.device), self.pad_token_id)  # ids: [R, L]
        n = valid.sum(1)  # n: [R]
        pos = chunk_positions(self.mask.sum(1), n, ids.shape[1])  # pos: [R, L]
        mask = torch.cat([self.mask, valid.long()], 1)  # mask: [R, T + L]
        cache_position = torch.arange(self.length, mask.shape[1], device=self.device)  # [L]
        last = last_positions(n, window)  # last: [R] or [R, window]
        total = int(n.sum())
        self.dense = self.dense and total == ids.numel()
        out = self.forward(
            input_ids=ids,
            attention_mask=None if self.dense else mask,
            position_ids=pos,
            cache_position=cache_position,
            cache=self.cache,
            last=last,
        )
        self.mask = mask
        self._row_tokens[self.rows] += n.cpu()
        self.forward_calls += 1
        self.padded_tokens += ids.numel() - total
        return out.to(self.device)  # where the inputs live (a model spread over devices outputs on its last one)

    def _can_gather(self) -> bool:
        """Whether rows can be gathered and written back: every layer a plain dynamic one, all filled (4-D keys) or
        (an empty cache) none."""
        layers = self.cache.layers
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return False
        filled = [_filled(layer) for layer in layers]
        return all(filled) or (self.length == 0 and not any(filled))

    def _feed_rows(self, ids: torch.Tensor, valid: torch.Tensor, window: int | None, sel: torch.Tensor):
        """`feed` over the rows `sel` `(N,)` alone: their cache rows gathered, the model run over them, the new
        columns written back (masked for the other rows)."""
        R, T, L = len(self.pending), self.length, ids.shape[1]
        dev_sel = sel.to(self.device)
        valid = valid.to(self.device)
        sub_valid = valid[dev_sel]  # sub_valid: [N, L]
        sub_ids = torch.where(sub_valid, ids.to(self.device)[dev_sel], self.pad_token_id)  # sub_ids: [N, L]
        n = sub_valid.sum(1)  # n: [N]
        old_mask = self.mask[dev_sel]  # old_mask: [N, T]
        pos = chunk_positions(old_mask.sum(1), n, L)  # pos: [N, L]
        mask = torch.cat([old_mask, sub_valid.long()], 1)  # mask: [N, T + L]
        on = index_on(sel)  # each layer's rows indexed on its own device (a model may be spread over GPUs)
        full = [(layer.keys, layer.values) if _filled(layer) else None for layer in self.cache.layers]  # [R, H, T, D]
        for layer, kv in zip(self.cache.layers, full, strict=True):
            if kv is not None:
                layer.keys, layer.values = kv[0][on(kv[0])], kv[1][on(kv[1])]
        try:
            out = self.forward(
                input_ids=sub_ids,
                attention_mask=None if bool(mask.all()) else mask,
                position_ids=pos,
                cache_position=torch.arange(T, T + L, device=self.device),
                cache=self.cache,
                last=last_positions(n, window),
            )
        except BaseException:
            if all(kv is not None for kv in full):  # the cache as it was (an empty one is rebuilt)
                for layer, (k, v) in zip(self.cache.layers, full, strict=True):
                    layer.keys, layer.values = k, v
            else:
                self.cache = DynamicCache(config=self.config)
            raise
        for layer, kv in zip(self.cache.layers, full, strict=True):  # the new columns back, masked elsewhere
            new_k, new_v = layer.keys[:, :, T:], layer.values[:, :, T:]  # new_k: [N, H, L, D]
            if kv is None:  # an empty cache: nothing before the chunk
                kv = (
                    new_k.new_zeros(R, new_k.shape[1], 0, new_k.shape[3]),
                    new_v.new_zeros(R, new_v.shape[1], 0, new_v.shape[3]),
                )
            k, v = kv
            layer.keys = torch.cat([k, k.new_zeros(R, k.shape[1], L, k.shape[3])], 2)
            layer.values = torch.cat([v, v.new_zeros(R, v.shape[1], L, v.shape[3])], 2)
            layer.keys[on(layer.keys), :, T:], layer.values[on(layer.values), :, T:] = new_k, new_v
        self.mask = torch.cat([self.mask, valid.long()], 1)
        self._row_tokens[self.rows] += valid.sum(1).cpu()
        self.forward_calls += 1
        self.padded_tokens += sub_ids.numel() - int(n.sum())
        self.dense = False  # the other rows got masked columns
        out = out.to(self.device)
        res = out.new_zeros(R, *out.shape[1:])  # res: [R, X] or [R, window, X]
        res[dev_sel] = out
        return res

    def feed_pending(self, rows: torch.Tensor) -> torch.Tensor:
        """Feed the queued tokens of the selected rows (`rows`: bool `(R,)`), emptying their queues; the output at
        each one's last (`(R, X)`, as `feed`). Queues over more than `MAX_CHUNK_POSITIONS` positions go in slices
        of columns."""
        chunks = [p if bool(sel) else [] for p, sel in zip(self.pending, rows.tolist(), strict=True)]
        for i, sel in enumerate(rows.tolist()):
            if sel:
                self.pending[i] = []
        ids, valid = pad_right(chunks, self.pad_token_id)
        width = max(1, MAX_CHUNK_POSITIONS // len(chunks))  # columns per forward
        if ids.shape[1] <= width:
            return self.feed(ids, valid)
        ends = (valid.sum(1) - 1).clamp_min(0) // width  # ends: [R], the slice holding each row's last token
        out = None
        for k, start in enumerate(range(0, ids.shape[1], width)):
            part = self.feed(ids[:, start : start + width], valid[:, start : start + width])  # part: [R, X]
            out = part if out is None else out  # out: [R, X], the first slice's (a tensor of its own)
            here = (ends == k).to(part.device)
            out[here] = part[here]
        return out

    def drop_from(self, rows: torch.Tensor, start: torch.Tensor) -> None:
        """Mask out, for each selected row, every column from `start[row]` on (a discarded step)."""
        cols = torch.arange(self.length, device=self.device)[None, :]  # cols: [1, T]
        drop = rows.to(self.device)[:, None] & (cols >= start.to(self.device)[:, None])  # drop: [R, T]
        self.mask = self.mask.masked_fill(drop, 0)
        self.dense = self.dense and not bool(drop.any())

    def compact(self, min_masked: float = 0.5) -> bool:
        """Drop masked columns once they are over `min_masked` of the cache (rejected steps, batch padding).

        Each row's valid columns keep their order and move to the right end (left padding). Keys carry their
        rotary position already and position ids come from the mask, so the attention is unchanged. Returns
        whether the cache was repacked; caches with other than plain dynamic layers are left alone.
        """
        valid = self.mask.bool()  # valid: [R, T]
        width = int(valid.sum(1).max()) if valid.numel() else 0
        if self.length == 0 or self.length - width <= min_masked * self.length:
            return False
        if any(type(layer) is not DynamicLayer for layer in self.cache.layers):
            return False
        if width == 0:  # nothing valid left: start afresh (an empty cache would keep a stale batch size on `keep`)
            self.cache = DynamicCache(config=self.config)
            self.mask = self.mask[:, :0]
            self.dense = True
            return True
        idx = torch.argsort(valid.to(torch.int8), dim=1, stable=True)[:, self.length - width :]  # idx: [R, W]
        on = index_on(idx)
        for layer in self.cache.layers:
            gather = on(layer.keys)[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
        self.mask = valid.gather(1, idx).long()
        self.dense = bool(self.mask.all())
        return True

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only rows `idx` (finished rows leave the batch)."""
        on = index_on(idx)
        for layer in self.cache.layers:  # each on its own device (`Cache.batch_select_indices` takes one index)
            keys = getattr(layer, "keys", None)
            layer.batch_select_indices(on(keys) if isinstance(keys, torch.Tensor) else idx)
        self.mask = self.mask[on(self.mask)]
        self.pending = [self.pending[i] for i in idx.tolist()]
        self.rows = self.rows[idx.cpu()]
        self.dense = bool(self.mask.all())

    def add(self, rows: torch.Tensor, pending: Sequence[Sequence[int]]) -> None:
        """New rows join (original rows `rows`, `(N,)`), with nothing in the cache yet and `pending` queued (their
        prompts): every existing column is masked for them."""
        n = len(rows)
        for layer in self.cache.layers:
            if _filled(layer):
                layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(n, *layer.keys.shape[1:])])
                layer.values = torch.cat([layer.values, layer.values.new_zeros(n, *layer.values.shape[1:])])
        self.mask = torch.cat([self.mask, self.mask.new_zeros(n, self.length)])
        self.pending += [list(p) for p in pending]
        self.rows = torch.cat([self.rows, rows.cpu()])
        self._grow_row_tokens(int(rows.max()) + 1)
        self.dense = self.dense and self.length == 0

    def _grow_row_tokens(self, n: int) -> None:
        """Room for `n` original rows in the per-row counts."""
        if n > len(self._row_tokens):
            extra = self._row_tokens.new_zeros(n - len(self._row_tokens))
            self._row_tokens = torch.cat([self._row_tokens, extra])


def index_on(idx: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function giving `idx` on the device of the tensor it is to index, copied once per device: a model spread over
    GPUs keeps each layer's cache on that layer's device."""
    copies: dict[torch.device, torch.Tensor] = {}

    def on(t: torch.Tensor) -> torch.Tensor:
        if t.device not in copies:
            copies[t.device] = idx.to(t.device)
        return copies[t.device]

    return on


def _filled(layer) -> bool:
    """Whether a dynamic cache layer holds keys (`(R, H, T, D)`; transformers leaves them unset until the first
    forward)."""
    return getattr(layer, "is_initialized", True) and getattr(layer, "keys", None) is not None and layer.keys.dim() == 4


def chunk_positions(seen: torch.Tensor, n: torch.Tensor, width: int) -> torch.Tensor:
    """Position ids `(R, width)` of a right-padded chunk: each row's positions go on from its `seen` `(R,)` valid
    columns; padding past its `n` `(R,)` tokens repeats the last position. One column: the row's next position,
    padded or not (a padded position is masked, never read), so a decoded token computes none."""
    if width == 1:
        return seen[:, None]
    return torch.minimum(seen[:, None] + torch.arange(width, device=seen.device), (seen + n - 1).clamp_min(0)[:, None])


def gather_rows(valid: torch.Tensor, rows: torch.Tensor | None, R: int) -> torch.Tensor | None:
    """The rows a forward should run alone, `(N,)` on the host, or None to run all `R`: gathering pays when at most
    half of the rows have tokens (`rows`, or the rows of `valid` `(R, L)` with any when it is on the CPU)."""
    if rows is None:
        if valid.device.type != "cpu":
            return None  # unknown on the host without waiting for the device
        rows = valid.any(1).nonzero().flatten()
    rows = rows.cpu()
    return rows if len(rows) > 0 and 2 * len(rows) <= R else None


def pad_right(chunks: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into `(ids, valid)`, both of shape `(R, max(1, longest))`."""
    width = max(1, max((len(c) for c in chunks), default=1))
    lengths = torch.tensor([len(c) for c in chunks], dtype=torch.long)  # lengths: [R]
    # ids: [R, L], one tensor built from the padded lists (a copy per row cost 7 µs a row on CPU)
    ids = torch.tensor([[*c, *[pad_token_id] * (width - len(c))] for c in chunks], dtype=torch.long).view(-1, width)
    valid = torch.arange(width)[None, :] < lengths[:, None]  # valid: [R, L]
    return ids, valid


def last_positions(n: torch.Tensor, window: int | None) -> torch.Tensor:
    """Chunk positions to read outputs at: each row's last valid one `(R,)`, or its last `window` ones
    `(R, window)` (clamped at 0), given the valid counts `n` `(R,)`."""
    if window is None:
        return (n - 1).clamp_min(0)
    return (n[:, None] - window + torch.arange(window, device=n.device)).clamp_min(0)


def pick_rows(out: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """`out` `(R, L, X)` at positions `last` (`(R,)` -> `(R, X)`; `(R, W)` -> `(R, W, X)`)."""
    last = last.to(out.device)  # a model spread over devices ends where its last layer lives
    rows = torch.arange(len(last), device=out.device)
    return out[rows, last] if last.dim() == 1 else out[rows[:, None], last]


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a model's forward takes its KV cache under: `cache` (transformers 5.24 on; `past_key_values`
    is deprecated there) or `past_key_values` (earlier releases)."""
    return _cache_kwarg(type(model))


@functools.cache
def _cache_kwarg(cls: type) -> str:
    """`cache_kwarg` per class (the signature does not change between instances)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def causal_lm_forward(model) -> Forward:
    """A `RowCache` forward for a causal LM: float32 logits at each row's last valid token, `(R, V)`."""
    name = cache_kwarg(model)

    def forward(last: torch.Tensor, cache, **inputs) -> torch.Tensor:
        inputs[name] = cache
        if inputs["input_ids"].shape[1] == 1 and last.dim() == 1:
            logits = model(**inputs, use_cache=True, logits_to_keep=1).logits[:, 0]  # logits: [R, V]
        else:
            keep = torch.unique(last)  # keep: [K], sorted
            # a list of ints, not a tensor: accelerate's hooks move tensor inputs to the first layer's device, and
            # this indexes the last hidden states, which live on the last layer's
            logits = model(**inputs, use_cache=True, logits_to_keep=keep.tolist()).logits  # logits: [R, K, V]
            logits = pick_rows(logits, torch.searchsorted(keep, last))  # logits: [R, V] or [R, W, V]
        return logits.float()

    return forward


def hidden_forward(backbone) -> Forward:
    """A `RowCache` forward for a bare backbone: the last hidden state at each row's last valid token, `(R, H)`."""
    name = cache_kwarg(backbone)

    def forward(last: torch.Tensor, cache, **inputs) -> torch.Tensor:
        hidden = backbone(**inputs, **{name: cache}, use_cache=True).last_hidden_state  # hidden: [R, L, H]
        return pick_rows(hidden, last)

    return forward
