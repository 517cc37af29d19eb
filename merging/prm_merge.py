"""Linear merge of a policy and a value-head PRM that share a backbone (paper §4, §B.3, Table 4).

Shared tensors become `policy_weight·policy + prm_weight·prm` (mergekit's `linear` method, shard by shard).
The policy's output head (`lm_head`, or its tied input embedding) is kept bit for bit, and the PRM's value head
(`v_head.summary.*`) is copied into `value_head.safetensors`, a file the checkpoint's index does not list: loaded
with `AutoModelForCausalLM` the output is a plain policy, loaded with `rsd.load_reward_model` it is a PRM.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.utils import cached_file

from rsd_generation.paths import check_checkpoint_path, overlaps, replace_dir
from rsd_generation.rewards import (
    VALUE_HEAD_FILE,
    checkpoint_tensor_files,
    read_prm_format,
    tensor_names,
    write_prm_format,
)

LM_HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
# files carried over from the policy as they are (those that exist)
POLICY_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


class MergeError(ValueError):
    """Inputs that cannot be merged; raised before anything is written."""


def check_weights(policy_weight: float, prm_weight: float, normalize: bool = True) -> None:
    """Weights must be finite; unless `normalize` is off, also non-negative and summing to 1."""
    for name, w in (("policy_weight", policy_weight), ("prm_weight", prm_weight)):
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise MergeError(f"{name} must be a finite number, got {w!r}")
    if not normalize:
        return
    if policy_weight < 0 or prm_weight < 0:
        raise MergeError(
            f"weights must be >= 0, got policy {policy_weight} and prm {prm_weight} (pass --no-normalize to allow)"
        )
    if not math.isclose(policy_weight + prm_weight, 1.0, abs_tol=1e-6):
        raise MergeError(
            f"weights must sum to 1, got policy {policy_weight} + prm {prm_weight} = {policy_weight + prm_weight} "
            "(pass --no-normalize to use them as given)"
        )


def tensor_shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Shapes of a checkpoint's tensors, read from the safetensors headers (no tensor is loaded)."""
    shapes = {}
    for fname in sorted(set(files.values())):
        with safe_open(fname, framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in tensor_names(fname)})
    return shapes


def first_backbone_mismatch(policy: dict[str, tuple], prm: dict[str, tuple]) -> str | None:
    """The first backbone tensor (heads aside) that one model lacks or whose shape differs, described; or None."""
    heads = (LM_HEAD, "v_head.")
    for name in sorted(set(policy) | set(prm)):
        if name.startswith(heads):
            continue
        a, b = policy.get(name), prm.get(name)
        if a != b:
            return f"{name}: policy {a or 'missing'}, prm {b or 'missing'}"
    return None


def _config(path: str) -> dict:
    """A checkpoint's config.json."""
    f = cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False)
    if f is None:
        raise MergeError(f"{path!r} has no config.json: not a transformers checkpoint")
    cfg = json.loads(Path(f).read_text())
    if not cfg.get("architectures"):
        raise MergeError(f"config.json of {path!r} names no architectures; mergekit needs one")
    return cfg


def _mergekit_config(policy: str, prm: str, policy_weight: float, prm_weight: float, normalize: bool, dtype: str):
    """mergekit's configuration: a linear merge whose lm_head weights keep the policy's head."""
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "models": [
                {
                    "model": policy,
                    "parameters": {"weight": [{"filter": "lm_head", "value": 1.0}, {"value": policy_weight}]},
                },
                {"model": prm, "parameters": {"weight": [{"filter": "lm_head", "value": 0.0}, {"value": prm_weight}]}},
            ],
            "parameters": {"normalize": normalize},
            "dtype": "float32",
            "out_dtype": dtype,
        }
    )


def _index(out: Path) -> dict[str, str]:
    """The output's weight map (tensor name -> file name), for a single file or an index."""
    index = out / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    return dict.fromkeys(tensor_names(str(out / "model.safetensors")), "model.safetensors")


def _keep_policy_head(out: Path, policy_head: torch.Tensor) -> None:
    """Make the output's lm_head the policy's own, bit for bit."""
    weight_map = _index(out)
    shard = weight_map.get(LM_HEAD) or weight_map[EMBED]
    tensors = load_file(out / shard)  # one shard: the merge writes small ones
    head = policy_head.to(tensors.get(EMBED, next(iter(tensors.values()))).dtype).contiguous()
    if LM_HEAD not in tensors or not torch.equal(tensors[LM_HEAD], head):
        tensors[LM_HEAD] = head
        save_file(tensors, out / shard, metadata={"format": "pt"})
        index = out / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            data["weight_map"][LM_HEAD] = shard
            index.write_text(json.dumps(data, indent=2))


def _read(files: dict[str, str], name: str) -> torch.Tensor:
    """One tensor of a checkpoint."""
    with safe_open(files[name], framework="pt") as f:
        return f.get_tensor(name)


def _copy_policy_files(policy: str, out: Path) -> None:
    """Carry the policy's tokenizer files and generation config over as they are."""
    for name in POLICY_FILES:
        src = cached_file(policy, name, _raise_exceptions_for_missing_entries=False)
        if src is not None:
            shutil.copyfile(src, out / name)


