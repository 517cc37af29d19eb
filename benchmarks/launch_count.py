"""How many device kernels a decoded token launches on the fast path: inside the forward (what a CUDA graph replays)
and outside it (the decoding loop's own work), counted on the CPU under Triton's interpreter. The count does not
depend on the device, so it is measured without a GPU and compared across commits.

A Qwen2 with the 1.5B's head size (128; 2 query heads per KV head, small widths), in float32, with 1 and 2 layers;
the one-token GEMV and every fusion forced, as a GPU that measured them faster chooses them. Batch 1, a 32-token
prompt, then one step of `--tokens` one-token forwards (the draft's loop, `decode_step`, with the step separator).
A launch is a Triton kernel launch or an ATen operation that runs a kernel (views, allocations and host-side
scalars excluded; in float32 the head's cast to float32 is no operation, in bfloat16 a kernel). Per layer: the
2-layer model's count less the 1-layer's; per forward: the rest of the forward.

    TRITON_INTERPRET=1 python -m rsd_generation.benchmarks.launch_count --output FILE
"""

from __future__ import annotations

import argparse
import collections

import torch
from rsd_generation.benchmarks.io import command_line, refuse_overwrite, write_json_atomic
from rsd_generation.benchmarks.speed import QWEN_1_5B, random_model, word_tokenizer
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LogitsProcessorList, StoppingCriteriaList

from rsd_generation import fast, kernels
from rsd_generation.decoding import RowIds, Sampling, StepRules, decode_step, step_separator

# ATen operations that run no kernel: views, allocations, host-side scalars
NO_KERNEL = {"alias", "as_strided", "detach", "expand", "lift_fresh", "permute", "select", "slice", "split", "squeeze",
             "t", "transpose", "unbind", "unsqueeze", "view", "_unsafe_view", "_local_scalar_dense", "scalar_tensor",
             "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}  # fmt: skip
SHAPES = {**QWEN_1_5B, "hidden_size": 256, "intermediate_size": 128, "num_attention_heads": 2,
          "num_key_value_heads": 1, "vocab_size": 256}  # fmt: skip


class Counter(TorchDispatchMode):
    """Counts kernel-running ATen operations and Triton launches, apart inside and outside the forward."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.inside = 0  # depth of StaticRowCache._body calls
        self.triton = 0  # inside a Triton launch (the interpreter runs torch operations of its own)

    def where(self) -> str:
        return "inside" if self.inside else "outside"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.triton and func.__name__.split(".")[0] not in NO_KERNEL:
            self.counts[f"{self.where()} aten"] += 1
        return func(*args, **(kwargs or {}))


def instrument(counter: Counter) -> None:
    """Route every Triton kernel of `kernels` and the fast path's forward through `counter` (once; later calls
    hand the routes to the new counter)."""
    _Launches.counter = counter
    if getattr(fast.StaticRowCache._body, "counted", False):
        return
    for name in dir(kernels):
        jit = getattr(kernels, name)
        if name.startswith("_") and hasattr(jit, "run") and hasattr(jit, "__getitem__"):
            setattr(kernels, name, _Launches(jit))
    body = fast.StaticRowCache._body

    def counted_body(self, *args, **kwargs):
        _Launches.counter.inside += 1
        try:
            return body(self, *args, **kwargs)
        finally:
            _Launches.counter.inside -= 1

    counted_body.counted = True
    fast.StaticRowCache._body = counted_body


class _Launches:
    """A Triton kernel whose launches `kernel[grid](...)` are counted by the current `counter`."""

    counter: Counter

    def __init__(self, jit):
        self.jit = jit

    def __call__(self, *args, **kwargs):  # a helper called from another kernel (the interpreter runs it so)
        return self.jit(*args, **kwargs)

    def __getitem__(self, grid):
        launch, counter = self.jit[grid], _Launches.counter

        def run(*args, **kwargs):
            counter.counts[f"{counter.where()} triton"] += 1
            counter.triton += 1
            try:
                return launch(*args, **kwargs)
            finally:
                counter.triton -= 1

        return run


def count(layers: int, tokens: int) -> dict:
    """Launches of a one-step decode of `tokens` tokens after a prompt, with a `layers`-layer model."""
    model = random_model({**SHAPES, "num_hidden_layers": layers}, 0, "cpu", torch.float32)
    tok = word_tokenizer(SHAPES["vocab_size"])
    s = Sampling(LogitsProcessorList(), False, None, SHAPES["vocab_size"], torch.empty(0, dtype=torch.long), 0)
    rules = StepRules(step_separator(tok, "\n\n"), tokens, StoppingCriteriaList())
    prompt = torch.randint(30, SHAPES["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))
    cache = fast.row_cache(model, f"launch-count-{layers}", 1, 0, "static", 32 + 2 * tokens + 64)
    cache.pending = prompt.tolist()
    rows, budget, ctx = torch.ones(1, dtype=torch.bool), torch.full((1,), 10**6), RowIds(prompt, 0)
    decode_step(cache, ctx, rows, budget, s, rules)  # the prompt, and a first step
    counter = Counter()
    instrument(counter)
    calls = cache.forward_calls
    with counter:
        decode_step(cache, ctx, rows, budget, s, rules)
    forwards = cache.forward_calls - calls
    return {k: v / forwards for k, v in counter.counts.items()} | {"forwards": forwards}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=28, help="layers of the model the per-token total is given for")
    ap.add_argument("--output", default=None)
    ap.add_argument("--force", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    if args.output:
        refuse_overwrite(args.output, args.force)
    if not (kernels.AVAILABLE and kernels.INTERPRET):
        ap.error("needs Triton, and TRITON_INTERPRET=1 in the environment (the kernels then run on the CPU)")
    big = max(kernels.GEMV_CONFIGS)  # the most rows per program: fewest programs to interpret (counts are the same)
    kernels.gemv_choice = lambda x, w, b: big if x.numel() == x.shape[-1] else None
    kernels.fusion_pays = lambda *args, **kwargs: True
    one, two = count(1, args.tokens), count(2, args.tokens)
    keys = ("inside triton", "inside aten", "outside aten", "outside triton")
    per_layer = {k: two.get(k, 0) - one.get(k, 0) for k in keys}
    per_forward = {k: one.get(k, 0) - per_layer[k] for k in keys}
    inside = sum(per_layer[k] for k in keys[:2]) * args.layers + sum(per_forward[k] for k in keys[:2])
    outside = sum(one.get(k, 0) for k in keys[2:])
    result = {
        "what": "kernel launches per one-token forward at batch 1, counted under Triton's interpreter",
        "shapes": SHAPES,
        "versions": {"torch": torch.__version__, "triton": kernels.triton.__version__},
        "per_layer": per_layer,
        "per_forward_outside_the_layers": per_forward,
        "outside_the_forward_per_token": {k: one.get(k, 0) for k in keys[2:]},
        f"per_token_{args.layers}_layers": {"inside": inside, "outside": outside, "total": inside + outside},
        "command": command_line("launch_count", argv),
    }
    print(result, flush=True)
    if args.output:
        write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()
