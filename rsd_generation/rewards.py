"""Reward models as text-in adapters that score the newest reasoning step of each row, incrementally.

Each adapter owns its tokenizer and a `RowCache`: the problem prefix is processed once, every step once, and a
rejected draft step is masked out of the PRM's cache (its replacement is fed with the next scoring call).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers import logging as hf_logging
from transformers.utils import cached_file

from .fast import row_cache
from .kv import RowCache
from .paths import check_checkpoint_path

VALUE_HEAD_FILE = "value_head.safetensors"  # a merged checkpoint's PRM head, outside the index
PRM_FORMAT_FILE = "rsd_prm_format.json"  # a value-head PRM's input format: {"step_token": str, "strip_steps": bool}
REFERENCE_STEP_TOKEN = "\n\n"  # the RSD reference's PRM input: each step unstripped, then the token of "\n\n"
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
_SENTINEL = "\x00RSD-STEPS\x00"


class RewardModel:
    """Base adapter: a backbone returning hidden states, a head mapping one hidden state to one reward.

    Subclasses give the input format (`prefix_ids`, `step_ids`, `suffix_ids`) and the head (`reward`).
    Protocol used by the RSD loop: `start(problems)`, then per step `score(steps)` (rows may sit one out) and
    `decide(accepted)`, `replace(row, step)` once a rejected step's replacement is written (`resolve` does both),
    and `keep(idx)` when rows finish.

    Args:
        backbone (`PreTrainedModel`): a base model (no LM head) whose output has `last_hidden_state`.
        head (`nn.Module`): maps `(R, H)` hidden states to the head's raw output.
        tokenizer: the reward model's own tokenizer.
    """

    kind = "reward_model"

    def __init__(self, backbone: PreTrainedModel, head: nn.Module, tokenizer):
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.num_parameters = sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in head.parameters())
        self.state: RowCache | None = None
        self.calls = 0
        self._start: torch.Tensor | None = None  # first provisional column per row
        self._step_len: torch.Tensor | None = None
        self._scored: torch.Tensor | None = None

    # -- input format -------------------------------------------------------------------------------------------
    def prefix_ids(self, problem: str) -> list[int]:
        """Tokens that precede the first step (the problem)."""
        raise NotImplementedError

    def step_ids(self, step: str) -> list[int]:
        """Tokens of one step as it stays in the context, ending at the position that is scored."""
        raise NotImplementedError

    def suffix_ids(self) -> list[int]:
        """Tokens appended only while scoring and dropped afterwards (outcome RMs' end of turn)."""
        return []

    def reward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map hidden states `(R, H)` at the scored positions to rewards `(R,)`."""
        raise NotImplementedError

    # -- incremental protocol -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the backbone's inputs."""
        return self.backbone.get_input_embeddings().weight.device

    @property
    def forward_tokens(self) -> int:
        """Token positions processed since `start`."""
        return self.state.forward_tokens if self.state is not None else 0

    @property
    def row_tokens(self) -> list[int]:
        """Token positions processed since `start`, per row of the batch `start` was given."""
        return self.state.row_tokens.tolist() if self.state is not None else []

    def start(self, problems: Sequence[str], fast_path: str = "off", capacity: int = 512) -> None:
        """Begin scoring one solution per problem; the prefixes are fed with the first `score` call.

        `fast_path` (a mode from `fast.fast_mode`) picks the cache; `capacity` is the room a static cache starts
        with beyond the longest prefix (it grows if needed).
        """
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        prefixes = [self.prefix_ids(p) for p in problems]
        room = max(map(len, prefixes), default=0) + capacity
        self.state = row_cache(self.backbone, "reward", len(problems), pad, fast_path, room, hidden=True)
        self.state.pending = prefixes
        self.calls = 0

    @torch.no_grad()
    def score(self, steps: Sequence[str | None]) -> torch.Tensor:
        """Score the newest step of every row given one, in one forward with any catch-up those rows still owe.

        Args:
            steps (`list` of length R): the candidate step of each row, as generated, or None for a row that is
                not scored now (nothing of it is fed; its queue waits).
        Returns:
            `torch.FloatTensor` of shape `(R,)` on the CPU (NaN for rows not scored).
        """
        st = self.state
        assert st is not None and len(steps) == len(st.pending), "call start() with one problem per row first"
        scored = [s is not None for s in steps]
        new = [self.step_ids(s) if s is not None else [] for s in steps]
        suffix = self.suffix_ids()
        self._start = torch.tensor([st.length + len(p) for p in st.pending])  # _start: [R]
        self._step_len = torch.tensor([len(n) for n in new])  # _step_len: [R]
        self._scored = torch.tensor(scored)  # _scored: [R]
        st.pending = [p + n + suffix if ok else p for p, n, ok in zip(st.pending, new, scored, strict=True)]
        hidden = st.feed_pending(self._scored)  # hidden: [R, H]
        self.calls += sum(scored)
        r = self.reward(hidden).float().cpu()  # r: [R]
        return torch.where(self._scored, r, float("nan"))

    def decide(self, accepted: torch.Tensor) -> None:
        """After `score`: keep the accepted steps in the context, mask the rejected ones (rows not scored keep all)."""
        st = self.state
        assert self._start is not None and self._step_len is not None, "decide() follows score()"
        keep_to = torch.where(accepted.cpu(), self._start + self._step_len, self._start)  # keep_to: [R]
        st.drop_from(self._scored, keep_to)
        self._start = self._step_len = self._scored = None

    def replace(self, row: int, step: str) -> None:
        """Queue the step that replaced row `row`'s rejected one (fed with the row's next `score`)."""
        self.state.pending[row] += self.step_ids(step)

    def resolve(self, accepted: torch.Tensor, replacements: Sequence[str | None]) -> None:
        """`decide`, then `replace` each rejected step by its replacement."""
        self.decide(accepted)
        for i, ok in enumerate(accepted.tolist()):
            if not ok:
                assert replacements[i] is not None, "a rejected step needs its replacement"
                self.replace(i, replacements[i])

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only rows `idx`."""
        self.state.keep(idx)

    def add(self, rows: torch.Tensor, problems: Sequence[str]) -> None:
        """New rows join (original rows `rows`), each scoring a solution of its problem from the first step."""
        self.state.add(rows, [self.prefix_ids(p) for p in problems])

    @torch.no_grad()
    def score_steps(self, problem: str, steps: Sequence[str]) -> list[float]:
        """Rewards of every step of one complete solution (each step scored given the ones before it)."""
        self.start([problem])
        rewards = []
        for s in steps:
            rewards.append(float(self.score([s])[0]))
            self.resolve(torch.tensor([True]), [None])
        return rewards

    @torch.no_grad()
    def score_last(
        self, problems: Sequence[str], histories: Sequence[Sequence[str]], steps: Sequence[str]
    ) -> torch.Tensor:
        """Reward of `steps[i]` after the steps `histories[i]` of `problems[i]`, for every row in one forward.

        For search over candidate steps (best-of-N, beam search), where solutions branch and no cache is kept.
        Returns `torch.FloatTensor` of shape `(R,)` on the CPU; the same as the last of `score_steps`.
        """
        self.start(problems)
        for pending, history in zip(self.state.pending, histories, strict=True):
            for h in history:
                pending += self.step_ids(h)
        return self.score(steps)

    def _encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _chat_prefix_suffix(self, messages: list[dict]) -> tuple[str, str]:
        """Split a chat template's rendering around the assistant content."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.kind} reward model needs a tokenizer with a chat template; this one has none")
        text = self.tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
        prefix, _, suffix = text.partition(_SENTINEL)
        return prefix, suffix


class ValueHeadPRM(RewardModel):
    """Skywork-o1-Open-PRM layout: Qwen2 backbone + `v_head.summary` Linear(H, 1); reward = sigmoid at step tokens.

    Input: `bos + problem + "\\n"`, then each step tokenized on its own followed by the step token. Two formats:
    the RSD reference's (the default, on which the paper tuned its thresholds): the step as generated, its trailing
    step token removed, then the token of `"\\n\\n"`; Skywork's README (`step_token="\\n"`): the stripped step, then
    the token of `"\\n"`.

    Args:
        step_token (`str`): the text whose last token follows each step; the reward is read there.
        strip_steps (`bool`, *optional*): strip each step's whitespace first; default: only for `step_token="\\n"`.
    """

    kind = "value_head"

    def __init__(self, backbone: PreTrainedModel, head: nn.Module, tokenizer, step_token: str = REFERENCE_STEP_TOKEN,
                 strip_steps: bool | None = None):  # fmt: skip
        super().__init__(backbone, head, tokenizer)
        if not isinstance(step_token, str) or not step_token:
            raise ValueError(f"step_token must be a non-empty string, got {step_token!r}")
        ids = self._encode(step_token)
        if not ids:
            raise ValueError(f"the PRM's tokenizer encodes its step token {step_token!r} to no token")
        self.step_token = step_token
        self.step_token_id = ids[-1]
        self.strip_steps = step_token == "\n" if strip_steps is None else bool(strip_steps)

    def prefix_ids(self, problem: str) -> list[int]:
        """`bos + problem + "\\n"`."""
        return self._encode((self.tokenizer.bos_token or "") + problem + "\n")

    def step_ids(self, step: str) -> list[int]:
        """The step's tokens (stripped, or without its trailing step token), then the step token."""
        if self.strip_steps:
            text = step.strip()
        else:  # as the reference splits a response at the step token
            text = step[: -len(self.step_token)] if step.endswith(self.step_token) else step
        return [*self._encode(text), self.step_token_id]

    @property
    def input_format(self) -> dict:
        """The input format, as a checkpoint records it (`PRM_FORMAT_FILE`)."""
        return {"step_token": self.step_token, "strip_steps": self.strip_steps}

    def reward(self, hidden: torch.Tensor) -> torch.Tensor:
        """sigmoid(v_head(h))."""
        w = self.head.weight
        return torch.sigmoid(self.head(hidden.to(w.device, w.dtype)).squeeze(-1))


class QwenPRM(RewardModel):
    """Qwen2.5-Math-PRM layout: `<extra_0>` after each step, head Linear(H, H)-ReLU-Linear(H, 2), p(positive)."""

    kind = "qwen_prm"

    def __init__(self, backbone: PreTrainedModel, head: nn.Module, tokenizer, system: str = QWEN_PRM_SYSTEM):
        super().__init__(backbone, head, tokenizer)
        self.system = system
        self.sep_id = tokenizer.convert_tokens_to_ids("<extra_0>")
        if self.sep_id is None or self.sep_id == tokenizer.unk_token_id:
            raise ValueError("qwen_prm reward model needs the '<extra_0>' token in its tokenizer; it is missing")

    def prefix_ids(self, problem: str) -> list[int]:
        """The chat template (system, user = problem) up to the assistant content."""
        prefix, _ = self._chat_prefix_suffix(
            [{"role": "system", "content": self.system}, {"role": "user", "content": problem}]
        )
        return self._encode(prefix)

    def step_ids(self, step: str) -> list[int]:
        """The stripped step's tokens, then `<extra_0>`."""
        return [*self._encode(step.strip()), self.sep_id]

    def reward(self, hidden: torch.Tensor) -> torch.Tensor:
        """softmax(score(h))[..., 1]."""
        w = self.head[0].weight
        return torch.softmax(self.head(hidden.to(w.device, w.dtype)).float(), -1)[..., 1]


class SequenceClassificationRM(RewardModel):
    """Outcome reward model (`*ForSequenceClassification`, one label): the raw score of the response so far.

    Input: the chat template with the problem as the user turn and the steps so far as the assistant turn; the
    end-of-turn tokens are appended only while scoring.
    """

    kind = "sequence_classification"

    def __init__(self, backbone: PreTrainedModel, head: nn.Module, tokenizer):
        super().__init__(backbone, head, tokenizer)
        self._suffix: list[int] | None = None

    def prefix_ids(self, problem: str) -> list[int]:
        """The chat template up to the assistant content."""
        prefix, suffix = self._chat_prefix_suffix([{"role": "user", "content": problem}])
        self._suffix = self._encode(suffix)
        return self._encode(prefix)

    def step_ids(self, step: str) -> list[int]:
        """The step's tokens as generated (the concatenated steps are the response)."""
        return self._encode(step)

    def suffix_ids(self) -> list[int]:
        """The end-of-turn tokens after the assistant content."""
        return list(self._suffix or [])

    def reward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The score head's first (only) output."""
        w = self.head.weight
        return self.head(hidden.to(w.device, w.dtype))[..., 0]


KINDS: dict[str, type[RewardModel]] = {
    ValueHeadPRM.kind: ValueHeadPRM,
    QwenPRM.kind: QwenPRM,
    SequenceClassificationRM.kind: SequenceClassificationRM,
}


def detect_kind(architectures: Iterable[str], tensor_names: Iterable[str]) -> str | None:
    """The reward model kind of a checkpoint from its config's architectures and its tensor names, or None."""
    archs = list(architectures or [])
    names = set(tensor_names)
    if any(n.startswith("v_head.") for n in names) or any(a.endswith("PrmModel") for a in archs):
        return ValueHeadPRM.kind
    if any(a.endswith("ProcessRewardModel") for a in archs) or {"score.0.weight", "score.2.weight"} <= names:
        return QwenPRM.kind
    if any(a.endswith("ForSequenceClassification") for a in archs) or "score.weight" in names:
        return SequenceClassificationRM.kind
    return None


def checkpoint_tensor_files(path: str | os.PathLike) -> dict[str, str]:
    """Map each tensor name of a safetensors checkpoint (local dir or hub id) to the file that holds it.

    Besides the weights (model.safetensors or its index), a merged policy+PRM checkpoint carries its value head
    in `value_head.safetensors`, which the index does not list so that the policy loads without it.
    """
    path = str(path)
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {name: cached_file(path, fname) for name, fname in weight_map.items()}
    else:
        single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
        if single is None:
            raise ValueError(f"no safetensors weights (model.safetensors or its index) found in {path!r}")
        files = dict.fromkeys(tensor_names(single), single)
    extra = cached_file(path, VALUE_HEAD_FILE, _raise_exceptions_for_missing_entries=False)
    if extra is not None:
        files.update(dict.fromkeys(tensor_names(extra), extra))
    return files


def tensor_names(fname: str) -> list[str]:
    """Tensor names of one safetensors file."""
    with safe_open(fname, framework="pt") as f:
        return list(f.keys())


def read_tensors(files: dict[str, str], prefix: str) -> dict[str, torch.Tensor]:
    """Read every tensor whose name starts with `prefix`, with the prefix removed from its name."""
    out = {}
    for name, fname in files.items():
        if name.startswith(prefix):
            with safe_open(fname, framework="pt") as f:
                out[name[len(prefix) :]] = f.get_tensor(name)
    return out


def _head_from(tensors: dict[str, torch.Tensor], hidden_size: int, layout: str, source: str) -> nn.Module:
    """Build a reward head (`"linear"` or `"mlp"`) from its tensors, checking shapes against the backbone."""
    if layout == "linear":
        if "weight" not in tensors:
            raise ValueError(f"{source}: head weight is missing")
        w = tensors["weight"]
        head = nn.Linear(w.shape[1], w.shape[0], bias="bias" in tensors)
    else:
        for name in ("0.weight", "2.weight"):
            if name not in tensors:
                raise ValueError(f"{source}: head tensor {name!r} is missing")
        w0, w2 = tensors["0.weight"], tensors["2.weight"]
        head = nn.Sequential(
            nn.Linear(w0.shape[1], w0.shape[0], bias="0.bias" in tensors),
            nn.ReLU(),
            nn.Linear(w2.shape[1], w2.shape[0], bias="2.bias" in tensors),
        )
    if head.state_dict().keys() != tensors.keys():
        raise ValueError(f"{source}: unexpected head tensors {sorted(tensors)}")
    in_features = next(iter(head.parameters())).shape[1]
    if in_features != hidden_size:
        raise ValueError(f"{source}: head expects hidden size {in_features}, backbone has {hidden_size}")
    head.load_state_dict(tensors)
    return head


@contextmanager
def _quiet_loading():
    """Silence transformers' load report (the PRM checkpoint's head and lm_head are read separately)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _base(model: PreTrainedModel) -> PreTrainedModel:
    """The bare backbone of a model with a head (itself if it has none)."""
    return model.base_model if isinstance(model, PreTrainedModel) else model


def _place(head: nn.Module, backbone: PreTrainedModel) -> nn.Module:
    """Put the head where the backbone's last parameters are, in their dtype."""
    last = list(backbone.parameters())[-1]
    return head.to(device=last.device, dtype=last.dtype).eval()


def load_reward_model(
    path_or_model: str | os.PathLike | PreTrainedModel,
    kind: str = "auto",
    tokenizer=None,
    backbone: PreTrainedModel | None = None,
    step_token: str | None = None,
    strip_steps: bool | None = None,
    **from_pretrained_kwargs,
) -> RewardModel:
    """Load a reward model as an RSD adapter.

    Args:
        path_or_model (`str`, `os.PathLike` or `PreTrainedModel`): a checkpoint (local dir or hub id), or an
            already loaded `*ForSequenceClassification` model.
        kind (`str`): `"auto"` (detect from config.json and tensor names), `"value_head"`, `"qwen_prm"` or
            `"sequence_classification"`.
        tokenizer: the reward model's tokenizer; default: loaded from the checkpoint.
        backbone (`PreTrainedModel`, *optional*): an already loaded model whose backbone the PRM shares (a merged
            policy+PRM checkpoint); only the head is read from `path_or_model`.
        step_token (`str`, *optional*), strip_steps (`bool`, *optional*): a value-head PRM's input format (see
            `ValueHeadPRM`). Default: the format the checkpoint records in `rsd_prm_format.json`, else the RSD
            reference's (`"\\n\\n"`, steps unstripped); `step_token="\\n"` gives Skywork's README format.
        from_pretrained_kwargs: passed to `from_pretrained` (`dtype`, `device_map`, ...).
    Returns:
        `RewardModel`.
    """
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"unknown reward model kind {kind!r}; allowed: auto, {', '.join(KINDS)}")
    if isinstance(path_or_model, PreTrainedModel):
        return _from_loaded(path_or_model, kind, tokenizer)
    check_checkpoint_path(path_or_model, "reward model")
    path = str(path_or_model)
    from_pretrained_kwargs.setdefault("trust_remote_code", False)  # never execute code from a checkpoint
    kind, files = checkpoint_kind(path, kind)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if kind != ValueHeadPRM.kind and (step_token is not None or strip_steps is not None):
        raise ValueError(
            f"step_token and strip_steps set a value_head PRM's input format; {path!r} is a {kind} reward model"
        )
    if kind == SequenceClassificationRM.kind:
        if backbone is not None:
            raise ValueError("backbone= is only supported for value_head and qwen_prm reward models")
        model = AutoModelForSequenceClassification.from_pretrained(path, **from_pretrained_kwargs).eval()
        return SequenceClassificationRM(_base(model), model.score, tokenizer)
    if backbone is None:
        with _quiet_loading():
            backbone = AutoModel.from_pretrained(path, **from_pretrained_kwargs).eval()
    backbone = _base(backbone)
    hidden_size = backbone.config.get_text_config().hidden_size
    if kind == ValueHeadPRM.kind:
        head = _head_from(read_tensors(files, "v_head.summary."), hidden_size, "linear", f"{path} v_head.summary")
        if step_token is None:
            recorded = read_prm_format(path) or {"step_token": REFERENCE_STEP_TOKEN, "strip_steps": False}
            step_token = recorded["step_token"]
            strip_steps = recorded["strip_steps"] if strip_steps is None else strip_steps
        return ValueHeadPRM(backbone, _place(head, backbone), tokenizer, step_token, strip_steps)
    head = _head_from(read_tensors(files, "score."), hidden_size, "mlp", f"{path} score")
    return QwenPRM(backbone, _place(head, backbone), tokenizer)


