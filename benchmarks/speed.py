"""Speed of RSD on a GPU against target-only decoding, on random weights of Qwen2.5-Math's shapes (bf16).

A 1.5B draft, a 7B target and a 1.5B value-head PRM. Steps have a fixed length (`rsd_max_step_tokens`): random
models do not write "\\n\\n". δ is calibrated on a pilot run to give about 80% and 50% step acceptance. Measured
side by side in one run, at each batch size:
- per decoding path (`--modes`: "off" = eager dynamic caches, "graphs" = static caches with CUDA-graph-captured
  forwards, "compile" = graphs with the one-token forward compiled first): ms per one-token forward of the draft
  and the target, ms per PRM step, the target decoding alone on that path, and RSD end to end (tokens/s) at both
  acceptance levels, with the cost model's prediction from the per-component times and measured / predicted;
- stock `target.generate` (eager), `target.generate` with a static cache (transformers compiles it), and
  transformers assisted generation (batch 1 only);
- speedups of RSD over the best target-only decoding among all of these, and over stock eager `generate`.

With `--queue-prompts Q`, a batch size B below Q runs Q prompts through B slots: RSD through its refilling queue
(`rsd_max_batch_size=B`), every target-only baseline and SD over the Q prompts in batches of B, one after another.

    python -m rsd_generation.benchmarks.speed [--batch-sizes 1 16] [--new-tokens 128]
        [--output benchmarks/results/speed-<gpu>.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    StoppingCriteriaList,
)

import rsd_generation as rsd
from rsd_generation import fast
from rsd_generation.decoding import RowIds, Sampling, StepRules, decode_step, step_separator
from rsd_generation.fast import row_cache

from .io import refuse_overwrite, write_json_atomic

QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)  # fmt: skip
QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def word_tokenizer(n: int) -> PreTrainedTokenizerFast:
    """A tokenizer of `n` tokens, "a".."z", "\\n", then "<w27>".."<w{n-1}>": decoding then encoding gives the ids
    back (the letters and the newline let transformers' StopStringCriteria index the vocabulary)."""
    vocab = {(chr(97 + i) if i < 26 else "\n" if i == 26 else f"<w{i}>"): i for i in range(n)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"<w\d+>|[a-z\n]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="a", padding_side="left")


def random_model(shapes: dict, seed: int, device: str, dtype: torch.dtype) -> Qwen2ForCausalLM:
    """A random Qwen2 causal LM of the given shapes, built on the device in `dtype`, with no EOS."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(Qwen2Config(**shapes, max_position_embeddings=4096, pad_token_id=0)).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # fixed-length runs: random models would stop anywhere
    model.generation_config.pad_token_id = 0
    return rsd.with_rsd(model)


def _sync() -> None:
    """Wait for the GPU (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[object, float, list[float]]:
    """Warm up once, then run `repeats` times with the device synchronised; (last result, median s, all s)."""
    res = fn()
    times = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        res = fn()
        _sync()
        times.append(time.perf_counter() - t)
    return res, statistics.median(times), times


def _target_only_rules(tok, n: int) -> tuple[Sampling, StepRules]:
    """Greedy, no EOS, a step of `n` tokens: one `decode_step` generates exactly `n` tokens."""
    s = Sampling(LogitsProcessorList(), False, None, 10**9, torch.empty(0, dtype=torch.long), 0)
    return s, StepRules(step_separator(tok, "\n\n"), n, StoppingCriteriaList())


def loop_alone(model, role: str, tok, prompts: torch.Tensor, n: int, mode: str, capacity: int) -> tuple[float, float]:
    """One model decoding alone on the RSD path (`decode_step` over the cache `mode` gives): prefill and `n`
    tokens. Returns (seconds for the whole call, ms per one-token forward measured over the `n` tokens)."""
    B = prompts.shape[0]
    s, rules = _target_only_rules(tok, n)
    rows, budget, ctx = torch.ones(B, dtype=torch.bool), torch.full((B,), 10**6), RowIds(prompts.cpu(), 0)
    cache = row_cache(model, role, B, 0, mode, capacity)
    cache.pending = prompts.tolist()
    _sync()
    t0 = time.perf_counter()
    decode_step(cache, ctx, rows, budget, s, rules)  # prefill + n tokens
    _sync()
    whole = time.perf_counter() - t0
    t1 = time.perf_counter()
    decode_step(cache, ctx, rows, budget, s, rules)  # n more one-token forwards (the first feeds 1 queued token)
    _sync()
    return whole, (time.perf_counter() - t1) / n * 1e3


def ms_per_prm_step(prm, tok, prompts: torch.Tensor, step_tokens: int, repeats: int, mode: str, cap: int) -> float:
    """Median ms of scoring one `step_tokens`-token step for every row (and keeping it)."""
    B = prompts.shape[0]
    problems = tok.batch_decode(prompts.tolist())
    g = torch.Generator().manual_seed(0)
    steps = [
        tok.batch_decode(torch.randint(1, 1000, (B, step_tokens), generator=g).tolist()) for _ in range(repeats + 6)
    ]
    prm.start(problems, fast_path=mode, capacity=cap)
    times = []
    for k, texts in enumerate(steps):
        _sync()
        t = time.perf_counter()
        prm.score(texts)
        prm.resolve(torch.ones(B, dtype=torch.bool), [None] * B)
        _sync()
        if k >= 2:  # the first call also feeds the problem prefixes
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def calibration_rewards(target, draft, prm, tok, enc: dict, args, mode: str) -> list[float]:
    """Draft step rewards of a pilot run on the measured prompts and path with every step accepted, sorted: δ is
    read off them (bf16 rounding differs between paths, and random models' rewards sit close together)."""
    pilot = target.generate(
        **enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, tokenizer=tok,
        assistant_model=draft, reward_model=prm, rsd_threshold=float("-inf"), rsd_max_step_tokens=args.step_tokens,
        return_dict_in_generate=True, rsd_fast_path=mode,
    )  # fmt: skip
    return sorted(s["reward"] for row in pilot.rsd_stats["steps"] for s in row)


def ms_per_replay(model, role: str, n: int = 64) -> float | None:
    """ms per replay of a model's captured one-token graph, back to back: the device time of one decode forward
    with no host work in between (None when nothing was captured)."""
    cache = fast.kept_cache(model, role)
    graph = cache.captured_graph(1) if cache is not None else None
    if graph is None:
        return None
    graph.replay()
    _sync()
    t = time.perf_counter()
    for _ in range(n):
        graph.replay()
    _sync()
    return (time.perf_counter() - t) / n * 1e3


def _capture_seconds() -> dict:
    """Seconds spent capturing (and compiling) per kept static cache, by model role."""
    out: dict = {}
    for role, cache in fast.kept_caches():
        out[role] = out.get(role, 0.0) + cache.capture_seconds
    return out


def measure_mode(B: int, mode: str, draft, target, prm, tok, prompts, args) -> dict:
    """Per-component times and RSD end to end on one decoding path (`mode`, see `rsd_fast_path`); `prompts` `(Q, P)`
    go through B slots."""
    N, R = args.new_tokens, args.repeats
    cap = args.prompt_tokens + 2 * N + 64  # two runs of N tokens (rsd_decode's own caches are sized alike)
    chunks = prompts.split(B)  # target alone: the prompts in batches of B, one after another
    row: dict = {"mode": mode}
    t0 = time.perf_counter()
    for model, role in ((draft, "draft"), (target, "target")):  # first use: capture / compile
        loop_alone(model, role, tok, chunks[0], N, mode, cap)
    row["first_use_seconds"] = time.perf_counter() - t0
    runs = {role: [[loop_alone(model, role, tok, c, N, mode, cap) for c in (chunks if role == "target" else chunks[:1])]
                   for _ in range(R)] for model, role in ((draft, "draft"), (target, "target"))}  # fmt: skip
    row["ms_per_forward"] = {role: statistics.median(r[0][1] for r in v) for role, v in runs.items()}
    row["target_alone_seconds"] = statistics.median(sum(c[0] for c in r) for r in runs["target"])
    row["ms_per_graph_replay"] = {
        role: ms_per_replay(model, role) for model, role in ((draft, "draft"), (target, "target"))
    }
    row["ms_per_prm_step"] = ms_per_prm_step(prm, tok, chunks[0], args.step_tokens, R, mode, 2 * N + 64)
    print(f"B={B} {mode}: per forward {row['ms_per_forward']} ms (graph replay alone {row['ms_per_graph_replay']}), "
          f"PRM step {row['ms_per_prm_step']:.2f} ms, "
          f"target alone {row['target_alone_seconds']:.3f} s", flush=True)  # fmt: skip
    if args.no_rsd:
        return row
    enc = {"input_ids": prompts.to(target.device), "attention_mask": torch.ones_like(prompts).to(target.device)}
    coin = args.acceptance == "coin"
    rewards = None if coin else calibration_rewards(target, draft, prm, tok, enc, args, mode)
    row["rsd"] = {}
    cases = [(name, q, sch) for name, q in (("accept80", 0.2), ("accept50", 0.5)) for sch in args.schedules]
    for name, q, schedule in cases:
        name = name if schedule == "eager" else f"{name}-schedule-{schedule}"
        if coin:  # ω = p for every step, u from a seeded generator: the same decisions on every run and path
            delta = 1 - q
            how = dict(rsd_weighting="constant", rsd_weighting_kwargs={"p": delta})
        else:  # binary ω at a δ read off the pilot's rewards
            delta = (rewards[int(q * len(rewards))] + rewards[int(q * len(rewards)) - 1]) / 2  # between two steps
            how = dict(rsd_weighting="binary")
        accepted: list[float] = []

        def run(d=delta, accepted=accepted, how=how, schedule=schedule):
            out = target.generate(
                **enc, max_new_tokens=N, min_new_tokens=N, do_sample=False, tokenizer=tok, assistant_model=draft,
                reward_model=prm, rsd_threshold=d, rsd_max_step_tokens=args.step_tokens,
                return_dict_in_generate=True, rsd_fast_path=mode, rsd_max_batch_size=B,
                rsd_generator=torch.Generator().manual_seed(args.coin_seed), rsd_schedule=schedule, **how,
            )  # fmt: skip
            accepted.append(out.rsd_stats["acceptance_rate"])
            return out

        out, t, all_t = timed(run, R)
        st = out.rsd_stats
        calls = st["forward_calls"]
        predicted = (
            calls["draft"] * row["ms_per_forward"]["draft"]
            + calls["target"] * row["ms_per_forward"]["target"]
            + calls["reward"] * row["ms_per_prm_step"]
        ) / 1e3
        row["rsd"][name] = {
            "acceptance_control": "constant ω = p, seeded u" if coin else "binary ω, δ from a pilot run",
            "schedule": schedule,
            "ticks": st["ticks"],
            "p" if coin else "delta": delta,
            "acceptance_rate": st["acceptance_rate"],
            "acceptance_rate_per_run": accepted[1:],  # after the warm-up; runs may differ by bf16 rounding near δ
            "seconds": t,
            "seconds_all": all_t,
            "tokens_per_s": len(prompts) * N / t,
            "forward_calls": calls,
            "prm_calls": st["prm_calls"],
            "predicted_seconds": predicted,
            "measured_over_predicted": t / predicted,
        }
        print(f"B={B} {mode} RSD {name}: {row['rsd'][name]}", flush=True)
    row["capture_seconds"] = _capture_seconds()
    return row


def measure(B: int, draft, target, prm, tok, args) -> dict:
    """Every measurement at batch size `B` (B slots for `--queue-prompts` prompts), side by side."""
    N, Q = args.new_tokens, max(B, args.queue_prompts or B)
    g = torch.Generator().manual_seed(B)
    prompts = torch.randint(1, 1000, (Q, args.prompt_tokens), generator=g)
    enc = {"input_ids": prompts.to(target.device), "attention_mask": torch.ones_like(prompts).to(target.device)}
    batches = [{k: v[i : i + B] for k, v in enc.items()} for i in range(0, Q, B)]  # baselines: B at a time
    fixed = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    row: dict = {"batch_size": B, "prompts": Q, "new_tokens": N, "prompt_tokens": args.prompt_tokens, "modes": {}}
    row["command"] = result_command(args)
    for mode in args.modes:
        row["modes"][mode] = measure_mode(B, mode, draft, target, prm, tok, prompts, args)
    times = {f"target_alone_{m}": v["target_alone_seconds"] for m, v in row["modes"].items()}
    RB = args.baseline_repeats
    _, times["target_generate_eager"], _ = timed(lambda: [target.generate(**b, **fixed) for b in batches], RB)
    if Q == 1 and not args.no_assisted:  # transformers refuses batched assisted generation
        # vocab sizes differ by padding (151936 vs 152064), so transformers takes its universal (text-level) path
        assisted = dict(assistant_model=draft, tokenizer=tok, assistant_tokenizer=tok)
        try:
            _, times["assisted_generation"], _ = timed(lambda: target.generate(**enc, **fixed, **assisted), RB)
        except (ValueError, RuntimeError) as e:  # report, do not hide, a failure of the baseline
            row["assisted_generation_error"] = f"{type(e).__name__}: {e}"
    if not args.no_static and Q == B:
        t0 = time.perf_counter()
        target.generate(**enc, **fixed, cache_implementation="static")
        _sync()
        row["generate_static_first_call_s"] = time.perf_counter() - t0  # includes compilation
        _, times["target_generate_static"], _ = timed(
            lambda: target.generate(**enc, **fixed, cache_implementation="static"), RB
        )
    if not args.no_sd:  # our batched speculative decoding, on the first measured path: what a user could pick instead
        sd_mode = args.modes[0]
        _, row["sd_seconds"], _ = timed(
            lambda: [rsd.speculative_generate(target, draft, **b, **fixed, gamma=args.gamma, fast_path=sd_mode)
                     for b in batches], RB,
        )  # fmt: skip
        row["sd_mode"], row["sd_gamma"] = sd_mode, args.gamma
    row["target_only_seconds"] = times
    best = min((k for k in times if k != "assisted_generation"), key=times.get)
    row["best_target_only"] = best
    for v in row["modes"].values():
        for r in v.get("rsd", {}).values():
            r["speedup_vs_best_target_only"] = times[best] / r["seconds"]
            r["speedup_vs_target_generate_eager"] = times["target_generate_eager"] / r["seconds"]
            if "sd_seconds" in row:
                r["speedup_vs_sd"] = row["sd_seconds"] / r["seconds"]
            if "target_generate_static" in times:
                r["speedup_vs_target_generate_static"] = times["target_generate_static"] / r["seconds"]
    row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(f"B={B} target-only {times} (best: {best}), peak GPU memory {row['peak_gpu_memory_gib']} GiB", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--step-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up (median reported)")
    ap.add_argument(
        "--acceptance",
        choices=["coin", "delta"],
        default="coin",
        help="coin: constant weighting p = 0.8 / 0.5 with seeded draws (the same decisions on every run and "
        "path); delta: binary weighting at a δ read off a pilot run's rewards (random models' rewards sit "
        "close together, so bf16 rounding moves decisions)",
    )
    ap.add_argument("--coin-seed", type=int, default=16, help="seed of the acceptance draws (16: 8 of 10 and 5 of 10)")
    ap.add_argument("--baseline-repeats", type=int, default=2, help="timed runs of transformers' generate baselines")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for checking the script itself")
    ap.add_argument("--no-static", action="store_true", help="skip target.generate with a static (compiled) cache")
    ap.add_argument("--no-assisted", action="store_true", help="skip transformers assisted generation")
    ap.add_argument("--no-rsd", action="store_true", help="per-component times only")
    ap.add_argument("--no-sd", action="store_true", help="skip rsd.speculative_generate (batched SD)")
    ap.add_argument("--gamma", type=int, default=4, help="tokens the draft proposes per target forward in SD")
    ap.add_argument(
        "--schedules",
        nargs="+",
        type=lambda v: int(v) if v.isdigit() else v,
        default=["eager"],
        help="rsd_schedule values to measure RSD with (eager, throughput, or k rows waiting)",
    )
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["off", "graphs", "compile"],
        choices=fast.MODES[1:],
        help="decoding paths to measure (rsd_fast_path values)",
    )
    ap.add_argument(
        "--max-autotune",
        action="store_true",
        help="compile with mode='max-autotune-no-cudagraphs' and coordinate-descent tuning (slow to compile)",
    )
    ap.add_argument(
        "--queue-prompts",
        type=int,
        default=None,
        help="prompts per measurement: a batch size B below it runs them through B slots (RSD's refilling queue; "
        "the baselines B at a time)",
    )
    ap.add_argument("--output", default=None, help="default: benchmarks/results/speed-<gpu>.json")
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    ap.add_argument(
        "--append",
        action="store_true",
        help="add this run's rows to an existing output of the same device and versions (each row keeps its command)",
    )
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.queue_prompts is not None and args.queue_prompts < 1:
        ap.error(f"--queue-prompts must be >= 1, got {args.queue_prompts}")
    if args.max_autotune:
        torch._inductor.config.coordinate_descent_tuning = True
        fast.COMPILE_OPTIONS["mode"] = "max-autotune-no-cudagraphs"
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("error: benchmarks.speed needs a CUDA GPU (only --tiny runs on the CPU, to check the script)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    output = args.output or f"benchmarks/results/speed-{gpu.split()[1].lower() if len(gpu.split()) > 1 else 'gpu'}.json"
    previous = _previous_rows(output, gpu) if args.append else []
    if not args.append:
        refuse_overwrite(output, args.force)

    small, big = (dict(QWEN_1_5B), dict(QWEN_7B))
    if args.tiny:
        small, big = {**small, **TINY}, {**big, **TINY, "hidden_size": 128}
    tok = word_tokenizer(small["vocab_size"])
    draft = random_model(small, 1, device, torch.bfloat16)
    target = random_model(big, 2, device, torch.bfloat16)
    prm_lm = random_model(small, 3, device, torch.bfloat16)
    head = nn.Linear(small["hidden_size"], 1).to(device, torch.bfloat16)
    prm = rsd.ValueHeadPRM(prm_lm.model, head, tok, step_token="b")
    params = {"draft": draft.num_parameters(), "target": target.num_parameters(), "reward": prm.num_parameters}
    print(f"{gpu}: parameters {params}", flush=True)

    rows: list[dict] = list(previous)
    result = {
        "device": gpu,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "dtype": "bfloat16",
        "parameters": params,
        "shapes": {"draft": small, "target": big},
        "timing": f"median of {args.repeats} synchronised runs after a warm-up ({args.baseline_repeats} for "
        "transformers' generate baselines)",
        "compile_options": dict(fast.COMPILE_OPTIONS),
        "rows": rows,
        "complete": False,
        "command": result_command(args),
    }
    for B in args.batch_sizes:  # saved after each batch size: an interrupted run keeps what it measured
        rows.append(measure(B, draft, target, prm, tok, args))
        result["complete"] = len(rows) == len(previous) + len(args.batch_sizes)
        write_json_atomic(output, result)
    print(f"wrote {output}")
    return result


def result_command(args) -> str:
    """The command line that reproduces this run."""
    return " ".join(["python -m rsd_generation.benchmarks.speed", *args.argv])


def _previous_rows(output: str, device: str) -> list[dict]:
    """The rows of an earlier output to append to (none if there is none); refused if it was measured on another
    device or with other versions."""
    try:
        with open(output) as f:
            old = json.load(f)
    except FileNotFoundError:
        return []
    now = {"torch": torch.__version__, "transformers": transformers.__version__}
    if old.get("device") != device or old.get("versions") != now:
        raise SystemExit(
            f"error: {output} was measured on {old.get('device')!r} with {old.get('versions')}; this run is on "
            f"{device!r} with {now}: write to another --output"
        )
    if not old.get("complete", False):
        raise SystemExit(f"error: {output} holds an interrupted run; write to another --output")
    return old["rows"]


if __name__ == "__main__":
    main()
