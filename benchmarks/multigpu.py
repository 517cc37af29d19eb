"""RSD with a target spread over GPUs by accelerate's `device_map`, on random bf16 weights of Qwen2.5-Math shapes.

Measured side by side in one run on two (or more) GPUs:
- **split against unsplit**: the 7B target spread over the GPUs against the same weights on cuda:0: ms per one-token
  forward on each path, and whether the tokens (and RSD's decisions) are equal for δ = 0, δ above every reward and a
  seeded mixed acceptance, on each path (a split model runs the fixed-shape caches eagerly where a single-GPU one
  replays CUDA graphs);
- **a large target across the GPUs** (`--large`, default a 72B shape) with the 1.5B draft and PRM on cuda:0:
  `benchmarks.speed`'s measurements at each batch size (RSD at 80% and 50% step acceptance, seeded, against the split
  target alone on its best path and stock `generate`), and ms per target forward against its floor: the weights and
  KV columns it reads, one GPU after another, at the copy bandwidth measured in the same run.

    python -m rsd_generation.benchmarks.multigpu [--batch-sizes 1 16] [--new-tokens 256]
        [--output benchmarks/results/multigpu-h200x2.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import transformers
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

import rsd_generation as rsd
from rsd_generation import fast

from . import speed
from .io import command_line, refuse_overwrite, write_json_atomic

QWEN_72B = dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)  # fmt: skip


def split_device_map(n_layers: int, devices: int | list, prefix: str = "model.", head: bool = True) -> dict:
    """A `device_map` spreading a decoder over `devices` (a count: GPUs 0..n-1): the embeddings and the first layers
    on the first device, the layers in equal runs, the final norm (and the head) with the last layers."""
    devices = list(range(devices)) if isinstance(devices, int) else devices
    n = len(devices)
    layers = {f"{prefix}layers.{i}": devices[i * n // n_layers] for i in range(n_layers)}
    first, last = devices[0], devices[-1]
    out = {f"{prefix}embed_tokens": first, f"{prefix}rotary_emb": first, **layers, f"{prefix}norm": last}
    return {**out, "lm_head": last} if head else out


def _device(d: int | str) -> torch.device:
    """A device-map value as a device (an int is a GPU index)."""
    return torch.device(f"cuda:{d}" if isinstance(d, int) else d)


def split_random_model(shapes: dict, seed: int, devices: int | list, dtype: torch.dtype) -> Qwen2ForCausalLM:
    """A random Qwen2 causal LM too large for one GPU, built in place: each module is allocated on the device
    `split_device_map` gives it and initialised there as transformers does (normal(0, initializer_range) weights, zero
    biases, unit norms), then dispatched by accelerate. No EOS, like `speed.random_model`."""
    from accelerate import dispatch_model

    config = Qwen2Config(**shapes, max_position_embeddings=4096, pad_token_id=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    device_map = split_device_map(config.num_hidden_layers, devices)
    for name, d in device_map.items():
        model.get_submodule(name).to_empty(device=_device(d))
    first = _device(device_map["model.embed_tokens"])
    with first:  # its inverse frequencies are computed at construction, not stored
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    generators: dict = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                g = generators.setdefault(p.device, torch.Generator(p.device).manual_seed(seed + len(generators)))
                p.normal_(0.0, config.initializer_range, generator=g)
    model = dispatch_model(model, device_map=device_map)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return rsd.with_rsd(model)


def split_copy(model: nn.Module, n_devices: int) -> nn.Module:
    """A copy of a single-GPU causal LM spread over `n_devices` GPUs."""
    from accelerate import dispatch_model

    device_map = split_device_map(model.config.num_hidden_layers, n_devices)
    return rsd.with_rsd(dispatch_model(copy.deepcopy(model), device_map=device_map))


def _rsd(model, draft, prm, tok, prompts: torch.Tensor, n: int, mode: str, **kw):
    """One seeded RSD call (greedy, fixed length, 32-token steps)."""
    enc = {"input_ids": prompts.to(model.device), "attention_mask": torch.ones_like(prompts).to(model.device)}
    return model.generate(
        **enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, tokenizer=tok, assistant_model=draft,
        reward_model=prm, rsd_max_step_tokens=32, rsd_fast_path=mode, return_dict_in_generate=True,
        rsd_generator=torch.Generator().manual_seed(2), **kw,
    )  # fmt: skip


def split_against_unsplit(target, draft, prm, tok, n_devices: int, args) -> dict:
    """ms per target forward split and unsplit on each path, and equality of tokens and decisions (see the module
    docstring)."""
    split = split_copy(target, n_devices)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 1000, (args.equality_batch, args.prompt_tokens), generator=g)
    cap = args.prompt_tokens + 2 * args.new_tokens + 64
    out: dict = {"ms_per_forward": {}, "equal": {}, "batch_size": args.equality_batch}
    for mode in args.split_modes:
        for name, model in (("unsplit", target), ("split", split)):
            speed.loop_alone(model, "target", tok, prompts, args.new_tokens, mode, cap)  # first use: capture
            _, ms = speed.loop_alone(model, "target", tok, prompts, args.new_tokens, mode, cap)
            out["ms_per_forward"][f"{name}_{mode}"] = ms
        cases = {
            "delta0": dict(rsd_threshold=0.0),
            "delta_above_every_reward": dict(rsd_threshold=1.5),
            "seeded_mixed": dict(rsd_weighting="constant", rsd_weighting_kwargs={"p": 0.5}, rsd_threshold=0.5),
        }
        for case, kw in cases.items():
            a, b = (_rsd(m, draft, prm, tok, prompts, args.new_tokens, mode, **kw) for m in (target, split))
            out["equal"][f"{mode}_{case}_tokens"] = torch.equal(a.sequences.cpu(), b.sequences.cpu())
            decisions = [[[s["accepted"] for s in row] for row in r.rsd_stats["steps"]] for r in (a, b)]
            out["equal"][f"{mode}_{case}_decisions"] = decisions[0] == decisions[1]
        print(f"split against unsplit, {mode}: {out}", flush=True)
    del split
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up (median reported)")
    ap.add_argument("--modes", nargs="+", default=["graphs"], help="paths for the large target's measurements")
    ap.add_argument("--split-modes", nargs="+", default=["off", "graphs"], help="paths for split against unsplit")
    ap.add_argument("--equality-batch", type=int, default=4, help="batch size of split against unsplit")
    ap.add_argument("--no-large", action="store_true", help="split against unsplit only")
    ap.add_argument("--no-split-check", action="store_true", help="the large target only (no split against unsplit)")
    ap.add_argument("--no-generate", action="store_true", help="skip stock target.generate for the large target")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for checking the script itself")
    ap.add_argument("--output", default=None, help="default: benchmarks/results/multigpu-<gpu>x<n>.json")
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    n_devices = torch.cuda.device_count()
    if n_devices < 2:
        raise SystemExit(f"error: benchmarks.multigpu needs 2 or more CUDA GPUs; this machine has {n_devices}")
    gpu = torch.cuda.get_device_name(0)
    output = args.output or f"benchmarks/results/multigpu-{gpu.split()[-1].lower()}x{n_devices}.json"
    refuse_overwrite(output, args.force)
    argv = sys.argv[1:] if argv is None else argv
    command = command_line("multigpu", argv)

    small, big, large = dict(speed.QWEN_1_5B), dict(speed.QWEN_7B), dict(QWEN_72B)
    if args.tiny:
        small, big = {**small, **speed.TINY}, {**big, **speed.TINY, "hidden_size": 128}
        large = {**large, **speed.TINY, "hidden_size": 256, "num_hidden_layers": 4}
    tok = speed.word_tokenizer(small["vocab_size"])
    draft = speed.random_model(small, 1, "cuda:0", torch.bfloat16)
    prm_lm = speed.random_model(small, 3, "cuda:0", torch.bfloat16)
    head = nn.Linear(small["hidden_size"], 1).to("cuda:0", torch.bfloat16)
    prm = rsd.ValueHeadPRM(prm_lm.model, head, tok, step_token="b")
    result: dict = {
        "device": f"{n_devices} x {gpu}",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": __import__("accelerate").__version__,
        },
        "dtype": "bfloat16",
        "copy_bandwidth_tb_s": speed.copy_bandwidth("cuda:0") / 1e12,
        "command": command,
        "complete": False,
    }
    print(f"{result['device']}: copy bandwidth {result['copy_bandwidth_tb_s']:.2f} TB/s", flush=True)

    if not args.no_split_check:
        target = speed.random_model(big, 2, "cuda:0", torch.bfloat16)
        result["split_7b"] = split_against_unsplit(target, draft, prm, tok, n_devices, args)
        write_json_atomic(output, result)
        del target
        fast.release_fast_caches()
        torch.cuda.empty_cache()
    if args.no_large:
        result["complete"] = True
        write_json_atomic(output, result)
        return result

    t = time.perf_counter()
    target = split_random_model(large, 4, n_devices, torch.bfloat16)
    result["large"] = {"shape": large, "parameters": target.num_parameters(), "build_seconds": time.perf_counter() - t}
    placed = list(target.hf_device_map.values())
    result["large"]["modules_per_gpu"] = {str(d): placed.count(d) for d in range(n_devices)}
    sargs = speed.parser().parse_args(
        ["--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens), "--repeats",
         str(args.repeats), "--baseline-repeats", str(args.repeats), "--modes", *args.modes, "--agreements",
         "--no-static", "--no-assisted", "--no-sd", *(["--no-generate"] if args.no_generate else [])]
    )  # fmt: skip
    sargs.argv = argv
    rows = result["large"]["rows"] = []
    bw = result["copy_bandwidth_tb_s"] * 1e12
    for B in args.batch_sizes:  # saved after each batch size: an interrupted run keeps what it measured
        row = speed.measure(B, draft, target, prm, tok, sargs)
        row["command"] = command
        columns = args.prompt_tokens + args.new_tokens  # the KV columns at the second of loop_alone's runs, at most
        for m in row["modes"].values():
            floors = {"draft": speed.floor_ms(draft, B, columns, bw), "target": speed.floor_ms(target, B, columns, bw)}
            m["floor_ms"] = floors
            m["ms_per_forward_over_floor"] = {r: m["ms_per_forward"][r] / floors[r] for r in floors}
        rows.append(row)
        write_json_atomic(output, result)
    result["complete"] = True
    write_json_atomic(output, result)
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
