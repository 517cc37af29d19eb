"""The fast path: fixed-shape KV caches whose forwards are captured once as CUDA graphs and replayed.

Stock decoding at small batch sizes is bound by Python and kernel-launch overhead, not by the model: a 1.5B draft
costs about as much per token as a 7B target, and RSD cannot pay. `StaticRowCache` keeps `RowCache`'s contract
(a per-row column mask, queues of tokens not yet fed, rollback by masking, rows leaving the batch) over buffers
whose shapes never change:

- keys and values live in `[B, H, C, D]` buffers per layer, written in place at the columns of the current chunk;
- a chunk of `L` tokens runs at a bucketed width (1, 2, 4, ..., 128): each (cache, width) pair is captured once as a
  CUDA graph on its first use, optionally after `torch.compile`, and replayed afterwards. Wider chunks (long
  prompts), and chunks of more than 8 tokens over more than `MAX_GRAPH_POSITIONS` positions (a PRM's step at
  batch 64), run eagerly into the same buffers, at their own width;
- the attention mask is built inside the graph from the column mask, so a forward is: copy the inputs into the
  graph's buffers, replay, read the output;
- rows that leave the batch stay in the buffers as masked rows (the graph's batch size is fixed);
- a chunk that only some rows take part in (at most half) runs over those rows alone, gathered from the buffers,
  at a power-of-2 row count; padding rows point at one spare buffer row that is never read as context. Graphs are
  captured per (row count, width) up to width 8 (one-token steps, short verifications); a wider chunk over a few
  rows (a catch-up) runs eagerly, unpadded, rather than adding a capture per row count. In "compile" mode
  one-token forwards run over all rows: compiling per row count costs a compilation each, and the compiled
  forward over all rows beats an uncompiled one over a few;
- a cache is kept per model between `generate` calls, so capture and compilation are paid once per model and shape.

Under greedy decoding the fast path gives the plain path's tokens: the same math, over a different layout.
"""

from __future__ import annotations

import functools
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from . import kernels
from .fused import fused_forward, fused_layout
from .kv import (
    RowCache,
    cache_kwarg,
    causal_lm_forward,
    chunk_positions,
    gather_rows,
    hidden_forward,
    last_positions,
    pick_rows,
)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # chunk widths that are graph-captured
MAX_GATHERED_GRAPH_WIDTH = 8  # gathered chunks (a few rows) captured up to this width (one per row count); wider: eager
MAX_GRAPH_WINDOW = 16  # output windows (speculative verification) captured up to this many positions; wider: eager
# chunks wider than MAX_GATHERED_GRAPH_WIDTH (a PRM's step, a catch-up) over more positions than this, bucket padding
# included, run eagerly at their own width: such a forward is compute-bound, so a graph saves little launch time,
# and padding 33-40 tokens to the 64 bucket costs 60-90% more work (an H200 PRM step: 8.0 ms over 16 x 64
# positions, 27.9 ms over 64 x 64)
MAX_GRAPH_POSITIONS = 1024
MODES = ("auto", "off", "static", "graphs", "compile")
FAST_MODEL_TYPES = ("llama", "qwen2", "qwen3")  # standard causal attention, a plain head: the graph's assumptions
COMPILE_OPTIONS: dict = {"dynamic": False}  # torch.compile keywords for the one-token forward ("compile" mode)
FUSE = True  # fused QKV and gate/up projections where a model allows them (see `fused`); False: the model's forward
TIME_EAGER = False  # time each forward that runs eagerly (`StaticRowCache.eager_seconds`; benchmarks set it)
ROPE_TABLE = True  # fused forwards look cos and sin up by position (`rope_table`); False: the model's embedding