def merge_prm_with_policy(
    policy: str | os.PathLike,
    prm: str | os.PathLike,
    output_dir: str | os.PathLike,
    policy_weight: float = 0.6,
    prm_weight: float = 0.4,
    dtype: str | None = None,
    force: bool = False,
    normalize: bool = True,
) -> Path:
    """Merge a value-head PRM into a policy that shares its backbone; returns the output directory.

    Args:
        policy (`str` or `os.PathLike`): the policy checkpoint (local dir or hub id); its lm_head, config,
            generation config and tokenizer are kept.
        prm (`str` or `os.PathLike`): the PRM checkpoint in Skywork's layout (`v_head.summary.*` tensors).
        output_dir (`str` or `os.PathLike`): where the merged checkpoint goes; refused if it exists, unless `force`.
        policy_weight, prm_weight (`float`): linear weights of the shared tensors (paper: 0.6 / 0.4).
        dtype (`str`, *optional*): output dtype (`"bfloat16"`, `"float16"`, `"float32"`); default: the policy's.
        force (`bool`): replace an existing `output_dir`.
        normalize (`bool`): refuse weights that are negative or do not sum to 1 (off: use them as given).
    Returns:
        `Path` of the merged checkpoint.
    Raises:
        `MergeError` (a `ValueError`) before anything is written: bad weights, no value head, backbones that
        differ (naming the first tensor), an existing output without `force`.
    """
    for what, path in (("policy", policy), ("prm", prm)):
        try:
            check_checkpoint_path(path, what)
        except ValueError as e:
            raise MergeError(str(e)) from None
    policy, prm, out = str(policy), str(prm), Path(output_dir).expanduser()
    check_weights(policy_weight, prm_weight, normalize)
    try:
        import mergekit  # noqa: F401  (an extra: the generation mode does not need it)
    except ImportError:
        raise MergeError("merging needs mergekit: pip install 'rsd-generation[merge]'") from None
    if dtype not in (None, "bfloat16", "float16", "float32"):
        raise MergeError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    policy_cfg = _config(policy)
    _config(prm)
    policy_files, prm_files = checkpoint_tensor_files(policy), checkpoint_tensor_files(prm)
    _check_output(out, force, {"policy": policy_files, "prm": prm_files})
    head_names = [n for n in prm_files if n.startswith("v_head.")]
    if not head_names:
        raise MergeError(f"{prm!r} has no value head (no v_head.* tensors): not a value-head PRM")
    mismatch = first_backbone_mismatch(tensor_shapes(policy_files), tensor_shapes(prm_files))
    if mismatch is not None:
        raise MergeError(f"policy and PRM backbones differ, first at {mismatch}")
    policy_tied = LM_HEAD not in policy_files
    if policy_tied and EMBED not in policy_files:
        raise MergeError(f"{policy!r} has neither {LM_HEAD} nor {EMBED}: unsupported layout")
    dtype = dtype or policy_cfg.get("dtype") or policy_cfg.get("torch_dtype") or "float32"

    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        config = _mergekit_config(policy, prm, policy_weight, prm_weight, normalize, dtype)
        options = MergeOptions(
            allow_crimes=True,  # the PRM's architecture name (e.g. Qwen2ForPrmModel) is not the policy's
            copy_tokenizer=False,
            write_model_card=False,
            out_shard_size=500_000_000,
            quiet=True,
        )
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # mergekit's "No JSON architecture found" is expected here
        try:
            run_merge(config, str(tmp), options)
        finally:
            logging.getLogger().setLevel(level)
        _keep_policy_head(tmp, _read(policy_files, LM_HEAD if not policy_tied else EMBED))
        # the policy's config (mergekit may take the PRM's); a tied policy is untied, its embedding was merged
        cfg = {**policy_cfg, "dtype": dtype, "tie_word_embeddings": False}
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        head = {n: _read(prm_files, n).contiguous() for n in head_names}
        save_file(head, tmp / VALUE_HEAD_FILE, metadata={"format": "pt"})
        _copy_policy_files(policy, tmp)
        fmt = read_prm_format(prm)  # the PRM's input format stays with its head
        if fmt is not None:
            write_prm_format(tmp, fmt["step_token"], fmt["strip_steps"])
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_output(out: Path, force: bool, inputs: dict[str, dict[str, str]]) -> None:
    """Refuse an output that would overwrite or delete an input, or anything that is not an earlier merge."""
    for what, files in inputs.items():
        for folder in sorted({str(Path(f).parent) for f in files.values()}):
            if overlaps(out, folder):
                raise MergeError(
                    f"output {str(out)!r} overlaps the {what} checkpoint at {folder!r} (the same directory, inside "
                    "it, or containing it); a merge never writes over its inputs, with or without --force"
                )
    if not out.exists():
        return
    if not out.is_dir():
        raise MergeError(f"output {str(out)!r} exists and is a file; choose another path")
    if not force:
        raise MergeError(f"output directory {str(out)!r} exists; pass force=True (--force) to replace it")
    if any(out.iterdir()) and not (out / VALUE_HEAD_FILE).is_file():
        raise MergeError(
            f"output directory {str(out)!r} is not an earlier rsd-merge output (it has no {VALUE_HEAD_FILE}); "
            "--force only replaces a merge, never other data: choose another path"
        )
