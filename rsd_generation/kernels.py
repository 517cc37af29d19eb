"""Triton kernels for the elementwise work of a decode step: one kernel where eager PyTorch launches several.

At batch 1 a captured decode step of a 1.5B model is a chain of about 30 kernels per layer, most of them tiny
(the RMS norm alone is a cast, a square, a mean, an add, a reciprocal square root, two products and a cast back),
and on an H200 each costs a few microseconds however little it reads: the draft's step took 4.4x the time its
weights take to read. These kernels do per token, in one launch each, what those chains do:

- `add_rms_norm`: the residual add and the RMS norm after it (the sum is also returned, as the next residual);
- `rotary_`: the rotary embedding of the queries and keys, in place in the fused projection's output;
- `silu_mul`: `silu(gate) * up` from the fused gate/up projection's output.

Each rounds where the model's own modules round (to the model's dtype after every operation they run in it), so
the results equal the eager ones but for the order of the norm's sum. They run on CUDA tensors, and on CPU tensors
under Triton's interpreter (`TRITON_INTERPRET=1`, how the tests check them); `usable(x)` says whether they can run
on `x`. Without Triton the caller keeps the eager operations.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the eager operations serve instead
    triton = None

AVAILABLE = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on CPU tensors (tests)
ENABLED = True  # set False to keep the eager operations (benchmarks compare both)


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x` (Triton installed and enabled; a CUDA tensor, or the interpreter)."""
    if not AVAILABLE or not ENABLED or torch.compiler.is_compiling():  # a compiled forward fuses on its own
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`(weight * rms_norm(s), s)` with `s = x + delta` (or `x`), as Llama/Qwen RMS norms compute it: the norm in
    float32, cast back to x's dtype, then scaled by `weight` (of x's dtype).

    Args:
        x, delta (`torch.Tensor` of shape `(..., H)`): the residual stream and what adds to it.
        weight (`torch.Tensor` of shape `(H,)`).
    """
    H = x.shape[-1]
    x2 = x.reshape(-1, H)  # x2: [T, H]
    d2 = x2 if delta is None else delta.reshape(-1, H)
    out = torch.empty_like(x2)
    s = x2 if delta is None else torch.empty_like(x2)
    if x2.shape[0]:
        block = triton.next_power_of_2(H)
        _add_rms_norm[(x2.shape[0],)](
            x2, d2, weight, out, s, H, x2.stride(0), d2.stride(0), float(eps),
            HAS_DELTA=delta is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    return out.view(x.shape), s.view(x.shape)


def rotary_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `qk` in place: `qk * cos + rotate_half(qk) * sin`, each product and the sum rounded to qk's dtype.

    Args:
        qk (`torch.Tensor` of shape `(N, W, Hqk, D)`): the query and key heads (last dimension contiguous; a view
            into the fused projection's output).
        cos, sin (`torch.Tensor` of shape `(N, W, D)`): the rotary embedding at each token's position.
    """
    N, W, Hqk, D = qk.shape
    rows = qk.view(N * W, Hqk, D)  # rows: [T, Hqk, D], a view (an error, not a silent copy, if it cannot be one)
    assert rows.stride(2) == 1, "the head dimension must be contiguous"
    cos, sin = cos.reshape(N * W, D).contiguous(), sin.reshape(N * W, D).contiguous()  # cos: [T, D]
    if N * W:
        _rotary[(N * W, Hqk)](
            rows, cos, sin, rows.stride(0), rows.stride(1), D, HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2)
        )
    return qk


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up = cat(gate, up)` `(..., 2 I)`: `(..., I)`, each operation rounded to its dtype."""
    I2 = gate_up.shape[-1]
    g2 = gate_up.reshape(-1, I2)  # g2: [T, 2 I]
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
    def _rotary(QK, COS, SIN, stride_tok, stride_head, stride_cos, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """One (token, head) per program: [x1, x2] -> [x1 cos1 - x2 sin1, x2 cos2 + x1 sin2], rounded as eager."""
        tok, head = tl.program_id(0), tl.program_id(1)
        i = tl.arange(0, BLOCK)
        m = i < HALF
        base = QK + tok * stride_tok + head * stride_head
        dt = QK.dtype.element_ty
        x1 = tl.load(base + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + i, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(COS + tok * stride_cos + i, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(COS + tok * stride_cos + HALF + i, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + tok * stride_cos + i, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + tok * stride_cos + HALF + i, mask=m, other=0.0).to(tl.float32)
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(base + i, o1.to(dt), mask=m)
        tl.store(base + HALF + i, o2.to(dt), mask=m)

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