class StaticKV:
    """Per-layer key/value buffers of fixed shape `(B + 1, H, C, D)` (row B is a spare one that gathered forwards
    pad with), written in place at the columns `cols` of the first B rows or of the gathered rows `rows`.

    It provides the part of transformers' `Cache` that the attention layers call (`update`); position ids and
    the attention mask are always given, so nothing else is asked of it.
    """

    is_compileable = True

    def __init__(self, shapes: list[tuple[int, int]], batch_size: int, capacity: int, dtype, devices):
        self.batch_size = batch_size
        self.keys = [torch.zeros(batch_size + 1, h, capacity, d, dtype=dtype, device=dev)
                     for (h, d), dev in zip(shapes, devices, strict=True)]  # fmt: skip
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.cols: torch.Tensor | None = None  # cols: [L], the columns the running forward writes
        self.rows: torch.Tensor | None = None  # rows: [N], the buffer rows of a gathered forward (None: all B)
        self.colmask: torch.Tensor | None = None  # colmask: [B + 1, C], every buffer row's valid columns
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin: [C, D] by position (`rope_table`)
        self._all_rows: torch.Tensor | None = None  # arange(B) on the buffers' device

    @property
    def capacity(self) -> int:
        """Columns per row."""
        return self.keys[0].shape[2]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's keys and values `(N, H, L, D)` at `cols`; return the rows' whole buffers `(N, H, C, D)`
        (views of the first B rows, or copies of the gathered ones)."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        cols = self.cols.to(k.device)
        if self.rows is None:
            k[: self.batch_size].index_copy_(2, cols, key_states)
            v[: self.batch_size].index_copy_(2, cols, value_states)
        else:
            rows = self.rows.to(k.device)
            k[rows[:, None], :, cols[None, :]] = key_states.transpose(1, 2)  # the indexed view: [N, L, H, D]
            v[rows[:, None], :, cols[None, :]] = value_states.transpose(1, 2)
        return self.read(layer_idx)

    def destination(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the running forward writes layer `layer_idx`'s keys and values: the whole buffers `(B + 1, H, C, D)`,
        the buffer row of each of its rows `(N,)` and the columns `(L,)` (for a kernel that writes them itself;
        `read` then gives them back)."""
        k = self.keys[layer_idx]
        if self.rows is not None:
            rows = self.rows.to(k.device)
        else:
            if self._all_rows is None or self._all_rows.device != k.device:
                self._all_rows = torch.arange(self.batch_size, device=k.device)
            rows = self._all_rows
        return k, self.values[layer_idx], rows, self.cols.to(k.device)

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The running forward's rows of layer `layer_idx`'s buffers `(N, H, C, D)`, as `update` returns them."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.rows is None:
            return k[: self.batch_size], v[: self.batch_size]
        rows = self.rows.to(k.device)
        return k[rows], v[rows]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Unused: position ids are always given (some transformers versions still ask)."""
        return 0

    def grow(self, capacity: int) -> None:
        """Reallocate to `capacity` columns, keeping the first `self.capacity` ones."""
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : old.shape[2]] = old
                buffers[i] = new


def _bucket(n: int) -> int:
    """The captured chunk width that holds `n` tokens: the next of `BUCKETS`, or `n`."""
    return next((b for b in BUCKETS if b >= n), n)


class _Timing:
    """The time of the work queued between its creation and `stop()`: CUDA events on a GPU (read later, without
    waiting for the device in between), the host's clock on the CPU (where work runs as it is queued)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def stop(self) -> _Timing:
        """Mark the end."""
        if self.cuda:
            self.end.record()
        else:
            self.end = time.perf_counter()
        return self

    def seconds(self) -> float:
        """The seconds between the two marks (on a GPU, once the device has reached the end)."""
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.end - self.start


def rope_table(backbone: nn.Module, capacity: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin `(C, D)` of positions 0 to C - 1 as the model's rotary embedding gives them, so that a forward
    looks its positions up (two gathers) instead of computing them (about eight operations); None where the
    embedding depends on more than the position (dynamic or long-context scaling recomputes its frequencies), or
    with `ROPE_TABLE` off."""
    rotary = getattr(backbone, "rotary_emb", None)
    kind = getattr(rotary, "rope_type", None)
    if not ROPE_TABLE or rotary is None or not isinstance(kind, str) or "dynamic" in kind or kind == "longrope":
        return None
    like = backbone.get_input_embeddings().weight[:1, None]  # like: [1, 1, H], the dtype and device
    with torch.no_grad():
        cos, sin = rotary(like, torch.arange(capacity, device=like.device)[None])  # cos: [1, C, D]
    return cos[0], sin[0]