def checkpoint_kind(path: str, kind: str = "auto") -> tuple[str, dict[str, str]]:
    """A reward model checkpoint's kind (`kind` itself unless "auto": detected from its config's architectures and
    its tensor names) and its tensor files (`checkpoint_tensor_files`)."""
    config_file = cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False)
    if config_file is None:
        raise ValueError(f"{path!r} has no config.json: not a transformers checkpoint")
    archs = json.loads(Path(config_file).read_text()).get("architectures") or []
    files = checkpoint_tensor_files(path)
    if kind == "auto":
        kind = detect_kind(archs, files)
        if kind is None:
            raise ValueError(
                f"cannot detect the reward model kind of {path!r}: architectures {archs} and no v_head.* or score.* "
                f"tensors; pass kind= one of {', '.join(KINDS)}"
            )
    return kind, files


def load_reward_format(path: str | os.PathLike, kind: str = "auto", tokenizer=None, step_token: str | None = None,
                       strip_steps: bool | None = None) -> RewardModel:  # fmt: skip
    """A process reward model's input format and parameter count without its weights: the adapter
    `load_reward_model` gives, over a backbone on the meta device (no weight is read but the small head's). For
    clients of a PRM served elsewhere (`rsd_generation.serving`): `prefix_ids`, `step_ids` and `num_parameters`
    work; scoring does not. Value-head and Qwen PRM layouts only (arguments as `load_reward_model`)."""
    check_checkpoint_path(path, "reward model")
    kind, _ = checkpoint_kind(str(path), kind)
    if kind == SequenceClassificationRM.kind:
        raise ValueError(f"{str(path)!r}: only value_head and qwen_prm reward models have a served input format")
    with torch.device("meta"):
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(str(path)))
    return load_reward_model(path, kind, tokenizer, backbone=backbone, step_token=step_token, strip_steps=strip_steps)


