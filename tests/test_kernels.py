"""The Triton kernels of the fast path (`rsd_generation.kernels`) against the eager operations they replace: the
same values (the RMS norm's sum aside, bit for bit), and a fused forward through them gives the eager one's outputs.

On CPU the kernels run under Triton's interpreter, which is chosen when the kernels are defined, so each check runs
in a child process started with `TRITON_INTERPRET=1` (this file is its script). On a GPU they run natively."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the kernels need Triton (installed with CUDA builds of torch, and by [dev])")

CHECKS = ("norm", "rotary", "silu", "gemv", "attention", "forward", "generate")
DTYPES = (torch.float32, torch.bfloat16)


def _assert_ulps(got: torch.Tensor, want: torch.Tensor, ulps: int, what, loose: bool = False) -> None:
    """`got` within `ulps` units of rounding (at `want`'s magnitude) of `want`.

    Two cases are measured in units at the largest value instead, with three more: bfloat16 under the interpreter,
    which rounds float32 to bfloat16 toward zero at each cast where GPUs (and torch) round to nearest; and float32
    on a GPU, whose compiler contracts a product and a sum into one rounding and takes a fast exponential. A sum
    that cancels keeps its terms' rounding there. `loose` asks for that measure in every case. A wrong kernel is
    off by the values' own scale."""
    loose = loose or (got.device.type == "cpu") == (got.dtype == torch.bfloat16)
    info = torch.finfo(want.dtype)
    got, w = got.detach(), want.detach().double()
    least = float(w.abs().max()) if loose else info.tiny
    unit = info.eps * torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(least))))  # unit: spacing at |want|
    apart = float(((got.double() - w).abs() / unit).max())
    assert apart <= ulps + 3 * loose, (what, got.dtype, apart)


