"""Memory benchmark of `rsd-merge`: two random Qwen2.5-Math-1.5B-shaped checkpoints (bf16), merged on CPU.

Reports the merge's wall time and peak resident memory (measured in a child process), against the size of one
checkpoint; the target is a peak below one checkpoint plus 1 GiB (mergekit reads shard by shard).

    python -m rsd_generation.benchmarks.merge_memory [--workdir DIR] [--output FILE] [--force]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from .io import command_line, refuse_overwrite, write_json_atomic
from .speed import QWEN_1_5B

SHAPES = {**QWEN_1_5B, "max_position_embeddings": 4096}  # Qwen2.5-Math-1.5B's shapes (tied embeddings)


def write_random_checkpoint(path: Path, seed: int, value_head: bool) -> int:
    """Write random bf16 weights of the 1.5B shapes (plus a v_head for the PRM); returns the file's size in bytes."""
    config = Qwen2Config(**SHAPES, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Qwen2ForCausalLM(config).state_dict().items() if n != "lm_head.weight"}
    g = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    if value_head:
        tensors["v_head.summary.weight"] = torch.randn(1, SHAPES["hidden_size"], generator=g).to(torch.bfloat16)
        tensors["v_head.summary.bias"] = torch.zeros(1, dtype=torch.bfloat16)
    config.architectures = ["Qwen2ForPrmModel" if value_head else "Qwen2ForCausalLM"]
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(path)
    return (path / "model.safetensors").stat().st_size


def _status(pid: int) -> dict[str, int]:
    """RssAnon / RssFile of a process in bytes (0 once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in lines) if k in ("RssAnon", "RssFile")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/rsd-merge-bench", help="scratch space (about 10 GB)")
    ap.add_argument("--output", default="benchmarks/results/merge-memory-cpu.json")
    ap.add_argument("--force", action="store_true", help="overwrite an existing result file")
    args = ap.parse_args(argv)
    refuse_overwrite(args.output, args.force)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    size = write_random_checkpoint(work / "policy", seed=1, value_head=False)
    write_random_checkpoint(work / "prm", seed=2, value_head=True)
    print(f"checkpoints written: {size / 2**30:.2f} GiB each", flush=True)

    code = (
        "import sys, resource, time; from rsd_generation.merging import merge_prm_with_policy; "
        "t = time.perf_counter(); "
        "merge_prm_with_policy(sys.argv[1], sys.argv[2], sys.argv[3]); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    t = time.perf_counter()
    args_ = [sys.executable, "-c", code, str(work / "policy"), str(work / "prm"), str(work / "merged")]
    proc = subprocess.Popen(args_, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = peak_file = 0
    while proc.poll() is None:  # sample the child's memory split: anonymous vs file-backed (mmapped inputs)
        mem = _status(proc.pid)
        peak_anon, peak_file = max(peak_anon, mem.get("RssAnon", 0)), max(peak_file, mem.get("RssFile", 0))
        time.sleep(0.05)
    wall = time.perf_counter() - t
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"error: the merge failed:\n{stderr}")
    merge_s, peak_kib = stdout.split()[-2:]
    peak = int(peak_kib) * 1024  # ru_maxrss is in KiB on Linux
    result = {
        "what": "rsd-merge of two random Qwen2.5-Math-1.5B-shaped bf16 checkpoints on CPU",
        "checkpoint_bytes": size,
        "merge_seconds": float(merge_s),
        "process_seconds": wall,
        "peak_rss_bytes": peak,
        "peak_rss_over_checkpoint": peak / size,
        "peak_anon_bytes_sampled": peak_anon,
        "peak_file_backed_bytes_sampled": peak_file,
        "note": "RSS counts the pages of the mmapped input safetensors files that were read (file-backed, "
        "reclaimable); the anonymous part is what the merge itself holds. Sampled every 50 ms.",
        "target_bytes": size + 2**30,
        "meets_target": peak < size + 2**30,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": command_line("merge_memory", argv),
    }
    print(
        f"merge {result['merge_seconds']:.1f} s, peak RSS {peak / 2**30:.2f} GiB (anonymous {peak_anon / 2**30:.2f}, "
        f"file-backed {peak_file / 2**30:.2f}) for a {size / 2**30:.2f} GiB "
        f"checkpoint (target < {(size + 2**30) / 2**30:.2f} GiB): {'met' if result['meets_target'] else 'MISSED'}"
    )
    write_json_atomic(args.output, result)
    shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
