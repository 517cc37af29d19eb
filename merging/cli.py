"""`rsd-merge`: merge a value-head PRM with a policy that shares its backbone (paper Table 4)."""

from __future__ import annotations

import argparse
import sys

from .prm_merge import MergeError, merge_prm_with_policy

DESCRIPTION = """\
Merge a process reward model (Skywork layout: a causal-LM backbone plus a v_head.summary value head) with a
policy of the same backbone shapes, so that one model serves as both (paper §4, Table 4).

Shared tensors become policy_weight * policy + prm_weight * prm (mergekit's linear merge, shard by shard).
The policy's lm_head is kept bit for bit (a tied policy is untied, since its embedding is merged), the PRM's
value head is kept as it is in value_head.safetensors, and the policy's config, generation config and
tokenizer files are carried over. The output loads as a policy with AutoModelForCausalLM.from_pretrained and
as a PRM with rsd.load_reward_model (add backbone=<the loaded policy> to share one copy of the weights).

Nothing is written when the inputs are refused; the merge is built in a temporary directory next to the
output and renamed into place only when complete."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    ap = argparse.ArgumentParser(
        prog="rsd-merge", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--policy", required=True, help="policy checkpoint: local directory or hub id")
    ap.add_argument("--prm", required=True, help="value-head PRM checkpoint: local directory or hub id")
    ap.add_argument("--output", required=True, help="output directory (must not exist, unless --force)")
    ap.add_argument("--policy-weight", type=float, default=0.6, help="weight of the policy (default 0.6)")
    ap.add_argument("--prm-weight", type=float, default=0.4, help="weight of the PRM (default 0.4)")
    ap.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="output dtype (default: policy's)"
    )
    ap.add_argument("--force", action="store_true", help="replace an existing output directory")
    ap.add_argument(
        "--no-normalize",
        action="store_true",
        help="use the weights as given (by default they must be >= 0 and sum to 1)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the merge; errors go to stderr with exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        out = merge_prm_with_policy(
            args.policy,
            args.prm,
            args.output,
            policy_weight=args.policy_weight,
            prm_weight=args.prm_weight,
            dtype=args.dtype,
            force=args.force,
            normalize=not args.no_normalize,
        )
    except MergeError as e:
        print(f"rsd-merge: error: {e}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