def check_norm(device: str) -> None:
    """`add_rms_norm` gives the residual sum exactly and the model's RMS norm of it within one unit of rounding
    (the sum of squares runs in another order), with and without a delta, rows of several widths, strided inputs."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from rsd_generation import kernels

    for dtype in DTYPES:
        for H in (32, 96, 1536):
            torch.manual_seed(H)
            norm = Qwen2RMSNorm(H, eps=1e-6).to(device, dtype)
            norm.weight.data.normal_(1, 0.3)
            x = torch.randn(3, 5, H, device=device).to(dtype)
            delta = torch.randn(3, 5, H, device=device).to(dtype)
            strided = torch.randn(3, 5, H, 2, device=device).to(dtype)[..., 0]  # elements two apart
            for a, d in ((x, None), (x, delta), (strided, delta), (x, strided)):
                s = a if d is None else a + d
                out, got_s = kernels.add_rms_norm(a, norm.weight, norm.variance_epsilon, d)
                _assert_ulps(got_s, s, 0, H)
                _assert_ulps(out, norm(s), 1 if dtype == torch.bfloat16 else 8, H)  # float32: sum order, rsqrt


def check_rotary(device: str) -> None:
    """`rotary_into_cache_` rotates the query heads in place as `q * cos + rotate_half(q) * sin` does, and writes
    the rotated keys and the values to their cache rows and columns, leaving every other entry alone."""
    from transformers.models.llama.modeling_llama import rotate_half

    from rsd_generation import kernels

    for dtype in DTYPES:
        torch.manual_seed(0)
        N, W, Hq, Hkv, D, B, C = 2, 3, 4, 2, 16, 4, 8
        qkv = torch.randn(N, W, Hq + 2 * Hkv, D, device=device).to(dtype)  # q, k, v heads side by side
        angle = torch.randn(N, W, D // 2, device=device) * 3
        cos, sin = torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([angle.sin()] * 2, -1).to(dtype)
        rotated = qkv * cos[:, :, None] + rotate_half(qkv) * sin[:, :, None]  # rotated: [N, W, H, D]
        keys = torch.randn(B, Hkv, C, D, device=device).to(dtype)
        values = torch.randn(B, Hkv, C, D, device=device).to(dtype)
        rows, cols = torch.tensor([3, 0], device=device), torch.tensor([5, 6, 7], device=device)
        want_k, want_v = keys.clone(), values.clone()
        want_k[rows[:, None], :, cols[None, :]] = rotated[:, :, Hq : Hq + Hkv]  # indexed: [N, W, Hkv, D]
        want_v[rows[:, None], :, cols[None, :]] = qkv[:, :, Hq + Hkv :]
        q = kernels.rotary_into_cache_(qkv, cos, sin, Hq, keys, values, rows, cols)
        assert q.data_ptr() == qkv.data_ptr() and q.shape == (N, W, Hq, D)  # in place
        # bit for bit under the interpreter (float32); on the GPU the compiled kernel drops a rounding the eager
        # operations make (6 units apart in a cancelling bfloat16 sum, measured on an H200), so at the scale there
        _assert_ulps(q, rotated[:, :, :Hq], 0, "queries", loose=device != "cpu")
        _assert_ulps(keys, want_k, 0, "keys", loose=device != "cpu")
        assert torch.equal(values, want_v), dtype


def check_silu(device: str) -> None:
    """`silu_mul` gives `silu(gate) * up` within one unit of rounding (the exponential's own)."""
    from rsd_generation import kernels

    for dtype in DTYPES:
        torch.manual_seed(1)
        for width in (64, 1500, 2048):
            gate_up = (torch.randn(2, 3, 2 * width, device=device) * 4).to(dtype)
            gate, up = gate_up.chunk(2, -1)
            _assert_ulps(kernels.silu_mul(gate_up), F.silu(gate) * up, 1 if dtype == torch.bfloat16 else 4, width)


def check_gemv(device: str) -> None:
    """`gemv` gives `F.linear`'s product within a unit or two of rounding (float32 sums in another order) in every
    configuration tried, for one token and for 2 to 40 (the tensor-core form), with and without a bias, for shapes
    that leave partial blocks of rows and columns; `linear` takes it for one token (more with `SKINNY`) where
    `gemv_choice` chose it, cuBLAS otherwise; on a GPU the choice is measured once per shape and is one of the
    configurations or cuBLAS."""
    from rsd_generation import kernels

    calls = []
    real = kernels.gemv
    kernels.gemv = lambda *a, **k: calls.append(a[3]) or real(*a, **k)
    for dtype in DTYPES:
        for N, K in ((40, 300), (64, 1024), (7, 520)):
            torch.manual_seed(N * K)
            weight = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
            bias = torch.randn(N, device=device).to(dtype)
            x = torch.randn(1, 1, K, device=device).to(dtype)
            for b in (None, bias):
                want = F.linear(x.double(), weight.double(), None if b is None else b.double()).to(dtype)
                for config in kernels.GEMV_CONFIGS:
                    _assert_ulps(real(x, weight, b, config), want, 1 if dtype == torch.bfloat16 else 16, (N, K), True)
                chosen = kernels.GEMV_CONFIGS[1]
                kernels._GEMV_CHOICE[(str(x.device), dtype, N, K, b is not None, 1)] = chosen
                calls.clear()
                _assert_ulps(kernels.linear(x, weight, b), want, 1 if dtype == torch.bfloat16 else 16, N, True)
                assert calls == [chosen]
                two = torch.randn(2, K, device=device).to(dtype)  # two tokens, SKINNY off: cuBLAS's product
                torch.testing.assert_close(kernels.linear(two, weight, b), F.linear(two, weight, b))
                assert calls == [chosen]
                for M in (2, 5, 16, 40) if dtype == torch.float32 or device == "cuda" else (5,):  # interpreter: slow
                    xs = torch.randn(M, K, device=device).to(dtype)
                    want = F.linear(xs.double(), weight.double(), None if b is None else b.double()).to(dtype)
                    for config in kernels.SKINNY_CONFIGS:  # tensor-core products sum in their own order: 2 units
                        _assert_ulps(real(xs, weight, b, config), want, 2 if dtype == torch.bfloat16 else 16, M, True)
                    kernels.SKINNY = True
                    kernels._GEMV_CHOICE[(str(x.device), dtype, N, K, b is not None, kernels.rows_bucket(M))] = chosen
                    calls.clear()
                    kernels.linear(xs, weight, b)
                    assert calls == [chosen]
                    kernels.SKINNY = False
    for dtype in DTYPES:  # with the elementwise work around a decoder's products inside
        for (N, K), M in itertools.product(((40, 300), (7, 520)), (1, 5)):  # one token, and the tensor-core form
            torch.manual_seed(N + K + M)
            weight = (torch.randn(2 * N, K, device=device) * K**-0.5).to(dtype)  # a fused gate/up, or two products
            bias, residual = torch.randn(2 * N, device=device).to(dtype), torch.randn(M, 1, 2 * N, device=device)
            x, residual = torch.randn(M, 1, K, device=device).to(dtype), residual.to(dtype)
            g, eps = torch.randn(K, device=device).to(dtype), 1e-6
            normed = (g.double() * F.rms_norm(x.double(), (K,), eps=eps)).to(dtype)  # unrounded inside: a unit
            for config in (kernels.GEMV_CONFIGS if M == 1 else kernels.SKINNY_CONFIGS)[:3]:
                for b in (None, bias):
                    b64 = None if b is None else b.double()
                    want = F.linear(normed.double(), weight.double(), b64).to(dtype)
                    got = real(x, weight, b, config, norm=(g, eps))
                    _assert_ulps(got, want, 2 if dtype == torch.bfloat16 else 16, ("norm", N, K, M), True)
                    gate_up = F.linear(x.double(), weight.double(), b64).to(dtype)  # the eager rounding after
                    want = kernels.silu_mul(gate_up)  # `check_silu`
                    got = real(x, weight, b, config, gated=True)
                    _assert_ulps(got, want, 1 + (M > 1), ("gated", N, K, M), True)
                    both = real(x, weight, b, config, norm=(g, eps), gated=True)
                    want = kernels.silu_mul(F.linear(normed.double(), weight.double(), b64).to(dtype))
                    _assert_ulps(both, want, 3 if dtype == torch.bfloat16 else 16, ("norm gated", N, K, M), True)
                    want = (residual.double() + F.linear(x.double(), weight.double(), b64).to(dtype)).to(dtype)
                    got = real(x, weight, b, config, residual=residual)  # the product rounded, then added
                    _assert_ulps(got, want, 1 + (M > 1), ("residual", N, K, M), True)
    for dtype in DTYPES:  # the rotary embedding and the cache writes after a qkv: what the two kernels give
        # one token (the GEMV); 3 rows of 2 and 2 of 3 tokens (the tensor-core form), partial blocks of columns
        for (hq, hkv, D), K, (R, W) in (((4, 2, 16), 40, (1, 1)), ((6, 2, 8), 300, (1, 1)),
                                        ((4, 2, 16), 40, (3, 2)), ((6, 2, 8), 300, (2, 3))):  # fmt: skip
            torch.manual_seed(hq + D + K + R)
            N = (hq + 2 * hkv) * D
            weight = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
            bias = torch.randn(N, device=device).to(dtype)
            x, g = torch.randn(R, W, K, device=device).to(dtype), torch.randn(K, device=device).to(dtype)
            cos, sin = (torch.randn(R, W, D, device=device).to(dtype) for _ in range(2))
            at = (torch.tensor([4, 1, 2][:R], device=device), torch.tensor([5, 6, 3][:W], device=device))  # rows, cols
            # 2 and 4 pairs of rows per program (one token); 16 and 32 (the tensor-core form)
            configs = kernels.GEMV_CONFIGS[0::3][:2] if R * W == 1 else kernels.SKINNY_CONFIGS[:2]
            for config, b, norm in itertools.product(configs, (None, bias), (None, (g, 1e-6))):
                caches = [[torch.zeros(5, hkv, 7, D, device=device, dtype=dtype) for _ in range(2)] for _ in range(2)]
                qkv = real(x, weight, b, config, norm=norm).unflatten(-1, (-1, D))
                want = kernels.rotary_into_cache_(qkv, cos, sin, hq, *caches[0], *at)
                got = real(x, weight, b, config, norm=norm, rotary=(cos, sin, hq, *caches[1], *at))
                what = ("rotary", dtype, hq, D, K, R, W, config)
                if R * W == 1 or device == "cpu":  # the same sums, rounded the same: equal
                    assert torch.equal(got.unflatten(-1, (-1, D)), want), what
                    assert all(torch.equal(a, c) for a, c in zip(*caches, strict=True)), what
                else:  # a tensor-core tile of other columns may sum in another order: a unit
                    _assert_ulps(got.unflatten(-1, (-1, D)), want, 1, what, True)
                    for a, c in zip(*caches, strict=True):
                        _assert_ulps(c, a, 1, what, True)
                assert caches[1][0][at[0][0], :, at[1][0]].abs().sum() > 0 and caches[1][0][0].abs().sum() == 0
    assert [kernels.rows_bucket(M) for M in (1, 2, 16, 17, 64)] == [1, 16, 16, 32, 64]
    kernels._GEMV_CHOICE.clear()
    if device == "cuda":
        weight = torch.randn(1536, 1536, device=device, dtype=torch.bfloat16)
        x = torch.randn(1, 1536, device=device, dtype=torch.bfloat16)
        choice = kernels.gemv_choice(x, weight, None)
        assert choice is None or choice in kernels.GEMV_CONFIGS
        assert kernels.gemv_choices() == {(str(x.device), torch.bfloat16, 1536, 1536, False, 1): choice}
        kernels._GEMV_CHOICE.clear()
        # the timer compares in rounds: twice the products take longer than once, each timed apart
        once, twice = (lambda: F.linear(x, weight)), (lambda: [F.linear(x, weight), F.linear(x.flip(0), weight)])
        times = kernels.graph_timings({"once": once, "twice": twice}, x.device)
        assert set(times) == {"once", "twice"} and 0 < times["once"] < times["twice"] < 1e-3, times
    kernels.gemv = real


def check_attention(device: str) -> None:
    """`decode_attention` gives what SDPA over the gathered cache rows gives with the additive mask the fast path
    builds (grouped heads, one-token and wider chunks, a column mask with holes and whole blocks a row's queries do
    not see, causal within the chunk), and never reads a column after the chunk's last: those are NaN here."""
    from rsd_generation import kernels
    from rsd_generation.fused import grouped_attention

    kernels.ATTENTION = True
    for dtype in DTYPES:
        for W, Hq, Hkv, D in ((1, 12, 2, 16), (4, 4, 2, 64), (1, 8, 8, 32)):
            torch.manual_seed(W * D)
            B, C, start, N = 5, 150, 130, 2  # chunk columns [start, start + W): past one 64-column block
            qkv = torch.randn(N, W, (Hq + 2 * Hkv) * D, device=device).to(dtype)
            q = qkv[..., : Hq * D].unflatten(-1, (-1, D))  # q: [N, W, Hq, D], a strided view
            keys = torch.randn(B, Hkv, C, D, device=device).to(dtype)
            values = torch.randn(B, Hkv, C, D, device=device).to(dtype)
            rows = torch.tensor([3, 0], device=device)
            cols = torch.arange(start, start + W, device=device)
            colmask = torch.rand(B, C, device=device) < 0.7  # colmask: [B, C], each cache row's valid columns
            colmask[3, :128] = False  # the first two 64-column blocks hold nothing row 3's queries see
            c = torch.arange(C, device=device)
            allowed = (colmask[rows, None, :] & (c <= cols[:, None])) | (c == cols[:, None])  # allowed: [N, W, C]
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # mask: [N, 1, W, C]
            want = grouped_attention(q.transpose(1, 2), keys[rows], values[rows], mask, D**-0.5)
            want = want.transpose(1, 2).reshape(N, W, Hq * D)
            assert kernels.attention_fits(q, keys) == (device == "cpu" or q.is_cuda)
            keys[:, :, start + W :], values[:, :, start + W :] = float("nan"), float("nan")  # never to be read
            tol = 2e-5 if dtype == torch.float32 else 2e-2
            # whole, and split into 2 and 4 runs of columns combined by a second kernel (3 blocks of columns: the
            # last of 4 runs has none)
            for least, runs in ((512, 1), (64, 2), (32, 4)):
                kernels.MIN_SPLIT_COLUMNS = least
                assert kernels.attention_splits(N, Hkv, C) == runs
                got = kernels.decode_attention(q, keys, values, rows, colmask, cols, D**-0.5)
                what = f"{dtype} W={W} Hq={Hq} Hkv={Hkv} D={D} runs={runs}"
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=what)
            kernels.MIN_SPLIT_COLUMNS = 512
    assert kernels.attention_splits(1, 2, 4096) == 8 and kernels.attention_splits(64, 2, 4096) == 1


