"""What the `compile` path's first use costs in a new process, cold and with torch's on-disk compile caches warm.

`rsd_fast_path="compile"` is the fastest path measured, but compiling the one-token forwards of a 1.5B draft and a
7B target took 33 s and 55 s on an H200 at each batch size. torch keeps compiled code on disk (inductor's FX graph
and AOTAutograd caches, under `TORCHINDUCTOR_CACHE_DIR`; Triton's kernels, the fast path's own included, under
`TRITON_CACHE_DIR`), so a later process re-traces but need not re-compile.
This runs `benchmarks.speed` (component times only) in `--runs` fresh processes that share one cache folder (empty
at the start) and reports each process's first-use seconds (capture and compilation of the draft and the target),
its capture seconds per model, and the process's wall time.

    python -m rsd_generation.benchmarks.compile_cache [--batch-size 1] [--runs 2] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from .io import command_line, refuse_overwrite, write_json_atomic


def run_once(args, cache_dir: str, out: Path) -> dict:
    """One fresh process of `benchmarks.speed` (component times only) with `cache_dir` as the compile cache."""
    cmd = [sys.executable, "-m", "rsd_generation.benchmarks.speed", "--batch-sizes", str(args.batch_size),
           "--modes", args.mode, "--no-rsd", "--no-sd", "--no-generate", "--no-static", "--no-assisted",
           "--repeats", "1", "--baseline-repeats", "1", "--new-tokens", str(args.new_tokens),
           "--output", str(out), "--force", *(["--tiny"] if args.tiny else [])]  # fmt: skip
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "TRITON_CACHE_DIR": str(Path(cache_dir) / "triton")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    mode = json.loads(out.read_text())["rows"][0]["modes"][args.mode]
    return {
        "first_use_seconds": mode["first_use_seconds"],
        "capture_seconds": mode.get("capture_seconds"),
        "ms_per_forward": mode["ms_per_forward"],
        "process_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2, help="fresh processes sharing one compile cache (empty at first)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--mode", default="compile", help="the rsd_fast_path measured (graphs: the Triton kernels' first use)"
    )
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for checking the script itself on the CPU")
    ap.add_argument("--output", default="benchmarks/results/compile-cache.json")
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.batch_size < 1:
        ap.error(f"--runs and --batch-size must be >= 1, got {args.runs} and {args.batch_size}")
    refuse_overwrite(args.output, args.force)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result: dict = {
        "device": device,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "batch_size": args.batch_size,
        "mode": args.mode,
        "runs": [],
        "command": command_line("compile_cache", argv),
    }
    with tempfile.TemporaryDirectory(prefix="rsd-compile-cache-") as tmp:
        cache = str(Path(tmp) / "inductor")
        for k in range(args.runs):  # saved after each process: an interrupted run keeps what it measured
            result["runs"].append(run_once(args, cache, Path(tmp) / f"speed-{k}.json"))
            print(f"process {k + 1}: {result['runs'][-1]}", flush=True)
            write_json_atomic(args.output, result)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