def read_prm_format(path: str | os.PathLike) -> dict | None:
    """The input format a value-head PRM checkpoint records (`PRM_FORMAT_FILE`), or None when it records none."""
    fname = cached_file(str(path), PRM_FORMAT_FILE, _raise_exceptions_for_missing_entries=False)
    if fname is None:
        return None
    try:
        fmt = json.loads(Path(fname).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{fname}: not JSON ({e})") from e
    ok = (
        isinstance(fmt, dict)
        and isinstance(fmt.get("step_token"), str)
        and fmt["step_token"]
        and isinstance(fmt.get("strip_steps"), bool)
    )
    if not ok:
        raise ValueError(f'{fname} must hold {{"step_token": <non-empty string>, "strip_steps": <bool>}}, got {fmt!r}')
    return {"step_token": fmt["step_token"], "strip_steps": fmt["strip_steps"]}


def write_prm_format(path: str | os.PathLike, step_token: str, strip_steps: bool) -> None:
    """Record a value-head PRM checkpoint's input format beside its weights."""
    text = json.dumps({"step_token": step_token, "strip_steps": strip_steps}, indent=2) + "\n"
    (Path(path) / PRM_FORMAT_FILE).write_text(text)


def _from_loaded(model: PreTrainedModel, kind: str, tokenizer) -> RewardModel:
    """Adapter around an already loaded sequence-classification model."""
    if kind not in ("auto", SequenceClassificationRM.kind) or not hasattr(model, "score"):
        raise ValueError(
            f"a loaded {type(model).__name__} can only serve as a sequence_classification reward model; load "
            "value_head and qwen_prm reward models from their checkpoint path"
        )
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    return SequenceClassificationRM(_base(model), model.score, tokenizer)