def check_forward(device: str) -> None:
    """A fused static-cache forward with the kernels gives the eager one's outputs (prompts of several lengths, a
    dropped step, a gathered row, one-token steps; with and without the one-token GEMV), for Qwen2 (q/k/v biases,
    16-wide heads: the attention kernel runs), Llama (gate/up biases) and Qwen3 (q/k norms)."""
    from rsd_generation import fast, kernels
    from rsd_generation.kv import pad_right
    from rsd_generation.testing import make_lm, make_qwen3

    choose, real, pays = kernels.gemv_choice, kernels.gemv, kernels.fusion_pays
    fusions = set()  # the elementwise work the GEMV took in (one-token forwards)

    def recorded(*args, **fused):
        fusions.update(name for name, value in fused.items() if value is not None and value is not False)
        return real(*args, **fused)

    kernels.gemv = recorded

    def forced(x, weight, bias):  # the GEMV for every projection it takes (a GPU's measured choice may keep cuBLAS)
        return kernels.GEMV_CONFIGS[0] if x.numel() == x.shape[-1] else kernels.SKINNY_CONFIGS[0]

    models = {"llama": lambda: make_lm("llama", 96, seed=2, mlp_bias=True), "qwen3": lambda: make_qwen3(96),
              "qwen2": lambda: make_lm("qwen2", 96, seed=3, hidden_size=64, intermediate_size=128)}  # fmt: skip
    for name, build in models.items():
        # Llama's 8-wide heads and Qwen3's q/k norms keep the attention kernel out: eager, or every other kernel
        # (in float32 only under the interpreter, which is slow). Qwen2: with and without the attention kernel
        variants = [(False, False, False), (True, True, False), (True, True, True)]  # (kernels, attention, gemv)
        if name == "qwen2":
            # and every projection of up to 64 tokens by the GEMV's tensor-core form ("skinny")
            variants = [(False, False, False), (True, False, False), (True, True, False), (True, True, True),
                        (True, True, "skinny")]  # fmt: skip
        for dtype in DTYPES if name == "qwen2" or device == "cuda" else DTYPES[:1]:
            model = build().to(device, dtype)
            outs = []
            for enabled, attention, gemv in variants:
                kernels.ENABLED, kernels.ATTENTION = enabled, attention
                # gemv: every one-token projection by the GEMV (on a GPU the measured choice may keep cuBLAS)
                kernels.gemv_choice = forced if gemv else choose
                kernels.fusion_pays = (lambda *args: True) if gemv else pays  # forced too (a GPU measures them)
                kernels.SKINNY = gemv == "skinny"
                cache = fast.row_cache(model, f"kernels-{enabled}-{attention}-{gemv}", 3, 0, "static", 64)
                cache.feed(*pad_right([[5, 6, 7, 8], [9, 10], [11, 12, 13]], 0))
                cache.feed(torch.tensor([[20, 21], [22, 23], [24, 25]]), torch.ones(3, 2, dtype=torch.bool))
                cache.drop_from(torch.tensor([True, False, True]), torch.full((3,), cache.length - 2))
                one = torch.tensor([[False], [True], [False]])  # one row of three: a gathered forward
                cache.feed(torch.tensor([[60], [61], [62]]), one, rows=torch.tensor([1]))
                assert any(shape[0] == 1 for shape in cache.shapes)  # it ran over the gathered row alone
                steps = [cache.feed(torch.tensor([[30 + t], [40 + t], [50 + t]]), torch.ones(3, 1, dtype=torch.bool))
                         for t in range(3)]  # fmt: skip
                outs.append(torch.stack(steps))
                # the gathered row's one-token forward ran its norms, SiLU product, residual adds and (but for
                # Qwen3's q/k norms) rotary embedding in the GEMV
                if gemv and enabled:  # all (forced as the GEMV is)
                    want = {"norm", "gated", "residual"} | ({"rotary"} if name != "qwen3" else set())
                    assert fusions == want, (name, fusions)
                elif not enabled or device == "cpu":  # on a GPU the GEMV may have been chosen for some products
                    assert fusions == set(), (name, fusions)
                fusions.clear()
            kernels.ENABLED, kernels.ATTENTION, kernels.gemv_choice, kernels.SKINNY = True, False, choose, False
            kernels.fusion_pays = pays
            for out, what in zip(outs[1:], variants[1:], strict=True):  # what: (kernels, attention, gemv)
                # bfloat16: a unit of rounding at the logits' scale (4.5: 0.03); the tensor-core form sums a few
                # tokens' products in its own order, and the interpreter rounds its casts toward zero: 1.5 units
                tol = 1e-4 if dtype == torch.float32 else 5e-2 if what[2] == "skinny" else 3e-2
                torch.testing.assert_close(out, outs[0], rtol=tol, atol=tol, msg=f"{name} {dtype} {what}")
            assert kernels.usable(outs[0]) or device == "cpu"
    kernels.gemv = real


