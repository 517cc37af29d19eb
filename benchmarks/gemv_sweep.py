"""Which block shape the one-token Triton GEMV (`rsd_generation.kernels.gemv`) wants for each decode projection of
Qwen2.5-Math-1.5B and 7B, against cuBLAS (`F.linear`), on this GPU.

For each projection (qkv with its bias, o, gate/up, down) a CUDA graph runs it through 28 layer-like weight copies
(as `gemm_forms`), so the weights come from memory, not from L2; µs per layer, best of three replays. Every
configuration (BLOCK_N weight rows per program, BLOCK_K columns per load, warps, pipeline stages) of the grid is
timed; the five fastest are kept with their largest difference from `F.linear`. `kernels.GEMV_CONFIGS` holds the
winners, among which the fast path measures again per shape at first use (`kernels.gemv_choice`). `--tokens 16 64`
sweeps the tensor-core form for batched decode (`kernels.SKINNY_CONFIGS`, behind `kernels.SKINNY`).

    python -m rsd_generation.benchmarks.gemv_sweep --output FILE
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from rsd_generation import kernels

from .gemm_forms import decode_projections, graph_ms, keep_row, projection_row
from .io import command_line, refuse_overwrite, write_json_atomic

GRID = {"block_n": (2, 4, 8, 16), "block_k": (256, 512, 1024), "warps": (4, 8), "stages": (1, 3, 4)}
# more tokens: the tensor-core form, whose tiles take at least 16 weight rows
SKINNY_GRID = {"block_n": (16, 32, 64), "block_k": (128, 256, 512, 1024), "warps": (4, 8), "stages": (2, 3, 4)}


def sweep(K: int, N: int, bias: bool, tokens: int = 1, layers: int = 28, keep: int = 5) -> dict:
    """cuBLAS's µs per layer and the `keep` fastest GEMV configurations `[µs, BLOCK_N, BLOCK_K, warps, stages,
    largest difference from F.linear]` for `tokens` tokens times an `(N, K)` bf16 weight (`GRID` for one token,
    `SKINNY_GRID` for more); `failed`: those that would not build here `[BLOCK_N, BLOCK_K, warps, stages, error]`."""
    weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
    x = torch.randn(tokens, K, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty(tokens, N, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    want = F.linear(x, weights[0], b).float()
    cublas = graph_ms(lambda: [F.linear(x, w, b) for w in weights]) * 1e3 / layers
    timed, failed = [], []
    for config in itertools.product(*(GRID if tokens == 1 else SKINNY_GRID).values()):
        if config[1] > K:
            continue
        try:
            err = float((kernels.gemv(x, weights[0], b, config, outs[0]).float() - want).abs().max())
        except Exception as e:  # tiles whose pipeline needs more shared memory than the GPU has
            failed.append([*config, type(e).__name__])
            continue
        us = graph_ms(lambda c=config: [kernels.gemv(x, w, b, c, o) for w, o in zip(weights, outs, strict=True)])
        timed.append([us * 1e3 / layers, *config, err])
    timed.sort()
    return {"cublas_us": cublas, "best": timed[:keep], "failed": failed}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bandwidth", type=float, default=4.24e12, help="copy bandwidth for the floor (H200: 4.24e12)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1], help="tokens per projection (e.g. 1 16 64)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    refuse_overwrite(args.output, args.force)
    if not torch.cuda.is_available() or not kernels.AVAILABLE:
        ap.error("needs a CUDA GPU and Triton")
    torch.manual_seed(0)
    result = {
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": kernels.triton.__version__},
        "grid": GRID,
        "skinny_grid": SKINNY_GRID,
        "rows": [],  # written after each (`keep_row`), complete: false until the last
        "complete": False,
        "command": command_line("gemv_sweep", argv),
    }
    for model, name, K, N in decode_projections():
        if name == "head":
            continue
        for M in args.tokens:
            row = projection_row(model, name, M, K, N, args.bandwidth) | sweep(K, N, bias=name == "qkv", tokens=M)
            keep_row(row, result, args.output)
            torch.cuda.empty_cache()
    result["complete"] = True
    write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()
