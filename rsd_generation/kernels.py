"""Triton kernels for the elementwise work of a decode step: one kernel where eager PyTorch launches several.

At batch 1 a captured decode step of a 1.5B model is a chain of about 30 kernels per layer, most of them tiny
(the RMS norm alone is a cast, a square, a mean, an add, a reciprocal square root, two products and a cast back),
and on an H200 each costs a few microseconds however little it reads: the draft's step took 4.4x the time its
weights take to read. These kernels do per token, in one launch each, what those chains do:

- `add_rms_norm`: the residual add and the RMS norm after it (the sum is also returned, as the next residual);
- `rotary_into_cache_`: the rotary embedding of the queries, in place in the fused projection's output, while the
  rotated keys and the values go straight to their columns of a static KV cache (eager: a rotation of several
  kernels, then two index copies);
- `silu_mul`: `silu(gate) * up` from the fused gate/up projection's output;
- `decode_attention`: attention of a short chunk's queries over a static cache, reading only the columns up to the
  chunk's last one, and the cache rows in place (SDPA reads all C columns of the buffers, and a gathered
  forward first copies its rows' keys and values). On an H200 it took 0.25 ms off a draft token at batch 1
  (2.35 -> 2.10 ms) and off a target one (5.04 -> 4.80); `ATTENTION = False` turns it off.

- `linear`: a one-token projection by `gemv` where, for that weight's shape on this device, it measured faster
  than cuBLAS (timed once per shape at first use, outside any capture, over enough weight copies that they come
  from memory and not from L2); cuBLAS everywhere else. cuBLAS runs the draft's small projections at a fraction of
  the bandwidth on an H200 (its 4.7 MB o_proj in 6.2 µs, 1.1 µs of weight reads). An earlier GEMV (4 weight rows
  and 256 columns per program, every shape) made a draft token slower (2.05 -> 3.01 ms) and was removed; this one
  takes the block shapes a sweep chose (`benchmarks.gemv_sweep`: on an H100 it beat cuBLAS on every projection of
  Qwen2.5-Math 1.5B and 7B by 9-31%), and only where it wins: at batch 1 on an H100 a draft token went from 2.24
  to 2.00 ms and a target one from 5.93 to 5.48 (a GPU out of memory for the timing copies keeps cuBLAS). The
  GEMV can take the elementwise work around a layer's products (`gemv(norm=, gated=, residual=, rotary=)`): the
  RMS norm before, the SiLU product of a fused gate/up after, the residual add after, and the rotary
  embedding and the cache writes after a fused qkv, `rotary_into_cache_`'s work; the fused forward lets it where
  `fusion_pays` timed that faster than the separate kernel (on an H100 at batch 1, the first three: draft 2.008 ->
  1.944 ms, target 5.627 -> 5.574; the rotary epilogue is not yet measured on a GPU). Its tensor-core form for 2
  to 64 tokens (`SKINNY`) is off: at most 16% over cuBLAS at 16 tokens on an H100, slower at 64 for most shapes.

`capturing` is how the fast path and these timings capture a CUDA graph.

Each rounds where the model's own modules round (to the model's dtype after every operation they run in it). The
results equal the eager ones within a unit of rounding (the norm sums in another order); on an H200 the compiled
rotation was 6 units apart in a bfloat16 sum that cancels (presumably an intermediate rounding dropped by the
compiler), within one unit at the values' scale. They run on CUDA tensors, and on CPU tensors under Triton's
interpreter (`TRITON_INTERPRET=1`, how the tests check them). `usable(x)` says whether they can run on `x`: without
Triton, or where they fail to build or launch on its device (tried once, with a warning), the caller keeps the
eager operations.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import warnings

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager operations serve instead
    triton = None

AVAILABLE = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on CPU tensors (tests)
ENABLED = True  # set False to keep the eager operations (benchmarks compare both)
ATTENTION = True  # decode attention by `decode_attention` (where `ENABLED` and it fits)
MAX_ATTENTION_QUERIES = 64  # query heads per KV head times chunk width that `decode_attention` takes in one tile
# `decode_attention` over a long cache and few (rows x KV heads) programs splits the columns into runs, one program
# each, and combines them in a second kernel (flash-decoding): at batch 1 a 1.5B's two programs leave most SMs idle
ATTENTION_SPLIT = True
MAX_ATTENTION_SPLITS = 16
MIN_SPLIT_COLUMNS = 512  # (a run over fewer columns than a cache of ~700 holds gains less than the second kernel)
GEMV = True  # one-token projections by `gemv` where it measured faster than cuBLAS (see `linear`)
# (BLOCK_N weight rows, BLOCK_K columns per load, warps, pipeline stages) tried per weight shape
# (the best of a 72-configuration sweep for some Qwen2.5-Math 1.5B or 7B projection on an H100)
GEMV_CONFIGS: tuple[tuple[int, int, int, int], ...] = (
    (2, 1024, 4, 1), (2, 1024, 4, 4), (2, 1024, 4, 3), (4, 512, 4, 1), (8, 512, 4, 3), (8, 512, 8, 3), (16, 1024, 8, 4)
)  # fmt: skip
GEMV_FUSION = True  # the fused forward's one-token GEMVs take the norms, SiLU product and residual adds around them
SKINNY = False  # projections of 2 to MAX_SKINNY_ROWS tokens by `gemv`'s tensor-core form (off: at most 5-16% over
# cuBLAS on an H100 at 16 tokens, slower at 64 for most shapes; not yet measured in whole forwards)
MAX_SKINNY_ROWS = 64
# the same for 2 to 64 tokens (rows padded to a power of 2 from 16, as tensor-core products take them): the best
# of a 72-configuration sweep at 16 or 64 tokens for some Qwen2.5-Math 1.5B or 7B projection on an H100
# (`benchmarks.gemv_sweep --tokens 16 64`, gemv-sweep-skinny-h100.json) among those that built at 64 rows (larger
# tiles need more shared memory than an SM has)
SKINNY_CONFIGS: tuple[tuple[int, int, int, int], ...] = (
    (16, 256, 4, 4), (32, 256, 4, 4), (16, 128, 4, 4), (32, 128, 4, 3), (64, 128, 4, 2), (64, 128, 4, 4),
    (32, 256, 4, 3)
)  # fmt: skip
MAX_GEMV_BYTES = 512 << 20  # larger weights stay cuBLAS's (the timing copies would take a GB)
GEMV_MIN_GAIN = 0.95  # `gemv` is chosen where it takes at most this share of cuBLAS's time


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x` (Triton installed and enabled; a CUDA tensor, or the interpreter; and
    they built and ran on its device and dtype the first time this was asked, else a warning says why not)."""
    if not AVAILABLE or not ENABLED or torch.compiler.is_compiling():  # a compiled forward fuses on its own
        return False
    if not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        return False
    key = (str(x.device), x.dtype, x.shape[-1], ATTENTION)
    if key not in _WORKS:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # not tried inside a capture (every capture is warmed up first, outside it)
        _WORKS[key] = _try_kernels(x)
    return _WORKS[key]