def check_generate(device: str) -> None:
    """RSD through `generate` on the static path with every kernel on (decode attention included) gives the plain
    path's tokens and decisions, for a Qwen2 pair with 16-wide heads, at a δ that splits the rewards (both
    policies write steps) and, on a GPU, above every reward (the target's own greedy output). δ = 0, the draft's
    alone, adds no path through the kernels and the interpreter is slow."""
    import tempfile
    from collections import Counter

    from conftest import PROMPTS, encode, median_reward, rsd_generate

    import rsd_generation as rsd
    from rsd_generation import kernels
    from rsd_generation.testing import build_tokenizer, make_lm, save_value_head_prm

    calls: Counter = Counter()
    attend = kernels.decode_attention

    def counted(*args, **kwargs):
        calls["attention"] += 1
        return attend(*args, **kwargs)

    kernels.decode_attention, kernels.ATTENTION = counted, True
    tok = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        prm = rsd.load_reward_model(save_value_head_prm(tmp, tok), tokenizer=tok, device_map=device)
    for kind in ("qwen2",):  # Llama's layers are the same to the kernels (check_forward runs both); the
        wide = {"hidden_size": 64, "intermediate_size": 96}  # interpreter is slow. 4 heads of 16
        target = make_lm(kind, len(tok), seed=1, **wide).to(device)
        draft = make_lm(kind, len(tok), seed=2, **wide).to(device)
        enc = encode(tok, PROMPTS).to(device)
        delta = median_reward(target, draft, prm, tok, PROMPTS)
        for d in (delta, 1.5) if device == "cuda" else (delta,):  # 16 new tokens in steps of 4: the interpreter
            # is slow (above every reward, the target's own output, is checked on the GPU only)
            plain = rsd_generate(
                target, draft, prm, tok, PROMPTS, rsd_threshold=d, rsd_fast_path="off", max_new_tokens=16
            )
            before = calls["attention"]
            fast = rsd_generate(target, draft, prm, tok, PROMPTS, rsd_threshold=d, rsd_fast_path="static",
                                max_new_tokens=16)  # fmt: skip
            assert calls["attention"] > before, "the attention kernel did not run"
            assert torch.equal(fast.sequences, plain.sequences), (kind, d)
            decisions = [[(s["source"], s["accepted"]) for s in row] for row in fast.rsd_stats["steps"]]
            assert decisions == [[(s["source"], s["accepted"]) for s in row] for row in plain.rsd_stats["steps"]]
            if d == delta:  # both branches ran
                assert {s["source"] for row in plain.rsd_stats["steps"] for s in row} == {"draft", "target"}
            else:
                policy = draft if d == 0.0 else target
                assert torch.equal(fast.sequences, policy.generate(**enc, max_new_tokens=16, do_sample=False))