def _kv_shapes(config) -> list[tuple[int, int]]:
    """(KV heads, head dim) per layer."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [(heads, dim)] * config.num_hidden_layers


def _layer_devices(backbone: nn.Module, n: int) -> list[torch.device]:
    """Device of each decoder layer (models may be spread over GPUs by accelerate)."""
    layers = getattr(backbone, "layers", None)
    if layers is None or len(layers) != n:
        dev = next(backbone.parameters()).device
        return [dev] * n
    return [next(layer.parameters()).device for layer in layers]


class StaticRowCache(RowCache):
    """A `RowCache` over fixed-shape buffers, with graph-captured forwards (see the module docstring).

    Args:
        backbone (`nn.Module`): the model body; called with a 4-D additive attention mask and explicit positions.
        head (`Callable`): maps the hidden state at each row's last valid token `(B, H)` to the output `(B, X)`.
        config: the backbone's config.
        batch_size (`int`): B, fixed for the cache's life.
        capacity (`int`): columns per row; the cache grows (and recaptures) if a chunk does not fit.
        pad_token_id (`int`): the id fed at masked positions.
        graphs (`bool`): capture forwards as CUDA graphs (CUDA only).
        compile_decode (`bool`): `torch.compile` the one-token forward before capturing it.
    """

    def __init__(self, backbone: nn.Module, head: Callable, config, batch_size: int, capacity: int,
                 pad_token_id: int = 0, graphs: bool = False, compile_decode: bool = False):  # fmt: skip
        self._backbone = weakref.ref(backbone)  # the kept-caches table is keyed weakly by it: do not pin the model
        self.head, self.config = head, config
        self.cache_kwarg = cache_kwarg(backbone)  # resolved here, not inside a traced or compiled forward
        self.fused = fused_layout(backbone) if FUSE else None  # fused projections (None: the model's own forward)
        self.device = backbone.get_input_embeddings().weight.device
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.dtype = backbone.get_input_embeddings().weight.dtype
        devices = _layer_devices(backbone, config.num_hidden_layers)
        self.kv = StaticKV(_kv_shapes(config), batch_size, capacity, self.dtype, devices)
        self.kv.rope = rope_table(backbone, capacity) if self.fused is not None else None
        self.requested = (graphs, compile_decode)  # what the caller asked for: a kept cache serves the same ask
        self.graphs = graphs and self.device.type == "cuda" and len(set(devices)) == 1
        if graphs and len(set(devices)) > 1:
            warnings.warn(
                f"{type(backbone).__name__} is spread over {sorted(map(str, set(devices)))}: a CUDA graph is captured "
                "on one device, so this model runs the fixed-shape caches eagerly (rsd_fast_path='static')",
                stacklevel=4,
            )
        self.compile_decode = compile_decode and self.graphs
        self.run_ahead = True  # decode_step may queue a forward before it knows any row needs it (no host sync)
        self._captured: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}  # by (rows, width, window)
        self._rows_on_device: tuple = (None, None)  # (host rows, the same on the device) of the last gathered forward
        self._pool = None
        self._compiled = None
        self.capture_seconds = 0.0  # time spent capturing (and compiling), all widths
        self.reset(batch_size)

    @property
    def backbone(self) -> nn.Module:
        """The model body this cache runs."""
        model = self._backbone()
        assert model is not None, "the model of this cache was freed"
        return model

    def reset(self, batch_size: int) -> None:
        """Start over for a new batch of `batch_size` (= B) rows; buffers and captured graphs are kept."""
        assert batch_size == self.batch_size, "a StaticRowCache serves one batch size"
        dev = self.device
        layout = fused_layout(self.backbone) if self.fused is not None else None
        if layout is not self.fused:  # the parameters were replaced
            self.fused = layout
            self._captured.clear()  # graphs read the old buffers
            self._pool, self._compiled = None, None
        if not hasattr(self, "colmask") or self.colmask.shape[1] != self.kv.capacity:
            C = self.kv.capacity
            self.colmask = torch.zeros(self.batch_size + 1, C, dtype=torch.bool, device=dev)  # colmask: [B + 1, C]
        self.colmask.zero_()
        self.cursor = 0  # columns in use (valid or masked); the next chunk is written from here
        self.slots = torch.arange(self.batch_size, device=dev)  # slots: [R], buffer row of each active row
        self._in_order = True  # slots == arange(B): cache rows are buffer rows
        self.rows = torch.arange(self.batch_size)  # original row of each active row (= its buffer row)
        self.pending: list[list[int]] = [[] for _ in range(self.batch_size)]
        self._slot_tokens = torch.zeros(self.batch_size, dtype=torch.long, device=dev)  # per buffer row, its occupant
        self._occupant = torch.arange(self.batch_size)  # original row in each buffer row
        self._left: dict[int, int] = {}  # valid positions of original rows whose buffer row was handed on
        self._positions = 0  # positions processed, valid or not (host count: no device work per forward)
        self.forward_calls = 0
        # forwards run since the reset, by (gathered rows or None, width, output window or None, run eagerly)
        self.shapes: Counter = Counter()
        self._eager_timings: dict[tuple, list] = {}  # with TIME_EAGER: per eager shape, its forwards' timings

    # -- RowCache's contract --------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Columns in use (valid or masked)."""
        return self.cursor

    @property
    def mask(self) -> torch.Tensor:
        """`(R, T)` valid columns of the active rows, as `RowCache.mask`."""
        return self.colmask[self.slots, : self.cursor].long()

    @property
    def padded_tokens(self) -> int:
        """Masked positions processed alongside the valid ones (dead rows and bucket padding included)."""
        return self._positions - self.forward_tokens

    @torch.no_grad()  # inference only: an in-place write of a grad-carrying key would chain every forward's graph
    def feed(
        self, ids: torch.Tensor, valid: torch.Tensor, window: int | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Append one chunk `(R, L)` (right-padded per row, `valid` marks real tokens); outputs `(R, X)` at each
        row's last valid token, or `(R, window, X)` at its last `window` ones (as `RowCache.feed`). Only the rows
        with tokens run when they are few (`rows`: as in `RowCache.feed`)."""
        L, B, dev = ids.shape[1], self.batch_size, self.device
        sel = gather_rows(valid, rows, len(self.pending))  # sel: [N] cache rows that run alone, or None: all B
        if L == 1 and self.compile_decode:
            sel = None  # the compiled one-token forward over all rows beats an uncompiled one over a few
        graphed = self._graphed(L, window, B if sel is None else len(sel), sel is not None)
        width = _bucket(L) if graphed else L  # eager forwards run at the chunk's own width, unpadded
        if self.cursor + width > self.kv.capacity:
            graphed, width = False, L  # no room for the bucket's padding: run this chunk eagerly at its own width
            if self.cursor + L > self.kv.capacity:
                self._grow(self.cursor + L)
        valid, ids = valid.to(dev), ids.to(dev)
        if sel is not None:  # the rows' buffer rows, padded to a bucketed count with the spare row B
            sel = self._on_device(sel)
            N = 1 << (len(sel) - 1).bit_length() if graphed else len(sel)  # captured row counts: powers of 2
            slots = torch.full((N,), B, dtype=torch.long, device=dev)  # slots: [N]
            slots[: len(sel)] = self.slots[sel]
            x = torch.full((N, width), self.pad_token_id, dtype=torch.long, device=dev)  # x: [N, W]
            ok = torch.zeros(N, width, dtype=torch.bool, device=dev)  # ok: [N, W]
            x[: len(sel), :L] = torch.where(valid[sel], ids[sel], self.pad_token_id)
            ok[: len(sel), :L] = valid[sel]
        elif self._in_order and width == L:  # every buffer row active, in order: no scatter
            slots, x, ok = None, torch.where(valid, ids, self.pad_token_id), valid
        else:
            slots = None
            x = torch.full((B, width), self.pad_token_id, dtype=torch.long, device=dev)  # x: [B, W]
            ok = torch.zeros(B, width, dtype=torch.bool, device=dev)  # ok: [B, W]
            x[self.slots, :L] = torch.where(valid, ids, self.pad_token_id)
            ok[self.slots, :L] = valid
        one = width == 1 and window is None  # a token a row (a decode step): its output at column 0
        n = ok[:, 0] if one else ok.sum(1)  # n: [N] (or [B]), tokens per row (one token: a bool)
        seen = (self.colmask[:B] if slots is None else self.colmask[slots]).sum(1)  # valid columns before the chunk
        pos = chunk_positions(seen, n, width)  # pos: [N, W]
        if slots is None:
            self.colmask[:B, self.cursor : self.cursor + width] = ok
            self._slot_tokens += n
        else:
            self.colmask[slots, self.cursor : self.cursor + width] = ok
            self.colmask[B] = False  # the spare row never holds context
            self._slot_tokens.index_add_(0, slots[: len(sel)], n[: len(sel)].long())
        wide = _bucket(window) if graphed and window is not None else window
        last = None if one else last_positions(n, wide)  # None: column 0
        out = self._run(x, pos, self.cursor, last, slots, graphed).to(dev)  # out: [N, (wide,) X]
        if window is not None:
            out = out[:, wide - window :]  # out: [N, window, X], the last `window` positions
        self.cursor += L
        self._positions += x.numel()
        self.forward_calls += 1
        if sel is not None:
            res = out.new_zeros(len(self.pending), *out.shape[1:])  # res: [R, X] or [R, window, X]
            res[sel] = out[: len(sel)]
            return res
        return out if self._in_order else out[self.slots]

    def _on_device(self, rows: torch.Tensor) -> torch.Tensor:
        """The host index tensor `rows` on the device, copied once per distinct value: a copy from host memory waits
        for the device's queue, which would stall a step's run-ahead forwards at every token."""
        key = tuple(rows.tolist())
        if self._rows_on_device[0] != key:
            self._rows_on_device = (key, rows.to(self.device))
        return self._rows_on_device[1]

    def drop_from(self, rows: torch.Tensor, start: torch.Tensor) -> None:
        """Mask out, for each selected row, every column from `start[row]` on (a discarded step)."""
        sel = torch.zeros(self.batch_size + 1, dtype=torch.bool, device=self.device)
        sel[self.slots] = rows.to(self.device)
        first = torch.full((self.batch_size + 1,), self.kv.capacity, dtype=torch.long, device=self.device)
        first[self.slots] = start.to(self.device)
        cols = torch.arange(self.kv.capacity, device=self.device)[None, :]  # cols: [1, C]
        self.colmask.masked_fill_(sel[:, None] & (cols >= first[:, None]), False)

    @torch.no_grad()
    def compact(self, min_masked: float = 0.5) -> bool:
        """Move each row's valid columns to the front once masked ones are over `min_masked` of the used columns
        (or the cache is three quarters full). Buffers are rewritten in place, so captured graphs stay valid."""
        used = self.cursor
        valid = self.colmask[:, :used]  # valid: [B, T]
        width = int(valid.sum(1).max()) if used else 0
        if used == 0 or (used - width <= min_masked * used and used < 0.75 * self.kv.capacity):
            return False
        idx = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]  # idx: [B, W], valid first
        for buffers in (self.kv.keys, self.kv.values):
            for buf in buffers:
                g = idx.to(buf.device)[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
                buf[:, :, :width] = buf[:, :, :used].gather(2, g)
        kept = valid.gather(1, idx)  # kept: [B, W]
        self.colmask[:, :used] = False
        self.colmask[:, :width] = kept
        self.cursor = width
        return True

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only active rows `idx`; the others stay in the buffers, masked, until the batch ends."""
        self._in_order = self._in_order and idx.tolist() == list(range(self.batch_size))
        self.slots = self.slots[idx.to(self.device)]
        self.rows = self.rows[idx.cpu()]
        self.pending = [self.pending[i] for i in idx.tolist()]

    def add(self, rows: torch.Tensor, pending) -> None:
        """New rows join (original rows `rows`, `(N,)`) in buffer rows that rows which left have freed; their
        columns are masked out and `pending` (their prompts) queued."""
        taken = set(self.slots.tolist())
        free = [b for b in range(self.batch_size) if b not in taken][: len(rows)]
        assert len(free) == len(rows), "more rows than free buffer rows"
        counts = self._slot_tokens[free].tolist()
        for b, c in zip(free, counts, strict=True):  # hand the buffer row on; its count stays with its old row
            r = int(self._occupant[b])
            self._left[r] = self._left.get(r, 0) + c
        self._slot_tokens[free] = 0
        self._occupant[free] = rows.cpu()
        self.colmask[free] = False
        self.slots = torch.cat([self.slots, torch.tensor(free, device=self.device)])
        self._in_order = False
        self.rows = torch.cat([self.rows, rows.cpu()])
        self.pending += [list(p) for p in pending]

    @property
    def row_tokens(self) -> torch.Tensor:
        """Valid positions processed per original row, `(B,)` on the CPU (rows that left included)."""
        n = max([int(self._occupant.max()) + 1, *(r + 1 for r in self._left)])
        out = torch.zeros(n, dtype=torch.long)
        out.index_add_(0, self._occupant, self._slot_tokens.cpu())
        for r, c in self._left.items():
            out[r] += c
        return out

    @property
    def forward_tokens(self) -> int:
        """Valid positions processed, all rows."""
        return int(self._slot_tokens.sum()) + sum(self._left.values())

    def eager_seconds(self) -> dict[tuple, float]:
        """With `TIME_EAGER` on: the seconds the eager forwards since the reset took, per (gathered rows or None,
        width, output window) (on a GPU the device's time from the forward's first launch to its last kernel's
        end, host-bound launch gaps included: what such a forward costs where the host does nothing else)."""
        return {key: sum(t.seconds() for t in timings) for key, timings in self._eager_timings.items()}

    def captured_graph(self, width: int, rows: int | None = None, window: int | None = None):
        """The CUDA graph captured for chunks of `width` tokens over all rows (or `rows` gathered ones), with one
        output per row (or `window` of them), if any (for timing its replay alone)."""
        entry = self._captured.get((rows, width, window))
        return entry[0] if entry is not None else None

    # -- forwards -------------------------------------------------------------------------------------------------
    def _grow(self, needed: int) -> None:
        """More columns: reallocate the buffers and drop the captured graphs (they point at the old ones)."""
        capacity = max(2 * self.kv.capacity, -(-needed // 256) * 256)
        self.kv.grow(capacity)
        self.kv.rope = rope_table(self.backbone, capacity) if self.kv.rope is not None else None
        colmask = torch.zeros(self.batch_size + 1, capacity, dtype=torch.bool, device=self.device)
        colmask[:, : self.colmask.shape[1]] = self.colmask
        self.colmask = colmask
        self._captured.clear()
        self._pool = None  # a pool whose graphs are all gone cannot take a new capture
        self._compiled = None

    def _body(self, ids: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor, last: torch.Tensor,
              slots: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """One forward of a `(N, W)` chunk written at columns `cols` `(W,)` of the buffer rows `slots` `(N,)` (None:
        all B rows): the output at `last` (`(N,)` or `(N, K)`; None: column 0)."""
        self.kv.cols, self.kv.rows, self.kv.colmask = cols, slots, self.colmask
        mask = functools.partial(self._mask, cols, slots)  # built only where an attention reads it
        if self.fused is not None:  # the decode-attention kernel reads the column mask itself
            hidden = fused_forward(self.backbone, self.fused, ids, mask, pos, self.kv)  # hidden: [N, W, H]
        else:
            kw = {self.cache_kwarg: self.kv}
            hidden = self.backbone(input_ids=ids, attention_mask=mask(), position_ids=pos, use_cache=True, **kw)
            hidden = hidden.last_hidden_state  # hidden: [N, W, H]
        return self.head(hidden[:, 0] if last is None else pick_rows(hidden, last))

    def _mask(self, cols: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        """The additive attention mask `(N, 1, W, C)` of a chunk at columns `cols` `(W,)` of the buffer rows `slots`
        (None: all B): each query sees its row's valid columns up to its own, and its own (a padded query too:
        never an all-masked row)."""
        colmask = self.colmask[: self.batch_size] if slots is None else self.colmask[slots]  # colmask: [N, C]
        c = torch.arange(self.kv.capacity, device=cols.device)  # c: [C]
        allowed = colmask[:, None, :] & (c <= cols[:, None])  # allowed: [N, W, C], causal over valid columns
        allowed = allowed | (c == cols[:, None])
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=cols.device)
        return mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]  # mask: [N, 1, W, C]

    def _graphed(self, L: int, window: int | None, rows: int, gathered: bool) -> bool:
        """Whether a chunk of `L` tokens over `rows` rows (`gathered` from the buffers, or all) replays a captured
        graph at its bucketed width (else it runs eagerly at its own): graphs on; a width of `BUCKETS`; an output
        window of at most `MAX_GRAPH_WINDOW`; gathered rows only for chunks of at most `MAX_GATHERED_GRAPH_WIDTH`
        tokens; and a wider chunk only over at most `MAX_GRAPH_POSITIONS` positions, bucket padding included."""
        width = _bucket(L)
        return (
            self.graphs
            and width in BUCKETS
            and (window is None or _bucket(window) <= MAX_GRAPH_WINDOW)
            and (width <= MAX_GATHERED_GRAPH_WIDTH or (not gathered and rows * width <= MAX_GRAPH_POSITIONS))
        )

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, start: int, last: torch.Tensor | None,
             slots: torch.Tensor | None, graphed: bool) -> torch.Tensor:  # fmt: skip
        """Run a chunk (over the buffer rows `slots`, or all): replay (capturing on first use) where `graphed`, else
        eagerly."""
        width = ids.shape[1]
        # captured per (gathered row count, width, output window)
        key = (None if slots is None else len(slots), width, None if last is None or last.dim() == 1 else last.shape[1])
        self.shapes[(*key, not graphed)] += 1
        if not graphed:
            timing = _Timing(self.device) if TIME_EAGER else None
            out = self._body(ids, pos, torch.arange(start, start + width, device=self.device), last, slots)
            if timing is not None:
                self._eager_timings.setdefault(key, []).append(timing.stop())
            return out
        if key not in self._captured:
            return self._capture(ids, pos, start, last, slots, key)
        graph, buf, out = self._captured[key]
        buf["ids"].copy_(ids)
        buf["pos"].copy_(pos)
        torch.add(buf["steps"], start, out=buf["cols"])  # one kernel
        if last is not None:
            buf["last"].copy_(last)
        if slots is not None:
            buf["slots"].copy_(slots)
        graph.replay()
        return out.clone()

    def _capture(self, ids, pos, start: int, last, slots, key) -> torch.Tensor:
        """Capture the forward at this chunk's rows, width and output window (`key`) (warm-up runs compute the
        real chunk) and return its output."""
        t0 = time.perf_counter()
        width = ids.shape[1]
        steps = torch.arange(width, device=self.device)
        buf = {"ids": ids.clone(), "pos": pos.clone(), "cols": steps + start, "steps": steps,
               **{k: None if t is None else t.clone() for k, t in (("last", last), ("slots", slots))}}  # fmt: skip
        fn = self._body
        if width == 1 and last is None and slots is None and self.compile_decode:
            if self._compiled is None:
                self._compiled = torch.compile(self._body, **COMPILE_OPTIONS)
            fn = self._compiled
        args = (buf["ids"], buf["pos"], buf["cols"], buf["last"], buf["slots"])
        side = capture_stream(self.device)  # warm-up and capture on one stream: cuBLAS has its workspace before
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            try:  # warm-up: kernels chosen, compiled code built; writes this chunk's real K/V
                fn(*args)
            except Exception as e:  # a compiler failure: say so and capture the eager forward instead
                if fn is self._body:
                    raise
                warnings.warn(
                    f"torch.compile failed ({type(e).__name__}: {e}); capturing the eager forward", stacklevel=2
                )
                self.compile_decode, fn = False, self._body
                fn(*args)
            fn(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with kernels.capturing(graph, side, self._pool):
            static_out = fn(*args)
        self._captured[key] = (graph, buf, static_out)
        graph.replay()  # this chunk's K/V and output from the graph's own kernels (cuBLAS may choose other ones
        torch.cuda.synchronize(self.device)  # under capture), so a width gives the same numbers on every use
        self.capture_seconds += time.perf_counter() - t0
        return static_out.clone()


@functools.cache
def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream of a device on which graphs are warmed up and captured (a cuBLAS workspace is kept per
    stream: the warm-up allocates it, so the capture never does)."""
    return torch.cuda.Stream(device)


def fast_mode(mode: str | bool | None, model: nn.Module) -> str:
    """Resolve `rsd_fast_path` for one model: `"off"`, `"static"`, `"graphs"` or `"compile"`.

    `"auto"` (or True) is `"graphs"` for a supported model on a CUDA device and `"off"` otherwise; an explicit mode
    the model cannot take is an error.
    """
    if mode is True:
        mode = "auto"
    if mode is False or mode is None:
        return "off"
    if mode not in MODES:
        raise ValueError(f"rsd_fast_path must be one of {MODES}, True or False; got {mode!r}")
    why = fast_path_supported(model)
    if mode == "auto":
        on_cuda = model.get_input_embeddings().weight.device.type == "cuda"
        return "graphs" if on_cuda and why is None else "off"
    if mode != "off" and why is not None:
        raise ValueError(f"rsd_fast_path={mode!r} cannot serve this model: {why}; use rsd_fast_path='off'")
    device = model.get_input_embeddings().weight.device
    if mode in ("graphs", "compile") and device.type != "cuda":
        warnings.warn(
            f"rsd_fast_path={mode!r} needs a CUDA device, but {type(model).__name__} is on {device}: running "
            "'static' (fixed-shape caches, eager forwards) instead",
            stacklevel=3,
        )
        return "static"
    return mode


def fast_path_supported(model: nn.Module) -> str | None:
    """Why the fast path cannot run `model` (None when it can)."""
    cfg = model.config
    if cfg.model_type not in FAST_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {FAST_MODEL_TYPES}"
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attn_implementation {cfg._attn_implementation!r} takes no 4-D mask (use 'sdpa' or 'eager')"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "it has sliding-window layers"
    return None


def check_fast_path(mode: str | bool | None, model: nn.Module) -> None:
    """Refuse an `rsd_fast_path` value `model` cannot take, naming it (no warning: the loop warns about the mode it
    runs, once per model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast_mode(mode, model)


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def row_cache(model: nn.Module, role: str, batch_size: int, pad_token_id: int, mode: str, capacity: int,
              hidden: bool = False) -> RowCache:  # fmt: skip
    """The cache one model gets, in one role, for one `generate` call.

    Args:
        model (`nn.Module`): a causal LM (outputs: float32 logits), or with `hidden=True` a bare backbone (outputs:
            the last hidden state).
        role (`str`): `"draft"`, `"target"` or `"reward"`: one model may serve in several roles, each with its own
            cache.
        mode (`str`): from `fast_mode`; `"off"` gives a plain `RowCache`.
        capacity (`int`): columns a static cache starts with (it grows if needed).
    Returns:
        a `RowCache`, or a `StaticRowCache` reused from the model's previous call when the batch size matches and its
        capacity suffices (so a model is captured and compiled once per batch size, at the largest capacity seen).
    """
    device = model.get_input_embeddings().weight.device
    if mode == "off":
        forward = hidden_forward(model) if hidden else causal_lm_forward(model)
        return RowCache(forward, model.config, batch_size, device, pad_token_id)
    backbone = model if hidden else model.base_model
    head = _identity if hidden else _logits_head(model.get_output_embeddings())
    graphs, compile_decode = mode in ("graphs", "compile"), mode == "compile"
    capacity = -(-capacity // 256) * 256  # fewer distinct shapes: fewer captures and compilations
    kept = _CACHES.setdefault(backbone, {})
    old = kept.get(role)
    if (
        old is not None
        and old.batch_size == batch_size
        and capacity <= old.kv.capacity  # a larger kept cache serves: shapes, so graphs and compiled code, stay
        and old.requested == (graphs, compile_decode)
    ):
        old.pad_token_id = pad_token_id
        old.reset(batch_size)
        return old
    kept.pop(role, None)  # free the old buffers before allocating new ones
    cache = StaticRowCache(backbone, head, model.config, batch_size, capacity, pad_token_id, graphs, compile_decode)
    kept[role] = cache
    return cache


def kept_cache(model: nn.Module, role: str) -> StaticRowCache | None:
    """The static cache kept for `model` (a causal LM or a bare backbone) in `role`, if any."""
    kept = _CACHES.get(model) or _CACHES.get(getattr(model, "base_model", model)) or {}
    return kept.get(role)


def kept_caches() -> list[tuple[str, StaticRowCache]]:
    """Every kept static cache, as (role, cache)."""
    return [(role, cache) for kept in _CACHES.values() for role, cache in kept.items()]


def release_fast_caches() -> None:
    """Free every kept static cache and its captured graphs."""
    _CACHES.clear()


def _identity(h: torch.Tensor) -> torch.Tensor:
    """The hidden state itself (reward models apply their own head)."""
    return h


def _logits_head(lm_head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """float32 logits `(B, V)` from hidden states `(B, H)`."""

    def head(h: torch.Tensor) -> torch.Tensor:
        return lm_head(h.to(lm_head.weight.device)).float()

    return head