_WORKS: dict[tuple, bool] = {}  # by (device, dtype, hidden size, ATTENTION): whether the kernels ran there


def _try_kernels(x: torch.Tensor) -> bool:
    """Run each kernel once on small tensors like `x`'s (its hidden size, 128-wide heads): False, with a warning,
    if Triton cannot build or launch them on this device (an old GPU, a driver it does not support)."""
    dev, dt, H = x.device, x.dtype, x.shape[-1]
    try:
        t = torch.randn(2, H, device=dev).to(dt)
        add_rms_norm(t, torch.ones(H, device=dev, dtype=dt), 1e-6, t)
        add_rms_norm(t, torch.ones(H, device=dev, dtype=dt), 1e-6)
        qkv = torch.randn(1, 1, 4, 128, device=dev).to(dt)  # 2 query heads, a key and a value head
        cos, sin = torch.ones(1, 1, 128, device=dev, dtype=dt), torch.zeros(1, 1, 128, device=dev, dtype=dt)
        keys, values = torch.zeros(1, 1, 2, 128, device=dev, dtype=dt), torch.zeros(1, 1, 2, 128, device=dev, dtype=dt)
        rows, cols = torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
        q = rotary_into_cache_(qkv, cos, sin, 2, keys, values, rows, cols)
        silu_mul(torch.randn(2, 64, device=dev).to(dt))
        if ATTENTION:
            decode_attention(q, keys, values, rows, torch.ones(1, 2, dtype=torch.bool, device=dev), cols, 1.0)
        if x.is_cuda:
            torch.cuda.synchronize(dev)  # a launch failure surfaces here
    except Exception as e:  # any failure to build or launch: the eager operations serve instead
        warnings.warn(
            f"the fast path's Triton kernels cannot run on {dev} in {dt} ({type(e).__name__}: {e}); using eager "
            "operations instead",
            stacklevel=3,
        )
        return False
    return True


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """`t` `(T, H)` with consecutive elements along H (rows may lie apart), copied only if it has not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`(weight * rms_norm(s), s)` with `s = x + delta` (or `x`), as Llama/Qwen RMS norms compute it: the norm in
    float32, cast back to x's dtype, then scaled by `weight` (of x's dtype).

    Args:
        x, delta (`torch.Tensor` of shape `(..., H)`): the residual stream and what adds to it.
        weight (`torch.Tensor` of shape `(H,)`).
    """
    H = x.shape[-1]
    x2 = _unit_stride(x.reshape(-1, H))  # x2: [T, H]
    d2 = x2 if delta is None else _unit_stride(delta.reshape(-1, H))
    out = x2.new_empty(x2.shape)  # out: [T, H], contiguous (the kernel writes rows of H)
    s = x2 if delta is None else x2.new_empty(x2.shape)
    if x2.shape[0]:
        block = triton.next_power_of_2(H)
        _add_rms_norm[(x2.shape[0],)](
            x2, d2, weight, out, s, H, x2.stride(0), d2.stride(0), float(eps),
            HAS_DELTA=delta is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    return out.view(x.shape), s.view(x.shape)


def rotary_into_cache_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int, keys: torch.Tensor,
                       values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Rotate the query heads of `qkv` in place, and write its rotated key heads and its value heads to the cache:
    token `(n, w)` to row `rows[n]`, column `cols[w]` of `keys` and `values`.

    Args:
        qkv (`torch.Tensor` of shape `(N, W, Hq + 2 Hkv, D)`): the fused projection's output, heads split.
        cos, sin (`torch.Tensor` of shape `(N, W, D)`).
        keys, values (`torch.Tensor` of shape `(B, Hkv, C, D)`): the layer's cache buffers (last dimension
            contiguous).
        rows (`torch.LongTensor` of shape `(N,)`), cols (`torch.LongTensor` of shape `(W,)`): where each token goes.
    Returns:
        `qkv`'s query heads `(N, W, Hq, D)`.
    """
    N, W, H, D = qkv.shape
    heads = qkv.view(N * W, H, D)  # heads: [T, H, D], a view
    assert heads.stride(2) == 1 and keys.stride(3) == 1 and values.stride() == keys.stride()
    cos, sin = cos.reshape(N * W, D).contiguous(), sin.reshape(N * W, D).contiguous()  # cos: [T, D]
    if N * W:
        _rotary_into_cache[(N * W, H)](
            heads, cos, sin, keys, values, rows, cols, heads.stride(0), heads.stride(1), D, W, q_heads,
            (H - q_heads) // 2, keys.stride(0), keys.stride(1), keys.stride(2), HALF=D // 2,
            BLOCK=triton.next_power_of_2(D // 2),
        )  # fmt: skip
    return qkv[:, :, :q_heads]


def attention_fits(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether `decode_attention` serves queries `q` `(N, W, Hq, D)` over key buffers `keys` `(B, Hkv, C, D)`: when
    `ATTENTION` is on, D is a power of 2 from 16 and a KV head's queries fill one tile (the caller has asked
    `usable` of the forward's hidden states, which tries this kernel too while `ATTENTION` is on)."""
    W, Hq, D = q.shape[1:]
    Hkv = keys.shape[1]
    fits = Hq % Hkv == 0 and Hq // Hkv * W <= MAX_ATTENTION_QUERIES and D >= 16 and D & (D - 1) == 0
    return ATTENTION and fits


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                     colmask: torch.Tensor, cols: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
    """`softmax(q k^T * scale) v` for grouped-query heads over the columns `[0, cols[-1]]` of the cache rows `rows`,
    each query seeing its row's valid columns up to its own and its own column (padding sees itself): the mask the
    fast path builds, computed here from the column mask instead of read. Columns after the chunk's last are never
    read.

    Args:
        q (`torch.Tensor` of shape `(N, W, Hq, D)`): the chunk's queries (last dimension contiguous; a view into
            the fused projection's output); head h reads key/value head h // (Hq / Hkv).
        keys, values (`torch.Tensor` of shape `(B, Hkv, C, D)`): the layer's cache buffers.
        rows (`torch.LongTensor` of shape `(N,)`): each query row's cache row.
        colmask (`torch.BoolTensor` of shape `(B, C)`): each cache row's valid columns (the chunk's included).
        cols (`torch.LongTensor` of shape `(W,)`): the chunk's columns, ascending.
    Returns:
        `torch.Tensor` of shape `(N, W, Hq * D)`, as the output projection takes it.
    """
    N, W, Hq, D = q.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    assert q.stride(3) == 1 and keys.stride(3) == 1 and values.stride() == keys.stride() and colmask.stride(1) == 1
    out = q.new_empty(N, W, Hq, D)
    M = max(16, triton.next_power_of_2(G * W))  # the tile's query rows
    S = attention_splits(N, Hkv, keys.shape[2])
    part = stat = out  # SPLIT: each run's sums, maxima and sums of exponentials
    if S > 1:
        part = torch.empty(N * Hkv * S * M, D, device=q.device, dtype=torch.float32)
        stat = torch.empty(N * Hkv * S * M, 2, device=q.device, dtype=torch.float32)
    if N * W:
        _decode_attention[(N, Hkv, S)](
            q, keys, values, rows, colmask.view(torch.uint8), cols, out, part, stat, q.stride(0), q.stride(1),
            q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2), colmask.stride(0), out.stride(0),
            out.stride(1), out.stride(2), W, G, float(scale), torch.finfo(q.dtype).min, D=D, M=M, BLOCK_C=64,
            SPLIT=S > 1, PRECISION="ieee" if q.dtype == torch.float32 or INTERPRET else "tf32",  # float32 in full
            UPCAST=INTERPRET and q.dtype != torch.float32,
        )  # fmt: skip
        if S > 1:
            _attention_combine[(N, Hkv)](
                part, stat, out, out.stride(0), out.stride(1), out.stride(2), W, G, S, D=D, M=M
            )  # fmt: skip
    return out.view(N, W, Hq * D)


