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

The projections stay cuBLAS's: a Triton GEMV of a few tokens (4 weight rows per program) made a draft token slower
on an H200 (2.05 -> 3.01 ms at batch 1), and was removed.

Each rounds where the model's own modules round (to the model's dtype after every operation they run in it). The
results equal the eager ones within a unit of rounding (the norm sums in another order); on an H200 the compiled
rotation was 6 units apart in a bfloat16 sum that cancels (presumably an intermediate rounding dropped by the
compiler), within one unit at the values' scale. They run on CUDA tensors, and on CPU tensors under Triton's
interpreter (`TRITON_INTERPRET=1`, how the tests check them). `usable(x)` says whether they can run on `x`: without
Triton, or where they fail to build or launch on its device (tried once, with a warning), the caller keeps the
eager operations.
"""

from __future__ import annotations

import os
import warnings

import torch

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
            decode_attention(q, keys, values, rows, torch.zeros(1, 1, 1, 2, device=dev, dtype=dt), cols, 1.0)
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
                     mask: torch.Tensor, cols: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
    """`softmax(q k^T * scale + mask) v` for grouped-query heads over the columns `[0, cols[-1]]` of the cache
    rows `rows`; columns after the chunk's last are never read (the mask hides them anyway).

    Args:
        q (`torch.Tensor` of shape `(N, W, Hq, D)`): the chunk's queries (last dimension contiguous; a view into
            the fused projection's output); head h reads key/value head h // (Hq / Hkv).
        keys, values (`torch.Tensor` of shape `(B, Hkv, C, D)`): the layer's cache buffers.
        rows (`torch.LongTensor` of shape `(N,)`): each query row's cache row.
        mask (`torch.Tensor` of shape `(N, 1, W, C)`): additive.
        cols (`torch.LongTensor` of shape `(W,)`): the chunk's columns, ascending.
    Returns:
        `torch.Tensor` of shape `(N, W, Hq * D)`, as the output projection takes it.
    """
    N, W, Hq, D = q.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    assert q.stride(3) == 1 and keys.stride(3) == 1 and values.stride() == keys.stride() and mask.stride(3) == 1
    out = q.new_empty(N, W, Hq, D)
    if N * W:
        _decode_attention[(N, Hkv)](
            q, keys, values, rows, mask, cols, out, q.stride(0), q.stride(1), q.stride(2), keys.stride(0),
            keys.stride(1), keys.stride(2), mask.stride(0), mask.stride(2), out.stride(0), out.stride(1),
            out.stride(2), W, G, float(scale), D=D,
            M=max(16, triton.next_power_of_2(G * W)), BLOCK_C=64,
            PRECISION="ieee" if q.dtype == torch.float32 or INTERPRET else "tf32",  # float32 in full
            UPCAST=INTERPRET and q.dtype != torch.float32,
        )  # fmt: skip
    return out.view(N, W, Hq * D)


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
    def _decode_attention(Q, K, V, ROWS, MASK, COLS, OUT, sq_n, sq_w, sq_h, sk_row, sk_head, sk_col, sm_n, sm_w,
                          so_n, so_w, so_h, W, G, scale, D: tl.constexpr, M: tl.constexpr, BLOCK_C: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
        """One (query row, KV head) per program: its G query heads x W tokens as one tile of M rows (r = g W + w),
        an online softmax over blocks of columns up to the chunk's last."""
        n, h = tl.program_id(0), tl.program_id(1)
        r = tl.arange(0, M)
        g, w = r // W, r % W
        live = r < G * W  # live: [M], the tile's real queries
        d = tl.arange(0, D)
        q = tl.load(Q + n * sq_n + w[:, None] * sq_w + (h * G + g)[:, None] * sq_h + d[None, :], mask=live[:, None],
                    other=0.0)  # fmt: skip
        if UPCAST:
            q = q.to(tl.float32)
        kv = tl.load(ROWS + n) * sk_row + h * sk_head
        bound = tl.load(COLS + W - 1) + 1  # columns read: [0, bound)
        top = tl.full([M], float("-inf"), tl.float32)  # running maximum per query
        total = tl.zeros([M], tl.float32)  # running sum of exponentials
        acc = tl.zeros([M, D], tl.float32)
        for start in range(0, bound, BLOCK_C):
            c = start + tl.arange(0, BLOCK_C)
            inside = c < bound
            k = tl.load(K + kv + c[:, None] * sk_col + d[None, :], mask=inside[:, None], other=0.0)  # k: [BLOCK_C, D]
            if UPCAST:  # the interpreter multiplies bfloat16 matrices wrongly: in float32 there
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            add = tl.load(MASK + n * sm_n + w[:, None] * sm_w + c[None, :], mask=live[:, None] & inside[None, :],
                          other=0.0)  # fmt: skip
            s = tl.where(inside[None, :], s * scale + add.to(tl.float32), float("-inf"))  # s: [M, BLOCK_C]
            new_top = tl.maximum(top, tl.max(s, 1))
            p = tl.exp(s - new_top[:, None])
            shrink = tl.exp(top - new_top)
            total = total * shrink + tl.sum(p, 1)
            v = tl.load(V + kv + c[:, None] * sk_col + d[None, :], mask=inside[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * shrink[:, None] + tl.dot(p.to(V.dtype.element_ty).to(v.dtype), v, input_precision=PRECISION)
            top = new_top
        o = acc / total[:, None]
        dst = OUT + n * so_n + w[:, None] * so_w + (h * G + g)[:, None] * so_h + d[None, :]
        tl.store(dst, o.to(OUT.dtype.element_ty), mask=live[:, None])
