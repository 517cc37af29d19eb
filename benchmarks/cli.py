"""rsd-bench: accuracy, FLOPs and wall-clock of RSD against target-only, draft-only, speculative decoding,
majority voting, best-of-N, process best-of-N and beam search, on the shipped toy models or on real checkpoints.

    rsd-bench --preset quick                       # toy models, CPU, a few minutes; prints the table
    rsd-bench --preset table2 --output out/table2  # every method on 500 toy problems
    rsd-bench --dataset math500 --draft Qwen/Qwen2.5-Math-1.5B-Instruct --target Qwen/Qwen2.5-Math-7B-Instruct \\
        --prm small=Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B --methods target draft rsd --deltas 0.7

Per-question results go to OUTPUT/records.jsonl as they are produced (`--resume` continues an interrupted run),
then summary.json, table.md and plots under OUTPUT/plots.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from huggingface_hub import utils as hf_hub_utils
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import rsd_generation as rsd
from rsd_generation.paths import looks_local
from rsd_generation.schedule import Scheduler

from . import datasets, toy
from .io import RecordStore, output_lock, write_json_atomic
from .methods import METHODS, Batch, Models, Setting, seed_for, split
from .report import markdown, plot, summarize
from .served import SERVED_METHODS, load_served_models, run_served
from .toy.task import SEPARATOR

TOY = toy.MODELS
ALL_METHODS = (
    "target",
    "draft",
    "sd",
    "rsd",
    "rsd_merged",
    "majority",
    "best_of_n",
    "process_best_of_n",
    "beam_search",
)
DEFAULT_PRMS = (f"small={TOY / 'prm-small'}", f"large={TOY / 'prm-large'}")
WEIGHTINGS = ("binary", "constant", "clip", "sigmoidal", "logistic")
PRESETS = {
    "quick": dict(
        num_problems=50, methods=["target", "draft", "sd", "rsd", "majority", "best_of_n", "process_best_of_n"],
        deltas=[0.5, 0.7, 0.9], n=[4], output="out/quick", queue=4,  # RSD: all 50 prompts through 16 slots
    ),
    "table2": dict(
        num_problems=500, methods=list(ALL_METHODS), deltas=[0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
        weightings=list(WEIGHTINGS), rsd_prms=["small", "large"], n=[4, 16], beams=[4, 8], output="out/table2",
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="rsd-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named set of the options below (flags override)")
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", choices=["toy", "math500", "gsm8k"], default="toy")
    g.add_argument("--data-dir", type=Path, help=f"folder holding math500/ and gsm8k/ (default {datasets.DATA_DIR})")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-problems", type=int, default=None, help="toy: how many; real data: the first N")
    g.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="toy levels")
    g = ap.add_argument_group("models")
    g.add_argument("--draft", default=str(TOY / "draft"))
    g.add_argument("--target", default=str(TOY / "target"))
    g.add_argument(
        "--prm", nargs="+", action="extend", default=None,
        help="reward models as NAME=PATH (a bare PATH is named by its folder); may be repeated "
        "(default: the toy models' small= and large= PRMs)",
    )  # fmt: skip
    g.add_argument("--merged-draft", help="merged draft+PRM checkpoint (default: merged on the fly into OUTPUT/merged)")
    g.add_argument("--merged-target", help="merged target+PRM checkpoint (default: merged on the fly)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on CPU, bfloat16 on GPU")  # fmt: skip
    g.add_argument(
        "--device-map", default=None, help="passed to from_pretrained (default: cuda if available, else cpu)"
    )
    g = ap.add_argument_group("methods")
    g.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=["target", "draft", "rsd"])
    g.add_argument("--deltas", type=float, nargs="+", default=[0.7], help="RSD thresholds δ (binary, logistic)")
    g.add_argument("--weightings", nargs="+", choices=WEIGHTINGS, default=["binary"])
    g.add_argument(
        "--budgets", type=float, nargs="+", default=[],
        help="RSD rows with rsd_budget=γ: at most a share γ of the steps to the target, δ chosen online (per generate "
        "call, i.e. per batch or queue)",
    )  # fmt: skip
    g.add_argument("--rsd-prms", nargs="+", default=None, help="names of the PRMs RSD runs with (default: all)")
    g.add_argument("--n", type=int, nargs="+", default=[4], help="samples of majority voting, best-of-N, process BoN")
    g.add_argument("--beams", type=int, nargs="+", default=[4], help="beam sizes of beam search")
    g.add_argument("--beam-expand", type=int, default=4, help="next steps sampled per beam")
    g = ap.add_argument_group("decoding")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: 160 (toy), 2048 (real data)")
    g.add_argument("--max-step-tokens", type=int, default=None, help="default: 48 (toy), 512 (real data)")
    g.add_argument("--temperature", type=float, default=0.7, help="of the sampling baselines")
    g.add_argument("--do-sample", action="store_true", help="sample the single-answer methods too (default greedy)")
    g.add_argument(
        "--queue", type=int, default=1,
        help="RSD: give generate Q batches of prompts at a time, decoded --batch-size at once through a refilling "
        "queue (rsd_max_batch_size); records are saved after each Q batches (default 1: fixed batches)",
    )  # fmt: skip
    g.add_argument(
        "--schedule", default="eager", type=lambda v: int(v) if v.isdigit() else v,
        help="rsd_schedule of RSD: eager (default), throughput, or k (the target runs once k rows wait)",
    )  # fmt: skip
    g = ap.add_argument_group("backend")
    g.add_argument(
        "--backend", choices=["transformers", "vllm"], default="transformers",
        help="transformers: the models in this process; vllm: RSD and the baselines over OpenAI-compatible vLLM "
        "servers (rsd-serve starts them) serving the --draft, --target and --prm checkpoints (greedy; methods "
        f"{', '.join(SERVED_METHODS)})",
    )  # fmt: skip
    g.add_argument("--draft-url", help="--backend vllm: the draft's server, e.g. http://127.0.0.1:8000")
    g.add_argument("--target-url", help="--backend vllm: the target's server (may be the draft's)")
    g.add_argument(
        "--prm-url", nargs="+", action="extend", default=None,
        help="--backend vllm: each RSD reward model's server as NAME=URL (NAME as in --prm)",
    )  # fmt: skip
    g.add_argument("--concurrency", type=int, default=64, help="--backend vllm: problems in flight at once")
    g = ap.add_argument_group("output")
    g.add_argument("--output", type=Path, default=None)
    g.add_argument("--resume", action="store_true", help="continue OUTPUT/records.jsonl, skipping finished questions")
    g.add_argument("--force", action="store_true", help="discard OUTPUT's earlier results")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument(
        "--report-only", action="store_true",
        help="run nothing: rebuild summary.json, table.md and plots from OUTPUT/records.jsonl (e.g. after concatenating"
        " the records of runs split over several processes)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
    for k, v in preset.items():
        if k not in given:
            setattr(args, k, v)
    _validate(ap, args)
    return args


def _validate(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad values with the value named, before anything is loaded; fill in the defaults."""
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        ap.error("plots need matplotlib: pip install 'rsd-generation[bench]', or pass --no-plots")
    for name in ("batch_size", "beam_expand", "num_problems", "max_new_tokens", "max_step_tokens", "queue"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("n", "beams"):
        if any(v < 1 for v in getattr(args, name)):
            ap.error(f"--{name} values must be at least 1, got {getattr(args, name)}")
    if bad := [lv for lv in args.levels if lv not in (1, 2, 3, 4, 5)]:
        ap.error(f"--levels must be within 1-5, got {bad}")
    try:
        Scheduler(args.schedule)
    except ValueError as e:
        ap.error(f"--schedule: {e}")
    _validate_backend(ap, args)
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        ap.error(f"--temperature must be positive and finite, got {args.temperature}")
    if bad := [d for d in args.deltas if not math.isfinite(d)]:
        ap.error(f"--deltas must be finite numbers, got {bad}")
    if bad := [g for g in args.budgets if not 0.0 <= g <= 1.0]:
        ap.error(f"--budgets must be shares of steps in [0, 1], got {bad}")
    prms: dict[str, str] = {}
    if args.prm is None:  # not given (argparse's extend would add to a default list instead of replacing it)
        args.prm = list(DEFAULT_PRMS)
    for name, path in map(_named, args.prm):
        if not name:
            ap.error(f"--prm {name}={path}: the NAME before '=' is empty")
        if name in prms:
            ap.error(f"--prm names {name!r} twice ({prms[name]} and {path}); give each reward model its own NAME")
        prms[name] = path
    args.prm = prms
    if args.rsd_prms is not None and (bad := [p for p in args.rsd_prms if p not in args.prm]):
        ap.error(f"--rsd-prms names unknown reward models {bad}; known: {sorted(args.prm)}")
    if args.backend == "vllm":
        _validate_prm_urls(ap, args)
    needs_prm = {"rsd", "rsd_merged", "best_of_n", "process_best_of_n", "beam_search"} & set(args.methods)
    if needs_prm and not args.prm:
        ap.error(f"methods {sorted(needs_prm)} need a reward model (--prm)")
    if not args.report_only:  # which loads no model and no data
        args.draft = _model_path(ap, "--draft", args.draft)
        args.target = _model_path(ap, "--target", args.target)
        args.prm = {name: _model_path(ap, f"--prm {name}=", path) for name, path in args.prm.items()}
        for name in ("merged_draft", "merged_target"):
            if getattr(args, name) is not None:
                setattr(args, name, _model_path(ap, f"--{name.replace('_', '-')}", getattr(args, name)))
        if args.data_dir is not None and not args.data_dir.is_dir():
            ap.error(f"--data-dir {args.data_dir} is not a folder (it should hold math500/, gsm8k/ with test.jsonl)")
    toy = args.dataset == "toy"
    if args.num_problems is None:
        args.num_problems = 100 if toy else None
    if args.max_new_tokens is None:
        args.max_new_tokens = 160 if toy else 2048
    if args.max_step_tokens is None:
        args.max_step_tokens = 48 if toy else 512
    args.output = Path(args.output or f"out/{args.dataset}")
    if args.output.exists() and not args.output.is_dir():
        ap.error(f"--output {args.output} is a file; it must name a folder (new or one of rsd-bench's)")


def _validate_backend(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--backend vllm`: the methods it runs, greedy, and a URL for every server the methods need (the PRM URLs
    checked once `--prm` is resolved, in `_validate_prm_urls`)."""
    if args.concurrency < 1:
        ap.error(f"--concurrency must be at least 1, got {args.concurrency}")
    urls = {"--draft-url": args.draft_url, "--target-url": args.target_url, "--prm-url": args.prm_url}
    if args.backend != "vllm":
        if given := [k for k, v in urls.items() if v]:
            ap.error(f"{', '.join(given)} name servers for --backend vllm; this run's backend is {args.backend}")
        return
    if bad := [m for m in args.methods if m not in SERVED_METHODS]:
        ap.error(f"--backend vllm runs the methods {', '.join(SERVED_METHODS)}; not {', '.join(bad)}")
    if args.do_sample:
        ap.error("--backend vllm decodes greedily; --do-sample is not supported there")
    if args.budgets:
        ap.error(f"--backend vllm runs RSD at fixed thresholds; --budgets {args.budgets} is in-process only")
    needs = {"--draft-url": {"draft", "rsd"}, "--target-url": {"target", "rsd"}}
    for flag, methods in needs.items():
        if methods & set(args.methods) and not urls[flag]:
            ap.error(f"--backend vllm with methods {sorted(methods & set(args.methods))} needs {flag}")
        if urls[flag] and not urls[flag].startswith(("http://", "https://")):
            ap.error(f"{flag} must be an http(s) URL, got {urls[flag]!r}")


def _validate_prm_urls(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--prm-url NAME=URL` for every reward model RSD runs with, NAMEs known; `args.prm_url` becomes a dict."""
    given = [_named(v) for v in args.prm_url or []]
    urls = dict(given)
    if bad := [u for _, u in given if not u.startswith(("http://", "https://"))]:
        ap.error(f"--prm-url values must be NAME=URL with an http(s) URL, got {bad}")
    if unknown := [n for n in urls if n not in args.prm]:
        ap.error(f"--prm-url names unknown reward models {unknown}; known: {sorted(args.prm)}")
    if "rsd" in args.methods and (missing := [n for n in args.rsd_prms or args.prm if n not in urls]):
        ap.error(f"--backend vllm: RSD runs with reward models {missing}, which have no --prm-url NAME=URL")
    args.prm_url = urls


def _model_path(ap: argparse.ArgumentParser, option: str, value: str) -> str:
    """A model given as a local folder or a hub id. What looks local (starts with /, ./, ../ or ~, has more than one
    path separator, or exists) must be a folder, else an error naming it (not the hub's "Repo id must be in the
    form ..."); `~` is expanded."""
    path = Path(value).expanduser()
    if not looks_local(value) or path.is_dir():
        return str(path) if value.startswith("~") else value
    given = f"{option}{value}" if option.endswith("=") else f"{option} {value}"
    if path.exists():
        ap.error(f"{given} is a file, not a model folder")
    ap.error(f"{given} does not exist (no such model folder)")


def _named(spec: str) -> tuple[str, str]:
    """NAME=PATH, or PATH named by its last folder."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (Path(spec).name, spec)


def build_settings(args: argparse.Namespace) -> list[Setting]:
    """The result rows to run, in table order."""
    prms = args.rsd_prms or list(args.prm)
    last = list(args.prm)[-1]  # the search baselines use the last (largest) PRM
    out = []
    for m in args.methods:
        if m in ("target", "draft", "sd"):
            out.append(Setting(m, m))
        elif m == "rsd":
            for prm in prms:
                for w in args.weightings:
                    if w in ("binary", "logistic", "constant"):
                        for d in args.deltas if w != "constant" else [0.5]:
                            label = f"{w} δ={d}" if w != "constant" else f"constant p={d}"
                            out.append(Setting("rsd", f"{label} prm={prm}", {"prm": prm, "delta": d, "weighting": w}))
                    else:
                        out.append(Setting("rsd", f"{w} prm={prm}", {"prm": prm, "delta": 0.7, "weighting": w}))
                out += [Setting("rsd", f"budget γ={g} prm={prm}", {"prm": prm, "budget": g}) for g in args.budgets]
        elif m == "rsd_merged":
            for which in ("draft*", "target*"):
                out.append(Setting("rsd_merged", f"merged {which} δ=0.7", {"merged": which, "delta": 0.7}))
        elif m == "majority":
            out += [Setting(m, f"maj@{n}", {"n": n}) for n in args.n]
        elif m == "best_of_n":
            out += [Setting(m, f"bon@{n} prm={last}", {"n": n, "prm": last}) for n in args.n]
        elif m == "process_best_of_n":
            out += [Setting(m, f"pbon@{n} prm={last}", {"beam": 1, "expand": n, "prm": last}) for n in args.n]
        elif m == "beam_search":
            e = args.beam_expand
            out += [Setting(m, f"beam{b}x{e} prm={last}", {"beam": b, "expand": e, "prm": last}) for b in args.beams]
    return out


def _device_kind(device_map: str | None) -> str:
    """The kind of device the models run on ("cpu", "cuda", ...); accelerate's layouts ("auto", ...) place them on
    the GPUs when there are any."""
    if device_map is None or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device_map).type
    except RuntimeError:  # not a device name: kept as given
        return device_map


def _dtype(name: str, device_kind: str) -> torch.dtype:
    """`--dtype` resolved: auto is float32 on a CPU, bfloat16 elsewhere."""
    if name == "auto":
        return torch.float32 if device_kind == "cpu" else torch.bfloat16
    return getattr(torch, name)


def load_models(args: argparse.Namespace) -> Models:
    """Policies, tokenizer and reward models from paths or hub ids; merged checkpoints when asked for."""
    device_map = args.device_map or ("cuda" if torch.cuda.is_available() else "cpu")
    kw = {"dtype": _dtype(args.dtype, _device_kind(args.device_map)), "device_map": device_map}
    tok = AutoTokenizer.from_pretrained(args.target)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    target = rsd.with_rsd(AutoModelForCausalLM.from_pretrained(args.target, **kw).eval())
    draft = AutoModelForCausalLM.from_pretrained(args.draft, **kw).eval()
    prms = {name: rsd.load_reward_model(path, **kw) for name, path in args.prm.items()}
    merged = {}
    if "rsd_merged" in args.methods:
        names = list(args.prm)
        for which, policy, prm, given in (
            ("draft*", args.draft, args.prm[names[0]], args.merged_draft),
            ("target*", args.target, args.prm[names[-1]], args.merged_target),
        ):
            path = Path(given) if given else args.output / "merged" / which.replace("*", "-star")
            if not given and not path.exists():
                from rsd_generation.merging import merge_prm_with_policy

                merge_prm_with_policy(policy, prm, path)
            model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
            merged[which] = (model, rsd.load_reward_model(path, backbone=model, tokenizer=tok))
    return Models(
        tokenizer=tok, draft=draft, target=target, prms=prms, merged=merged,
        separator=SEPARATOR, max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens,
        temperature=args.temperature, do_sample=args.do_sample, schedule=args.schedule, slots=args.batch_size,
    )  # fmt: skip


def load_examples(args: argparse.Namespace) -> list[datasets.Example]:
    if args.dataset == "toy":
        return datasets.load_toy_dataset(args.seed, args.num_problems, tuple(args.levels))
    path = args.data_dir / args.dataset / "test.jsonl" if args.data_dir else None
    return datasets.load_jsonl_dataset(args.dataset, path, limit=args.num_problems)


def prompts_for(examples: list[datasets.Example], tok) -> tuple[list[str], list[str]]:
    """Policy prompts and the problem text the PRM sees. Toy: the trained format ("Compute ...\\n\\n") for both;
    real data: Qwen2.5-Math's chat prompt for the policies, the bare question for the PRM."""
    if examples and examples[0].dataset == "toy":
        texts = [e.question + SEPARATOR for e in examples]
        return texts, texts
    return [datasets.qwen_math_prompt(tok, e.question) for e in examples], [e.question for e in examples]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> list[dict]:
    """Run every setting over every example (skipping finished ones), saving as it goes; returns the summary."""
    out: Path = args.output
    config = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("resume", "force", "preset", "output", "no_plots")
    }
    config["device"] = _device_kind(args.device_map)
    config["torch_dtype"] = str(_dtype(args.dtype, config["device"])).removeprefix("torch.")
    _check_resume(out / "run.json", config, args.resume)  # before anything in OUTPUT is touched
    store = RecordStore(out / "records.jsonl", resume=args.resume, force=args.force)
    write_json_atomic(out / "run.json", config)
    examples = load_examples(args)
    served = args.backend == "vllm"
    models = load_served_models(args) if served else load_models(args)
    prompts, problems = prompts_for(examples, models.tokenizer)
    settings = build_settings(args)
    todo = [(s, i) for s in settings for i, e in enumerate(examples) if (s.key, e.id) not in store.done]
    bar = tqdm(total=len(todo), desc="rsd-bench", unit="question", disable=None)
    for setting in settings:
        idx = [i for s, i in todo if s == setting]
        if served:  # every problem on its own; each record saved as its problem finishes
            bar.set_postfix_str(setting.name)

            def save(j: int, res: dict, wall: float, setting=setting, idx=idx) -> None:
                store.add([_record(examples[idx[j]], setting, res, wall)])
                bar.update(1)

            run_served(models, setting, [prompts[i] for i in idx], [problems[i] for i in idx],
                       [examples[i].id for i in idx], args.seed, args.concurrency, save)  # fmt: skip
        else:  # batches of prompts through the in-process methods
            size = args.batch_size * (args.queue if setting.method == "rsd" else 1)
            for k in range(0, len(idx), size):
                chunk = idx[k : k + size]
                bar.set_postfix_str(setting.name)
                batch = Batch(
                    prompts=[prompts[i] for i in chunk],
                    problems=[problems[i] for i in chunk],
                    seed=seed_for(setting, examples[chunk[0]].id, args.seed),
                    answer_key=lambda row, text, chunk=chunk: datasets.answer_key(examples[chunk[row]], text),
                )
                _sync()
                t0 = time.perf_counter()
                results = METHODS[setting.method](models, setting, batch)
                _sync()
                wall = (time.perf_counter() - t0) / len(chunk)
                store.add([_record(examples[i], setting, res, wall) for i, res in zip(chunk, results, strict=True)])
                bar.update(len(chunk))
        # after every setting, so a crash keeps it current
        rows = _write_summary(out, store.records, [s.key for s in settings], args)
    bar.close()
    # the PRMs' weights are on their servers: served runs have no step-reward figure
    by_id = {e.id: p for e, p in zip(examples, problems, strict=True)}
    rewards = None if served else step_rewards(models, store.records, by_id)
    if rewards:
        write_json_atomic(out / "step_rewards.json", rewards)
    if not args.no_plots:
        plot(rows, rewards, out / "plots")
    return rows


def _record(example, setting: Setting, res: dict, wall: float) -> dict:
    """One line of records.jsonl."""
    return {
        "id": example.id,
        "level": example.level,
        "dataset": example.dataset,
        "method": setting.method,
        "setting": setting.key,
        "correct": datasets.grade(example, res["response"]),
        "wall_s": wall,
        **res,
    }


# Options that may differ when a run is resumed. A record is keyed by (setting, id) and a setting's key names every
# parameter of its row (method, weighting, δ, RSD's PRM name, N, beam width and expansion), so asking for more, fewer
# or other settings mixes nothing: finished ones are skipped, new ones run. Every other option can change what a
# record holds (the data, the models, their dtype and device kind, decoding, seeds; the batch size too: a sampled
# batch draws from one seeded stream and padding can change greedy numerics), so it must be as the run began.
RESUME_MAY_CHANGE = frozenset(
    {"output", "resume", "force", "no_plots", "report_only", "preset"}
    | {"methods", "deltas", "weightings", "budgets", "rsd_prms", "n", "beams", "beam_expand"}
    | {"draft_url", "target_url", "prm_url", "concurrency"}  # where the servers are, not what they serve
)
# compared as resolved, not as spelled (`--dtype auto` and `float32` on a CPU are the same run): resolved key -> option
RESOLVED = {"device": "device_map", "torch_dtype": "dtype"}


def _check_resume(path: Path, config: dict, resume: bool) -> None:
    """A resumed run must use the options it started with (see `RESUME_MAY_CHANGE`); SystemExit naming each option
    that differs, with its old and new value."""
    if not resume:
        return
    records = path.with_name("records.jsonl")
    if not path.exists():
        if records.exists() and records.stat().st_size:
            raise SystemExit(
                f"error: --resume: {records} has results but {path.name} (the options they were made with) is missing, "
                "so they cannot be checked against this run; use another --output (or --force to discard them)"
            )
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(config))  # as run.json will hold it (tuples as lists, paths as text)
    free = set(RESUME_MAY_CHANGE)
    for resolved, option in RESOLVED.items():
        free.add(option if resolved in old else resolved)  # a run.json of an older rsd-bench has no resolved keys
    diff = [k for k in sorted(old.keys() | new.keys()) if k not in free and old.get(k) != new.get(k)]
    if diff:
        lines = [f"  {_option_name(k)}: was {old.get(k)!r}, now {new.get(k)!r}" for k in diff]
        raise SystemExit(
            f"error: --resume with options that differ from the run in {path}:\n" + "\n".join(lines) + "\n"
            "rerun with that run's options, or use another --output (or --force to discard its results)"
        )


def _option_name(key: str) -> str:
    """The command-line spelling of a run.json key."""
    if key in RESOLVED:
        return f"--{RESOLVED[key].replace('_', '-')} (as resolved: {key})"
    return f"--{key.replace('_', '-')}"


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def _write_summary(out: Path, records: list[dict], order: list[str], args) -> list[dict]:
    """summary.json and table.md from every record so far (atomic), rows in the order of the setting keys `order`."""
    rows = summarize(records, order)
    ran_here = not args.report_only
    write_json_atomic(
        out / "summary.json",
        {
            "rows": rows,
            "device": _device_name() if ran_here else "(rebuilt by --report-only: see the summaries of the runs)",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__} if ran_here else None,
            "command": "rsd-bench " + " ".join(sys.argv[1:]),
        },
    )
    tmp = out / ".table.md.tmp"
    tmp.write_text(markdown(rows))
    tmp.replace(out / "table.md")
    return rows