def attention_splits(rows: int, kv_heads: int, capacity: int) -> int:
    """Runs of columns `decode_attention` splits a cache of `capacity` columns into for `rows` x `kv_heads`
    programs: enough programs to fill the GPU's SMs (about 128), each run at least `MIN_SPLIT_COLUMNS` columns, at
    most `MAX_ATTENTION_SPLITS`; 1 (no split, no combining kernel) where the rows and heads fill it already or the
    cache is short."""
    if not ATTENTION_SPLIT:
        return 1
    return max(1, min(MAX_ATTENTION_SPLITS, capacity // MIN_SPLIT_COLUMNS, 128 // max(1, rows * kv_heads)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: by `gemv` where `gemv_config` chose it, else cuBLAS."""
    config = gemv_config(x, weight, bias)
    return F.linear(x, weight, bias) if config is None else gemv(x, weight, bias, config)


def gemv_config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple | None:
    """The `gemv` configuration for `x` `(..., K)` times `weight`: for one token (or, with `SKINNY`, up to
    `MAX_SKINNY_ROWS`) and a weight up to `MAX_GEMV_BYTES`, where `gemv_choice` measured it faster; None: cuBLAS."""
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0  # tokens
    fits = M == 1 or (SKINNY and 1 < M <= MAX_SKINNY_ROWS)
    if GEMV and ENABLED and fits and weight.numel() * weight.element_size() <= MAX_GEMV_BYTES:
        return gemv_choice(x, weight, bias)
    return None


# by (device, dtype, N, K, bias, rows bucket): a `GEMV_CONFIGS` / `SKINNY_CONFIGS` entry, None: cuBLAS
_GEMV_CHOICE: dict[tuple, tuple | None] = {}


def rows_bucket(M: int) -> int:
    """The rows `gemv` computes for M tokens: 1, or a power of 2 from 16 (its tensor-core form's tile)."""
    return 1 if M == 1 else max(16, 1 << (M - 1).bit_length())


def gemv_choice(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple | None:
    """The fastest configuration of `gemv` for `x`'s tokens times `weight` `(N, K)` on x's device, or None where
    cuBLAS is faster (by `GEMV_MIN_GAIN`), is not CUDA, or nothing was measured yet and a graph is being captured.
    Measured once per shape and `rows_bucket`: each candidate runs over copies of the weight adding up to more than
    the L2 cache, in a CUDA graph, against `F.linear` the same way."""
    K = x.shape[-1]
    rows = rows_bucket(x.numel() // K)
    key = (str(x.device), x.dtype, *weight.shape, bias is not None, rows)
    if key not in _GEMV_CHOICE:
        if not x.is_cuda or not AVAILABLE or torch.cuda.is_current_stream_capturing():
            return None
        _GEMV_CHOICE[key] = _measure_gemv(x.new_zeros(rows, K).copy_(x.reshape(-1, K)[:1]), weight, bias)
    return _GEMV_CHOICE[key]


def gemv_choices() -> dict[tuple, tuple | None]:
    """What `gemv_choice` measured so far: (device, dtype, N, K, bias, rows) -> configuration, None for cuBLAS."""
    return dict(_GEMV_CHOICE)


def _weight_copies(weight: torch.Tensor) -> list[torch.Tensor] | None:
    """Copies of `weight` adding up to more than an L2 cache (so timed products read it from memory), as many as a
    model's layers at most; None where the GPU has no room for them."""
    size = weight.numel() * weight.element_size()
    try:
        return [weight.clone() for _ in range(max(2, min(28, -(-(256 << 20) // size))))]  # beyond a 50 MB L2
    except torch.cuda.OutOfMemoryError:
        return None


def fusion_pays(fusion: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                config: tuple[int, int, int, int], heads: tuple[int, int] | None = None) -> bool:  # fmt: skip
    """Whether `gemv` in `config` with `fusion` inside (`"norm"`: the RMS norm before; `"gated"`: the SiLU product
    after, of a fused gate/up `weight`; `"rotary"`: the rotary embedding and the cache writes after, of a fused qkv
    `weight` of `heads` = (query heads, head size)) measured at least as fast as with that work in its own kernel
    (`add_rms_norm`, `silu_mul`, `rotary_into_cache_`), for `x`'s tokens on its device: timed once per shape as
    `gemv_choice` times. Under the interpreter (tests) always; on a GPU, False while a graph is being captured and
    nothing was measured."""
    K = x.shape[-1]
    key = (fusion, str(x.device), x.dtype, *weight.shape, bias is not None, rows_bucket(x.numel() // K), config)
    key = key if heads is None else (*key, *heads)
    if key not in _FUSION_PAYS:
        if not x.is_cuda:
            return INTERPRET
        if torch.cuda.is_current_stream_capturing():
            return False
        _FUSION_PAYS[key] = _measure_fusion(fusion, x.reshape(-1, K).clone(), weight, bias, config, heads)
    return _FUSION_PAYS[key]


_FUSION_PAYS: dict[tuple, bool] = {}  # by (fusion, device, dtype, N, K, bias, rows bucket, configuration[, heads])


def fusion_choices() -> dict[tuple, bool]:
    """What `fusion_pays` measured so far: (fusion, device, dtype, N, K, bias, rows, configuration) -> inside."""
    return dict(_FUSION_PAYS)


def _measure_fusion(fusion: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    config: tuple[int, int, int, int], heads: tuple[int, int] | None = None) -> bool:  # fmt: skip
    """`fusion_pays`'s timing for `x` `(M, K)`: each way over `_weight_copies`, in CUDA graphs (`graph_timings`)."""
    copies = _weight_copies(weight)
    if copies is None:
        return False
    g = torch.ones(x.shape[-1], device=x.device, dtype=x.dtype)
    if fusion == "norm":
        ways = {"inside": lambda: [gemv(x, w, bias, config, norm=(g, 1e-6)) for w in copies],
                "apart": lambda: [gemv(add_rms_norm(x, g, 1e-6)[0], w, bias, config) for w in copies]}  # fmt: skip
    elif fusion == "rotary":  # each token into its own row of a one-column cache
        (M, _), (q_heads, D) = x.shape, heads
        cos, sin = (torch.rand(M, 1, D, device=x.device, dtype=x.dtype) for _ in range(2))
        keys = torch.zeros(M, (weight.shape[0] // D - q_heads) // 2, 1, D, device=x.device, dtype=x.dtype)
        at = (torch.arange(M, device=x.device), torch.zeros(1, dtype=torch.long, device=x.device))  # rows, column
        rope = (cos, sin, q_heads, keys, torch.zeros_like(keys), *at)
        ways = {"inside": lambda: [gemv(x, w, bias, config, rotary=rope) for w in copies],
                "apart": lambda: [rotary_into_cache_(gemv(x, w, bias, config).view(M, 1, -1, D), *rope)
                                  for w in copies]}  # fmt: skip
    else:
        ways = {"inside": lambda: [gemv(x, w, bias, config, gated=True) for w in copies],
                "apart": lambda: [silu_mul(gemv(x, w, bias, config)) for w in copies]}  # fmt: skip
    ways = _builds(ways)
    if len(ways) < 2:  # the fused tiles need more shared memory than the GPU has
        return False
    seconds = graph_timings(ways, x.device)
    return seconds["inside"] <= seconds["apart"]


def _measure_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple | None:
    """`gemv_choice`'s timing for `x` `(rows, K)`: cuBLAS and each configuration that builds, over
    `_weight_copies`, in CUDA graphs (`graph_timings`, on a side stream: the caller may be warming a capture up)."""
    copies = _weight_copies(weight)
    if copies is None:  # no room to time it: cuBLAS
        return None
    out = x.new_empty(x.shape[0], weight.shape[0])
    ways = {None: lambda: [F.linear(x, w, bias) for w in copies]}
    for config in GEMV_CONFIGS if len(x) == 1 else SKINNY_CONFIGS:
        ways[config] = lambda c=config: [gemv(x, w, bias, c, out) for w in copies]
    times = graph_timings(_builds(ways), x.device)
    best = min(times, key=lambda c: times[c])
    return best if best is not None and times[best] <= GEMV_MIN_GAIN * times[None] else None


def _builds(ways: dict) -> dict:
    """The entries of `ways` (name -> a callable launching kernels) that run once without an error (Triton cannot
    build some configurations on some GPUs: tiles needing more shared memory than an SM has)."""
    out = {}
    for name, fn in ways.items():
        try:
            fn()
        except Exception:
            continue
        out[name] = fn
    return out


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, pool=None):
    """Capture `graph` on `stream` (`torch.cuda.graph`, which collects garbage first) in thread-local error mode, so
    that another thread's CUDA calls cannot invalidate it, with Python's cyclic garbage collector paused: an object
    holding a CUDA graph that a collection frees mid-capture (a released cache's) resets that graph, which a capture
    does not permit (a capture on an H100 failed so once, after such resets)."""
    collecting = gc.isenabled()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        gc.disable()
        try:
            yield
        finally:
            if collecting:
                gc.enable()


def graph_seconds(fn, device: torch.device, replays: int = 3, warmups: int = 1) -> float:
    """The device time of the kernels `fn` launches, back to back with no launch gaps, in seconds: `graph_timings`
    of `fn` alone, best of `replays` timings."""
    return graph_timings({None: fn}, device, rounds=replays, warmups=warmups)[None]


def graph_timings(fns: dict, device: torch.device, rounds: int = 3, warmups: int = 1,
                  min_seconds: float = 2e-3) -> dict:  # fmt: skip
    """The device time of each of `fns` (name -> a callable launching kernels), in seconds, to compare them: each
    is captured as a CUDA graph on a side stream (after `warmups` runs there), then all are timed in `rounds`
    rounds that take every graph in turn, so that a change of clocks or of the GPU's load falls on all alike; a
    timing replays its graph back to back for at least `min_seconds` (a graph of a few kernels after an idle spell
    would time the GPU waking up). The best round of each."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        graphs = {}
        for name, fn in fns.items():
            for _ in range(warmups):
                fn()
            graphs[name] = torch.cuda.CUDAGraph()
            with capturing(graphs[name], side):  # as `fast` captures
                fn()
        # replays per timing, from one replay of each (also each graph's first, which uploads it)
        replays = {name: max(1, min(1000, math.ceil(min_seconds / max(_replays_seconds(g, side, 1), 1e-7))))
                   for name, g in graphs.items()}  # fmt: skip
        best = dict.fromkeys(graphs, float("inf"))
        for _ in range(rounds):
            for name, g in graphs.items():
                best[name] = min(best[name], _replays_seconds(g, side, replays[name]))
    torch.cuda.current_stream(device).wait_stream(side)
    return best


def _replays_seconds(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, n: int) -> float:
    """Seconds per replay of `graph` over `n` replays back to back on `stream`, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(n):
        graph.replay()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple[int, int, int, int],
         out: torch.Tensor | None = None, *, norm: tuple[torch.Tensor, float] | None = None, gated: bool = False,
         residual: torch.Tensor | None = None, rotary: tuple | None = None) -> torch.Tensor:  # fmt: skip
    """A few tokens times a weight, `F.linear(x, weight, bias)` for `x` `(..., K)`, each program streaming `BLOCK_N`
    rows of `weight` `(N, K)` in blocks of `BLOCK_K` columns through every token, summed in float32 and rounded once
    (bias included): one token as products and sums (`_gemv`), more as tensor-core products with the tokens padded
    to `rows_bucket` rows (`_skinny`). `config`: `(BLOCK_N, BLOCK_K, num_warps, num_stages)`, as in `GEMV_CONFIGS`
    (one token) or `SKINNY_CONFIGS` (whose BLOCK_K counts 2-byte columns: float32 loads half as many, so that its
    tiles take the shared memory the configuration was measured with).

    The elementwise work around a decoder's projections can run inside, a kernel fewer each:
        norm (`(weight, eps)`): the product of the RMS norm of x (`F.linear(rms_norm(x) * norm weight, ...)`),
            the norm's scale applied to the float32 sums (so not rounded between, as eager is; the tensor-core form
            rounds `x * norm weight` to x's dtype for its products).
        gated: `weight` is a fused gate/up `(2 I, K)` and the result `silu(gate) * up` `(..., I)`, each program
            taking a gate row and its up row (rounded as `silu_mul` after the products).
        residual (`(..., N)`): added to the rounded result (`residual + F.linear(...)`, as eager adds).
        rotary (`rotary_into_cache_`'s arguments after the heads: `(cos, sin, q_heads, keys, values, rows, cols)`,
            for x's `(len(rows), len(cols))` tokens): `weight` is a fused qkv and that function's work on the
            result runs inside, each program taking pairs of a head's rows d and d + D / 2 (rounded as it rounds,
            after the product's rounding): the rotated key and the value heads go to the cache, and the result is
            the rotated query heads `(..., q_heads * D)`.
    """
    N, K = weight.shape
    x2 = _unit_stride(x.reshape(-1, K))  # x2: [M, K]
    M = x2.shape[0]
    w = _unit_stride(weight)
    width = N // 2 if gated else N  # output features
    b = w if bias is None else bias
    g, eps = norm if norm is not None else (w, 0.0)
    r = w if residual is None else residual.reshape(M, width).contiguous()
    fusions = {"NORM": norm is not None, "GATED": gated, "RESIDUAL": residual is not None}
    block_n, block_k, warps, stages = config
    if rotary is not None:
        assert not gated and residual is None, "the rotary epilogue takes a plain qkv"
        cos, sin, q_heads, keys, values, rows, cols = rotary
        D = keys.shape[-1]
        assert keys.stride(3) == 1 and values.stride() == keys.stride() and N % D == 0 and D % 2 == 0
        assert cos.numel() == sin.numel() == M * D and len(cols) * len(rows) == M
        width = q_heads * D  # the queries
        c, s = (_unit_stride(t.reshape(M, D)) for t in (cos, sin))  # c, s: [M, D], each token's
        features, second = N // 2, D // 2  # pairs of rows
        rope = (c, s, keys, values, rows, cols, len(cols), q_heads, (N // D - q_heads) // 2, *keys.stride()[:3])
        fusions |= {"ROTARY": True, "HALF": D // 2}
    else:
        features, second = width, width
        rope = (w, w, w, w, w, w, 1, 0, 0, 0, 0, 0)
        fusions |= {"ROTARY": False, "HALF": 1}
    out = x2.new_empty(M, width) if out is None else out
    n = N if rotary is not None else width  # rows the kernel reads as features (pairs of them: ROTARY)
    if M == 1:
        _gemv[(triton.cdiv(features, block_n),)](
            x2, w, b, g, r, out, n, K, w.stride(0), float(eps), second, *rope,
            HAS_BIAS=bias is not None, **fusions, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip
    elif M:
        _skinny[(triton.cdiv(features, block_n),)](
            x2, w, b, g, r, out, M, n, K, x2.stride(0), w.stride(0), float(eps), second, *rope,
            HAS_BIAS=bias is not None, **fusions, ROWS=rows_bucket(M), BLOCK_N=block_n,
            BLOCK_K=max(16, block_k * 2 // x2.element_size()), UPCAST=INTERPRET and x2.dtype != torch.float32,
            PRECISION="ieee" if x2.dtype == torch.float32 or INTERPRET else "tf32", num_warps=warps,
            num_stages=stages,
        )  # fmt: skip
    return out.view(*x.shape[:-1], width)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up = cat(gate, up)` `(..., 2 I)`: `(..., I)`, each operation rounded to its dtype."""
    I2 = gate_up.shape[-1]
    g2 = _unit_stride(gate_up.reshape(-1, I2))  # g2: [T, 2 I]
    out = g2.new_empty(g2.shape[0], I2 // 2)
    block = 1024
    if g2.shape[0]:
        _silu_mul[(g2.shape[0], triton.cdiv(I2 // 2, block))](g2, out, I2 // 2, g2.stride(0), BLOCK=block)
    return out.view(*gate_up.shape[:-1], I2 // 2)


if triton is not None:

    @triton.jit
    def _add_rms_norm(X, D, Wt, OUT, S, H, stride_x, stride_d, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        """One token per program: S = X + D (rounded), OUT = Wt * (S * rsqrt(mean(S²) + eps)) (rounded after each)."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < H
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
        if HAS_DELTA:
            d = tl.load(D + row * stride_d + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(S + row * H + cols, x, mask=m)
        xf = x.to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
        y = (xf * inv).to(X.dtype.element_ty)
        w = tl.load(Wt + cols, mask=m, other=0.0)
        tl.store(OUT + row * H + cols, (w.to(tl.float32) * y.to(tl.float32)).to(X.dtype.element_ty), mask=m)

    @triton.jit
    def _finish(y, up, B, R, n, r_offset, N, live, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                RESIDUAL: tl.constexpr, dt: tl.constexpr):  # fmt: skip
        """The float32 sums `y` (GATED: and `up`, of weight rows N + n) of output features n, biased, gated
        (silu(gate) * up, rounded after each as `silu_mul`), the residual R added (at `r_offset + n`): in dt."""
        if HAS_BIAS:
            y += tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)
            if GATED:
                up += tl.load(B + N + n, mask=n < N, other=0.0).to(tl.float32)
        if GATED:
            gate, up = y.to(dt).to(tl.float32), up.to(dt).to(tl.float32)
            y = ((gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up).to(dt).to(tl.float32)
        if RESIDUAL:
            y = y.to(dt).to(tl.float32) + tl.load(R + r_offset + n, mask=live, other=0.0).to(tl.float32)
        return y.to(dt)

    @triton.jit
    def _features(N, ROTARY: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr):
        """A program's BLOCK_N output features i of N: the weight row n of each, and whether it is one. ROTARY: pair
        i is row d = i % HALF of head i // HALF (heads of 2 HALF rows), read with its row d + HALF."""
        i = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        if ROTARY:
            return i, (i // HALF) * (2 * HALF) + i % HALF, i < N // 2
        return i, i, i < N

    @triton.jit
    def _gemv(X, Wt, B, G, R, OUT, N, K, stride_w, eps, second, C, S, KC, VC, KROWS, KCOLS, W, HQ, HKV,
              stride_krow, stride_khead, stride_kcol, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
              RESIDUAL: tl.constexpr, ROTARY: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):  # fmt: skip
        """BLOCK_N output features per program: OUT = X Wt^T (+ B) for one token, products summed in float32 per
        lane over the blocks of K, then across lanes, rounded once. NORM: X's RMS norm times G is the input (its
        scale applied to the sums); GATED: Wt has 2 N rows and OUT = silu(gate) * up of its two halves' results
        (`second` = N rows apart); RESIDUAL: OUT = R + the rounded result; ROTARY: Wt is a fused qkv of N rows in
        heads of 2 HALF, each program taking BLOCK_N pairs of a head's row d and its row d + HALF (`second` =
        HALF), the result stored as `_rotary_store` does."""
        i, n, live = _features(N, ROTARY, HALF, BLOCK_N)  # i, n, live: [BLOCK_N]
        rows = live[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # GATED: the up half's; ROTARY: the rows d + HALF
        squares = tl.zeros([BLOCK_K], tl.float32)  # NORM: X's squares, per lane
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            at = Wt + n[:, None] * stride_w + k[None, :]
            w = tl.load(at, mask=rows & (k[None, :] < K), other=0.0, eviction_policy="evict_first")
            x = tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)
            if NORM:
                squares += x * x
                x = x * tl.load(G + k, mask=k < K, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
            if GATED or ROTARY:
                w_up = tl.load(
                    at + second * stride_w, mask=rows & (k[None, :] < K), other=0.0, eviction_policy="evict_first"
                )
                acc_up += w_up.to(tl.float32) * x[None, :]
        y, up = tl.sum(acc, 1), tl.sum(acc_up, 1)  # y: [BLOCK_N]
        if NORM:
            scale = tl.math.rsqrt(tl.sum(squares, 0) / K + eps)
            y, up = y * scale, up * scale
        if ROTARY:
            _rotary_store(y, up, B, OUT, C, S, KC, VC, KROWS, KCOLS, i, n, live, 0, 1, W, HQ, HKV, stride_krow,
                          stride_khead, stride_kcol, HAS_BIAS, HALF, OUT.dtype.element_ty)  # fmt: skip
        else:
            out = _finish(y, up, B, R, n, 0, N, live, HAS_BIAS, GATED, RESIDUAL, OUT.dtype.element_ty)
            tl.store(OUT + n, out, mask=live)

    @triton.jit
    def _rotary_store(y, up, B, OUT, C, S, KC, VC, KROWS, KCOLS, i, n, live, t, M, W, HQ, HKV, stride_krow,
                      stride_khead, stride_kcol, HAS_BIAS: tl.constexpr, HALF: tl.constexpr,
                      dt: tl.constexpr):  # fmt: skip
        """The float32 sums `y` and `up` of a qkv's rows n and n + HALF (pair i: row d = i % HALF of head i // HALF)
        for tokens t (0, or a column of token indices below M; a chunk of W tokens per cache row), biased and
        rounded as the projection's output, then as `_rotary_into_cache` does: a query head's pair rotated by its
        token's C (cos) and S (sin) into OUT (the queries, HQ heads of 2 HALF per token), a key head's rotated
        into KC, a value head's as it is into VC, at the token's cache row KROWS[t // W] and column KCOLS[t % W]."""
        if HAS_BIAS:
            y += tl.load(B + n, mask=live, other=0.0).to(tl.float32)
            up += tl.load(B + n + HALF, mask=live, other=0.0).to(tl.float32)
        y1, y2 = y.to(dt), up.to(dt)
        head, d = i // HALF, i % HALF
        f1, f2 = y1.to(tl.float32), y2.to(tl.float32)
        cs = t * (2 * HALF) + d  # the token's cos and sin, contiguous per token
        c1 = tl.load(C + cs, mask=live, other=0.0).to(tl.float32)
        c2 = tl.load(C + cs + HALF, mask=live, other=0.0).to(tl.float32)
        s1 = tl.load(S + cs, mask=live, other=0.0).to(tl.float32)
        s2 = tl.load(S + cs + HALF, mask=live, other=0.0).to(tl.float32)
        o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
        is_q = live & (head < HQ)
        q = OUT + t * (HQ * 2 * HALF) + n
        tl.store(q, o1, mask=is_q)
        tl.store(q + HALF, o2, mask=is_q)
        row = tl.load(KROWS + t // W, mask=t < M, other=0)
        at = row * stride_krow + tl.load(KCOLS + t % W, mask=t < M, other=0) * stride_kcol + d
        is_k = live & (head >= HQ) & (head < HQ + HKV)
        tl.store(KC + at + (head - HQ) * stride_khead, o1, mask=is_k)
        tl.store(KC + at + (head - HQ) * stride_khead + HALF, o2, mask=is_k)
        is_v = live & (head >= HQ + HKV)
        tl.store(VC + at + (head - HQ - HKV) * stride_khead, y1, mask=is_v)
        tl.store(VC + at + (head - HQ - HKV) * stride_khead + HALF, y2, mask=is_v)

    @triton.jit
    def _skinny(X, Wt, B, G, R, OUT, M, N, K, stride_x, stride_w, eps, second, C, S, KC, VC, KROWS, KCOLS, W, HQ,
                HKV, stride_krow, stride_khead, stride_kcol, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                GATED: tl.constexpr, RESIDUAL: tl.constexpr, ROTARY: tl.constexpr, HALF: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):  # fmt: skip
        """BLOCK_N output features per program for M <= ROWS tokens: OUT = X Wt^T (+ B), tensor-core products of
        the (padded) tokens with blocks of K weight columns, summed in float32, rounded once. NORM, GATED,
        RESIDUAL and ROTARY as in `_gemv` (the normed input rounded to X's dtype for the products; ROTARY: tokens
        in rows of W, as `_rotary_store` takes them)."""
        dt = OUT.dtype.element_ty
        i, n, features = _features(N, ROTARY, HALF, BLOCK_N)  # i, n, features: [BLOCK_N]
        m = tl.arange(0, ROWS)  # m: [ROWS]
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        acc_up = tl.zeros([ROWS, BLOCK_N], tl.float32)  # GATED: the up half's; ROTARY: the rows d + HALF
        squares = tl.zeros([ROWS], tl.float32)  # NORM: each token's sum of squares
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(X + m[:, None] * stride_x + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            if NORM:
                xf = x.to(tl.float32)
                squares += tl.sum(xf * xf, 1)
                x = (xf * tl.load(G + k, mask=k < K, other=0.0).to(tl.float32)[None, :]).to(dt)
            at = Wt + n[:, None] * stride_w + k[None, :]
            live = features[:, None] & (k[None, :] < K)
            w = tl.load(at, mask=live, other=0.0, eviction_policy="evict_first")
            if UPCAST:  # the interpreter multiplies bfloat16 matrices wrongly: in float32 there
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)  # [ROWS, BLOCK_N]
            if GATED or ROTARY:
                w_up = tl.load(at + second * stride_w, mask=live, other=0.0, eviction_policy="evict_first")
                if UPCAST:
                    w_up = w_up.to(tl.float32)
                acc_up += tl.dot(x, tl.trans(w_up), input_precision=PRECISION)
        if NORM:
            scale = tl.math.rsqrt(squares / K + eps)[:, None]
            acc, acc_up = acc * scale, acc_up * scale
        live = (m[:, None] < M) & features[None, :]
        if ROTARY:
            _rotary_store(acc, acc_up, B, OUT, C, S, KC, VC, KROWS, KCOLS, i[None, :], n[None, :], live, m[:, None],
                          M, W, HQ, HKV, stride_krow, stride_khead, stride_kcol, HAS_BIAS, HALF, dt)  # fmt: skip
        else:
            out = _finish(acc, acc_up, B, R, n[None, :], m[:, None] * N, N, live, HAS_BIAS, GATED, RESIDUAL, dt)
            tl.store(OUT + m[:, None] * N + n[None, :], out, mask=live)

    @triton.jit
    def _silu_mul(GU, OUT, width, stride_gu, BLOCK: tl.constexpr):
        """One token and BLOCK columns per program: OUT = silu(gate) * up, rounded after each as eager."""
        row, blk = tl.program_id(0), tl.program_id(1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        m = cols < width
        dt = GU.dtype.element_ty
        g = tl.load(GU + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + width + cols, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(OUT + row * width + cols, (s * u).to(dt), mask=m)

    @triton.jit
    def _rotary_into_cache(QKV, COS, SIN, K, V, ROWS, COLS, stride_tok, stride_head, stride_cos, W, HQ, HKV,
                           stride_row, stride_kvhead, stride_col, HALF: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """One (token, head) per program: a query head rotated in place, a key head rotated into K, a value head
        copied into V, at the token's cache row and column."""
        tok, head = tl.program_id(0), tl.program_id(1)
        i = tl.arange(0, BLOCK)
        m = i < HALF
        src = QKV + tok * stride_tok + head * stride_head
        dt = QKV.dtype.element_ty
        x1 = tl.load(src + i, mask=m, other=0.0)
        x2 = tl.load(src + HALF + i, mask=m, other=0.0)
        row = tl.load(ROWS + tok // W)
        col = tl.load(COLS + tok % W)
        if head < HQ + HKV:
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)  # new names: a block may not retype a variable
            c1 = tl.load(COS + tok * stride_cos + i, mask=m, other=0.0).to(tl.float32)
            c2 = tl.load(COS + tok * stride_cos + HALF + i, mask=m, other=0.0).to(tl.float32)
            s1 = tl.load(SIN + tok * stride_cos + i, mask=m, other=0.0).to(tl.float32)
            s2 = tl.load(SIN + tok * stride_cos + HALF + i, mask=m, other=0.0).to(tl.float32)
            o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
            o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
            if head < HQ:
                tl.store(src + i, o1, mask=m)
                tl.store(src + HALF + i, o2, mask=m)
            else:
                dst = K + row * stride_row + (head - HQ) * stride_kvhead + col * stride_col
                tl.store(dst + i, o1, mask=m)
                tl.store(dst + HALF + i, o2, mask=m)
        else:
            dst = V + row * stride_row + (head - HQ - HKV) * stride_kvhead + col * stride_col
            tl.store(dst + i, x1, mask=m)
            tl.store(dst + HALF + i, x2, mask=m)

    @triton.jit
    def _decode_attention(Q, K, V, ROWS, CM, COLS, OUT, PART, STAT, sq_n, sq_w, sq_h, sk_row, sk_head, sk_col,
                          s_cm, so_n, so_w, so_h, W, G, scale, hide, D: tl.constexpr, M: tl.constexpr,
                          BLOCK_C: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                          UPCAST: tl.constexpr):  # fmt: skip
        """One (query row, KV head) per program: its G query heads x W tokens as one tile of M rows (r = g W + w),
        an online softmax over blocks of columns up to the chunk's last; a query sees the valid columns of its cache
        row (CM) up to its own, and its own. SPLIT: program s of the third grid dimension takes the s-th of as many
        equal runs of whole blocks and leaves its unnormalised sums in PART `[.., M, D]` and its running maximum and
        sum of exponentials in STAT `[.., M, 2]` (float32), for `_attention_combine`."""
        n, h = tl.program_id(0), tl.program_id(1)
        r = tl.arange(0, M)
        g, w = r // W, r % W
        live = r < G * W  # live: [M], the tile's real queries
        d = tl.arange(0, D)
        q = tl.load(Q + n * sq_n + w[:, None] * sq_w + (h * G + g)[:, None] * sq_h + d[None, :], mask=live[:, None],
                    other=0.0)  # fmt: skip
        if UPCAST:
            q = q.to(tl.float32)
        row = tl.load(ROWS + n)
        kv = row * sk_row + h * sk_head
        own = tl.load(COLS + w)  # own: [M], each query's column
        bound = tl.load(COLS + W - 1) + 1  # columns read: [0, bound)
        if SPLIT:  # this program's run of blocks: [lo, hi)
            per = tl.cdiv(tl.cdiv(bound, BLOCK_C), tl.num_programs(2)) * BLOCK_C
            lo = tl.program_id(2) * per
            hi = tl.minimum(lo + per, bound)
        else:
            lo, hi = 0, bound
        top = tl.full([M], float("-inf"), tl.float32)  # running maximum per query
        total = tl.zeros([M], tl.float32)  # running sum of exponentials
        acc = tl.zeros([M, D], tl.float32)
        for start in range(lo, hi, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            inside = c < hi
            k = tl.load(K + kv + c[:, None] * sk_col + d[None, :], mask=inside[:, None], other=0.0)  # k: [BLOCK_C, D]
            if UPCAST:  # the interpreter multiplies bfloat16 matrices wrongly: in float32 there
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            valid = tl.load(CM + row * s_cm + c, mask=inside, other=0) != 0  # valid: [BLOCK_C]
            seen = (valid[None, :] & (c[None, :] <= own[:, None])) | (c[None, :] == own[:, None])
            # unseen columns add `hide` (the dtype's lowest, finite: a block none of whose columns a query sees
            # must not give it an all -inf row), as the additive mask the fast path builds does
            s = tl.where(inside[None, :], s * scale + tl.where(seen, 0.0, hide), float("-inf"))  # s: [M, BLOCK_C]
            new_top = tl.maximum(top, tl.max(s, 1))
            p = tl.exp(s - new_top[:, None])
            shrink = tl.exp(top - new_top)
            total = total * shrink + tl.sum(p, 1)
            v = tl.load(V + kv + c[:, None] * sk_col + d[None, :], mask=inside[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * shrink[:, None] + tl.dot(p.to(V.dtype.element_ty).to(v.dtype), v, input_precision=PRECISION)
            top = new_top
        if SPLIT:
            at = ((n * tl.num_programs(1) + h) * tl.num_programs(2) + tl.program_id(2)) * M + r  # at: [M]
            tl.store(PART + at[:, None] * D + d[None, :], acc)
            tl.store(STAT + at * 2, top)
            tl.store(STAT + at * 2 + 1, total)
        else:
            o = acc / total[:, None]
            dst = OUT + n * so_n + w[:, None] * so_w + (h * G + g)[:, None] * so_h + d[None, :]
            tl.store(dst, o.to(OUT.dtype.element_ty), mask=live[:, None])

    @triton.jit
    def _attention_combine(PART, STAT, OUT, so_n, so_w, so_h, W, G, S, D: tl.constexpr, M: tl.constexpr):
        """One (query row, KV head) per program: the S runs' sums of `_decode_attention` (SPLIT) rescaled to their
        common maximum and normalised, as one online softmax over all the columns would give them."""
        n, h = tl.program_id(0), tl.program_id(1)
        r = tl.arange(0, M)
        g, w = r // W, r % W
        d = tl.arange(0, D)
        first = (n * tl.num_programs(1) + h) * S * M + r  # first: [M], each query's entry of run 0
        top = tl.full([M], float("-inf"), tl.float32)
        for s in range(0, S):
            top = tl.maximum(top, tl.load(STAT + (first + s * M) * 2))
        total = tl.zeros([M], tl.float32)
        acc = tl.zeros([M, D], tl.float32)
        for s in range(0, S):
            at = first + s * M
            f = tl.exp(tl.load(STAT + at * 2) - top)  # a run without columns: its maximum -inf, f 0
            total += f * tl.load(STAT + at * 2 + 1)
            acc += f[:, None] * tl.load(PART + at[:, None] * D + d[None, :])
        o = acc / total[:, None]
        dst = OUT + n * so_n + w[:, None] * so_w + (h * G + g)[:, None] * so_h + d[None, :]
        tl.store(dst, o.to(OUT.dtype.element_ty), mask=(r < G * W)[:, None])
