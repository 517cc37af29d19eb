"""Merge a process reward model with a policy (the paper's Table 4 two-model setup), through mergekit."""

from .prm_merge import MergeError, merge_prm_with_policy

__all__ = ["MergeError", "merge_prm_with_policy"]