def step_rewards(models: Models, records: list[dict], problems: dict[str, str], limit: int = 200) -> dict | None:
    """PRM rewards of every step of the draft-only and target-only responses (Fig. 3), scored by the first `--prm`,
    for up to `limit` questions each."""
    if not models.prms:
        return None
    prm = next(iter(models.prms.values()))
    out = {}
    for method in ("draft", "target"):
        recs = [r for r in records if r["setting"] == f"{method}|{method}"][:limit]
        rows = [(problems[r["id"]], split(r["response"], models.separator)) for r in recs]
        items = [(p, steps[:k], steps[k]) for p, steps in rows for k in range(len(steps))]
        values = []
        for k in range(0, len(items), 64):
            chunk = items[k : k + 64]
            values += prm.score_last(*map(list, zip(*chunk, strict=True))).tolist()
        if values:
            out[method] = values
    return out or None


def report_only(args: argparse.Namespace) -> list[dict]:
    """Summary, table and plots from the records on disk, rows in the order the options give."""
    store = RecordStore(args.output / "records.jsonl", resume=True)
    if not store.records:
        raise SystemExit(f"error: no records in {args.output / 'records.jsonl'}")
    order = [s.key for s in build_settings(args)]
    order += [k for k in dict.fromkeys(r["setting"] for r in store.records) if k not in order]
    rows = _write_summary(args.output, store.records, order, args)
    if not args.no_plots:
        rewards_file = args.output / "step_rewards.json"
        rewards = json.loads(rewards_file.read_text()) if rewards_file.exists() else None
        plot(rows, rewards, args.output / "plots")
    return rows


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """While the block runs, transformers shows no progress bars (a "Loading weights" bar per model) and logs errors
    only (its notices are about its own internals, e.g. assisted generation passing generation_config with
    max_new_tokens); the benchmark's own bar and table are the output. Download bars of the hub stay on: a first
    download of a real checkpoint takes minutes (cached files show none). Restored afterwards."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars = not hf_hub_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' switch turns the hub's bars off too
    if hub_bars:
        hf_hub_utils.enable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # the hub's too
        if not hub_bars:
            hf_hub_utils.disable_progress_bars()


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.report_only and not (args.output / "records.jsonl").is_file():
        raise SystemExit(f"error: no records in {args.output / 'records.jsonl'}")
    with output_lock(args.output), quiet_transformers():  # one run per output folder: two write every record twice
        rows = report_only(args) if args.report_only else run(args)
    print(markdown(rows))
    rewards = ", step_rewards.json" if (args.output / "step_rewards.json").exists() else ""
    files = f"records.jsonl, summary.json, table.md{rewards}" + ("" if args.no_plots else ", plots/")
    print(f"results in {args.output}/ ({files})")
    return rows


def entry() -> int:
    """The `rsd-bench` console script."""
    main()
    return 0


if __name__ == "__main__":
    main()
