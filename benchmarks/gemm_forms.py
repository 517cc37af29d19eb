"""How fast cuBLAS runs the decode projections of Qwen2.5-Math-1.5B and 7B, in each way one could ask for them.

For M tokens (1, 4, 16) and each projection (qkv, o, gate/up, down, LM head), a CUDA graph runs it through 28
layer-like weight copies (4 for the head), so the weights come from memory and not from L2 and no launch gap is
timed; the best of three replays, in µs per layer, against the floor (the weight read at `--bandwidth`). Forms:
`F.linear(x, W)` (as the fast path does), the same with a strided `x` (every other element), `x @ Wt` with the
weight stored transposed (`[K, N]`), `W @ x.T`, and `torch.mv` at M = 1; each under cuBLASLt and cuBLAS
(`torch.backends.cuda.preferred_blas_library`).

    python -m rsd_generation.benchmarks.gemm_forms --output FILE
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import transformers

from rsd_generation import kernels

from .io import command_line, refuse_overwrite, write_json_atomic
from .speed import QWEN_1_5B, QWEN_7B


def projections(shapes: dict) -> dict[str, tuple[int, int]]:
    """A model's decode projections (`speed.QWEN_1_5B`-style shapes): name -> (in features K, out features N)."""
    H, inner, V = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    D = H // shapes["num_attention_heads"]
    qkv = H + 2 * shapes["num_key_value_heads"] * D
    return {"qkv": (H, qkv), "o": (H, H), "gate_up": (H, 2 * inner), "down": (inner, H), "head": (H, V)}


def decode_projections() -> Iterator[tuple[str, str, int, int]]:
    """`(model, projection, K, N)` for every decode projection of Qwen2.5-Math-1.5B and 7B (see `projections`)."""
    for model, shapes in {"1.5b": QWEN_1_5B, "7b": QWEN_7B}.items():
        for name, (K, N) in projections(shapes).items():
            yield model, name, K, N


def projection_row(model: str, name: str, tokens: int, K: int, N: int, bandwidth: float) -> dict:
    """A result row's header: the projection, its tokens and shape, and its floor (its bf16 weight read at
    `bandwidth` bytes/s, in µs)."""
    return {"model": model, "projection": name, "tokens": tokens, "in": K, "out": N,
            "floor_us": N * K * 2 / bandwidth * 1e6}  # fmt: skip


def keep_row(row: dict, result: dict, output: str) -> None:
    """Print `row`, add it to `result["rows"]` and write `result` to `output` (an interrupted run keeps what it
    measured)."""
    print(row, flush=True)
    result["rows"].append(row)
    write_json_atomic(output, result)


def graph_ms(fn, replays: int = 3) -> float:
    """The best of `replays` timed replays of a CUDA graph of `fn` (warmed up twice on the capture stream first), in
    ms: `kernels.graph_seconds`, the timer the fast path chooses its GEMV with."""
    return kernels.graph_seconds(fn, torch.cuda.current_device(), replays, warmups=2) * 1e3


def forms(x: torch.Tensor, weights: list[torch.Tensor], transposed: list[torch.Tensor]) -> dict:
    """Each way of computing `x W^T` over every weight `W` (`transposed`: each `W^T`, contiguous), as a callable
    returning the list of outputs (`W @ x.T` and `mv` give them transposed)."""
    strided = x.new_empty(x.shape[0], 2 * x.shape[1])[:, ::2].copy_(x)  # x's values, every other element
    out = {
        "linear": lambda: [F.linear(x, w) for w in weights],
        "linear_strided_x": lambda: [F.linear(strided, w) for w in weights],
        "x@Wt": lambda: [x @ w for w in transposed],
        "W@x.T": lambda: [w @ x.T for w in weights],
    }
    if x.shape[0] == 1:
        out["mv"] = lambda: [torch.mv(w, x[0]) for w in weights]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bandwidth", type=float, default=4.24e12, help="copy bandwidth for the floor (H200: 4.24e12)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    refuse_overwrite(args.output, args.force)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    torch.manual_seed(0)
    result = {
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "dtype": "bfloat16",
        "rows": [],  # written after each (`keep_row`), complete: false until the last
        "complete": False,
        "command": command_line("gemm_forms", argv),
    }
    for model, name, K, N in decode_projections():
        layers = 4 if name == "head" else 28
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        transposed = [w.t().contiguous() for w in weights]
        for M in (1, 4, 16):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = projection_row(model, name, M, K, N, args.bandwidth) | {"us_per_layer": {}}
            for form, fn in forms(x, weights, transposed).items():
                for library in ("cublaslt", "cublas"):
                    torch.backends.cuda.preferred_blas_library(library)
                    row["us_per_layer"][f"{form}|{library}"] = graph_ms(fn) * 1e3 / layers
            torch.backends.cuda.preferred_blas_library("cublaslt")
            keep_row(row, result, args.output)
        del weights, transposed
        torch.cuda.empty_cache()
    result["complete"] = True
    write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()