def _signatures(dtype: str) -> dict[str, list[tuple[dict, dict]]]:
    """Each kernel's argument types and constexpr values as the fast path launches it, for tensors of `dtype`."""
    from rsd_generation import kernels

    p = f"*{dtype}"
    norm = {"X": p, "D": p, "Wt": p, "OUT": p, "S": p, "H": "i32", "stride_x": "i32", "stride_d": "i32", "eps": "fp32"}
    rotary = {"QKV": p, "COS": p, "SIN": p, "K": p, "V": p, "ROWS": "*i64", "COLS": "*i64"}
    rotary |= {n: "i32" for n in ("stride_tok", "stride_head", "stride_cos", "W", "HQ", "HKV", "stride_row",
                                  "stride_kvhead", "stride_col")}  # fmt: skip
    silu = {"GU": p, "OUT": p, "width": "i32", "stride_gu": "i32"}
    attention = {"Q": p, "K": p, "V": p, "ROWS": "*i64", "CM": "*u8", "COLS": "*i64", "OUT": p, "PART": p, "STAT": p}
    attention |= {n: "i32" for n in ("sq_n", "sq_w", "sq_h", "sk_row", "sk_head", "sk_col", "s_cm", "so_n", "so_w",
                                     "so_h", "W", "G")} | {"scale": "fp32", "hide": "fp32"}  # fmt: skip
    split = attention | {"PART": "*fp32", "STAT": "*fp32"}  # runs of columns, combined by `_attention_combine`
    combine = {"PART": "*fp32", "STAT": "*fp32", "OUT": p} | {n: "i32" for n in ("so_n", "so_w", "so_h", "W", "G", "S")}
    gemv = {"X": p, "Wt": p, "B": p, "G": p, "R": p, "OUT": p, "N": "i32", "K": "i32", "stride_w": "i32",
            "eps": "fp32", "second": "i32", "C": p, "S": p, "KC": p, "VC": p, "KROWS": p, "KCOLS": p}  # fmt: skip
    gemv |= {n: "i32" for n in ("W", "HQ", "HKV", "stride_krow", "stride_khead", "stride_kcol")}
    gemv_rotary = gemv | {"KROWS": "*i64", "KCOLS": "*i64"}  # the cache row and column of the token
    skinny = {"X": p, "Wt": p, "B": p, "G": p, "R": p, "OUT": p, "M": "i32", "N": "i32", "K": "i32",
              "stride_x": "i32", "stride_w": "i32", "eps": "fp32", "second": "i32", "C": p, "S": p, "KC": p,
              "VC": p, "KROWS": p, "KCOLS": p}  # fmt: skip
    skinny |= {n: "i32" for n in ("W", "HQ", "HKV", "stride_krow", "stride_khead", "stride_kcol")}
    skinny_rotary = skinny | {"KROWS": "*i64", "KCOLS": "*i64"}
    # as the fused forward launches them: plain in every configuration, and (in the first, as the constexprs that
    # differ are the same) with the norm before (qkv), with it and the SiLU product after (gate/up), the sum after
    plain = {"NORM": False, "GATED": False, "RESIDUAL": False}
    fusions = [plain | {"NORM": True}, plain | {"NORM": True, "GATED": True}, plain | {"RESIDUAL": True}]
    no_rope = {"ROTARY": False, "HALF": 1}
    precision = "ieee" if dtype == "fp32" else "tf32"
    gemv_blocks = [{"BLOCK_N": n, "BLOCK_K": k} for n, k, _, _ in kernels.GEMV_CONFIGS]
    skinny_blocks = [{"BLOCK_N": n, "BLOCK_K": k} for n, k, _, _ in kernels.SKINNY_CONFIGS]
    skinny_rest = {"HAS_BIAS": True, "UPCAST": False, "PRECISION": precision}
    return {
        "_add_rms_norm": [(norm, {"HAS_DELTA": d, "BLOCK": 2048}) for d in (False, True)],
        "_rotary_into_cache": [(rotary, {"HALF": 64, "BLOCK": 64})],
        "_silu_mul": [(silu, {"BLOCK": 1024})],
        "_gemv": [(gemv, {"HAS_BIAS": b} | plain | no_rope | blocks) for b in (False, True) for blocks in gemv_blocks]
        + [(gemv, {"HAS_BIAS": True} | fusion | no_rope | gemv_blocks[0]) for fusion in fusions]
        + [(gemv_rotary, {"HAS_BIAS": True} | fusions[0] | {"ROTARY": True, "HALF": 64} | gemv_blocks[0])],
        "_skinny": [
            (skinny, skinny_rest | {"ROWS": r} | plain | no_rope | blocks) for r in (16, 64) for blocks in skinny_blocks
        ]
        + [(skinny, skinny_rest | {"ROWS": 16} | fusion | no_rope | skinny_blocks[0]) for fusion in fusions]
        + [(skinny_rotary, skinny_rest | {"ROWS": 16} | fusions[0] | {"ROTARY": True, "HALF": 64} | skinny_blocks[0])],
        "_decode_attention": [
            (args, {"D": d, "M": m, "BLOCK_C": 64, "SPLIT": args is split, "PRECISION": precision, "UPCAST": False})
            for d, m in ((64, 16), (128, 64))
            for args in (attention, split)
        ],
        "_attention_combine": [(combine, {"D": d, "M": m}) for d, m in ((64, 16), (128, 64))],
    }


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp16"])
def test_kernels_compile_for_hopper(dtype):
    """Each kernel compiles to a Hopper (sm_90) binary with no GPU present: Triton's compiler checks what its
    interpreter does not (a variable a branch gives another type, say), so a kernel that would fail on the GPU
    fails here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from rsd_generation import kernels

    for name, launches in _signatures(dtype).items():
        for types, constexprs in launches:
            signature = types | dict.fromkeys(constexprs, "constexpr")
            source = ASTSource(fn=getattr(kernels, name), signature=signature, constexprs=constexprs)
            assert "cubin" in compile(source, target=GPUTarget("cuda", 90, 32)).asm, (name, constexprs)


def test_kernels_that_cannot_run_fall_back_with_a_warning(monkeypatch):
    """Where Triton cannot build or launch the kernels (here: compiled kernels handed CPU tensors, as if on a GPU it
    does not support), the first forward warns once, saying why, and the eager operations give the same outputs."""
    from rsd_generation import fast, kernels
    from rsd_generation.kv import pad_right
    from rsd_generation.testing import make_lm

    model = make_lm("qwen2", 96, seed=1)
    ids, valid = pad_right([[5, 6, 7], [8, 9]], 0)
    kernels.ENABLED = False
    want = fast.row_cache(model, "fallback-eager", 2, 0, "static", 64).feed(ids, valid)
    kernels.ENABLED = True
    monkeypatch.setattr(kernels, "INTERPRET", True)  # CPU tensors count as usable: the kernels are tried on them
    monkeypatch.setattr(kernels, "_WORKS", {})
    with pytest.warns(UserWarning, match="Triton kernels cannot run on cpu in torch.float32"):
        got = fast.row_cache(model, "fallback-kernels", 2, 0, "static", 64).feed(ids, valid)
    torch.testing.assert_close(got, want)
    assert list(kernels._WORKS.values()) == [False]  # tried once; later forwards do not try again


def test_timed_candidates_are_those_that_build():
    """The GEMV's and the fusions' timings take the candidates that run once without an error and leave out the
    others (Triton cannot build some tiles on some GPUs), in their order."""
    from rsd_generation import kernels

    ran = []
    ways = {None: lambda: ran.append("cublas"), (2, 64, 4, 1): lambda: 1 / 0, (4, 64, 4, 1): lambda: ran.append(4)}
    built = kernels._builds(ways)
    assert list(built) == [None, (4, 64, 4, 1)] and ran == ["cublas", 4]
    assert built[None] is ways[None]


def _interpreter_loops_to_a_loaded_bound() -> bool:
    """Whether the interpreter runs `for i in range(0, tl.load(p), 1)`, as the attention kernel does (Triton 3.6's
    interpreter calls int() on a one-element array there, which NumPy 2.4 refuses)."""
    import triton
    import triton.language as tl

    @triton.jit
    def count(P, OUT):
        total = 0
        for _ in range(0, tl.load(P), 1):
            total += 1
        tl.store(OUT, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](torch.tensor([3], dtype=torch.int32), out)
    except Exception as error:  # InterpreterError(TypeError(...))
        if "0-dimensional" not in str(error):
            raise
        return False
    return int(out) == 3


@pytest.mark.parametrize("check", CHECKS)
def test_kernels_in_the_interpreter(check):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, __file__, check, "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    if last.startswith(f"{check} skipped: "):
        pytest.skip(last)
    assert run.stdout.strip().endswith(f"{check} ok")  # the check ran to its end, with the interpreter on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("check", CHECKS)
def test_kernels_on_the_gpu(check):
    from rsd_generation import kernels

    saved = {name: getattr(kernels, name) for name in ("ENABLED", "ATTENTION", "decode_attention", "gemv",
                                                       "gemv_choice", "fusion_pays", "SKINNY",
                                                       "MIN_SPLIT_COLUMNS")}  # fmt: skip
    try:
        globals()[f"check_{check}"]("cuda")
    finally:  # the checks switch kernels on and off, and count calls: later tests get the module as it was
        for name, value in saved.items():
            setattr(kernels, name, value)


if __name__ == "__main__":  # a child process of test_kernels_in_the_interpreter
    from rsd_generation import kernels

    if not _interpreter_loops_to_a_loaded_bound():  # the attention kernel cannot run here: the others can
        if sys.argv[1] in ("attention", "forward", "generate"):
            print(
                f"{sys.argv[1]} skipped: this Triton's interpreter cannot run the attention kernel's loop up to a "
                "loaded bound under this NumPy (int() of a one-element array; newer Tritons squeeze it)"
            )
            sys.exit(0)
        kernels.ATTENTION = False
    assert kernels.INTERPRET and kernels.usable(torch.zeros(1)), "started without TRITON_INTERPRET=1"
    globals()[f"check_{sys.argv[1]}"](sys.argv[2])
    print(sys.argv[1], "ok")
