"""Activation statistics of a pre-trained model: per task, per module-input group, token count, sum,
uncentred Gram matrix ``X^T X`` and per-sample token means.

The statistics are what OSRM (all modes), RegMean and the interference diagnostics need. They are
collected once with forward pre-hooks on the target linear modules; modules that read the SAME input
tensor (q/k/v of one attention block, gate/up of a gated MLP) form one *group* whose statistic is
computed once. Groups are detected at hook time: two modules belong to one group when they have the
same parent module and receive the identical input tensor object in consecutive target calls of one
forward pass (q, k, v of an attention block); the grouping must be the same in every batch.

Conventions
-----------
* A token's input vector ``x`` has the module's input dimension ``n``; ``Gram = sum_t x_t x_t^T``
  (``n x n``), ``sum = sum_t x_t``, ``count`` = number of tokens.
* Padding is excluded by default (attention mask); ``include_padding=True`` reproduces the reference
  code, which averages over all positions. With ``pad_to_max_length=True`` every sample is padded to
  ``max_length`` (reference: "padded to 128 tokens").
* ``sample_means[task, group]`` is ``(num_samples, n)``: one token mean per sample, under the same
  padding rule. The ``code`` OSRM mode uses their average over samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from osrm_lora.distributed import DistEnv, all_gather_objects, all_reduce_sum, broadcast_object, get_env, shard
from osrm_lora.errors import ConfigError, OsrmError
from osrm_lora.fsutil import CHECKSUM_FILE, atomic_dir, read_json, verify_checksums, write_checksums, write_json
from osrm_lora.model.keys import key_candidates, linear_targets

logger = logging.getLogger(__name__)

STORE_VERSION = 1
STATS_FILE = "stats.safetensors"
META_FILE = "stats.json"
_SEP = "::"
_HEAD_TOKENS = ("classifier", "score", "pooler", "pre_classifier", "lm_head", "qa_outputs", "lora_")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}

TextsByTask = Mapping[str, Sequence[str] | tuple[Sequence[str], Sequence[str] | None]]

# Settings compared by :meth:`StatsStore.check_matches`.
SETTING_KEYS = (
    "max_length",
    "n_samples",
    "seed",
    "include_padding",
    "pad_to_max_length",
    "dtype",
    "tokenizer",
    "vocab_size",
)


# --------------------------------------------------------------------------------------------------
# model fingerprint and target modules
# --------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_fingerprint(model: nn.Module) -> str:
    """Stable fingerprint of a backbone: hash of its config (task-head fields removed) plus checksums
    of a few non-head weights. Independent of the task head, so all tasks' classifiers built on one
    backbone share it; PEFT-wrapped models are unwrapped and LoRA weights ignored."""
    base = _unwrap(model)
    config = getattr(base, "config", None)
    cfg: dict[str, Any] = {}
    if config is not None:
        cfg = dict(config.to_dict())
        for key in (
            "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
            "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
            "_attn_implementation", "_attn_implementation_autoset", "use_cache", "pad_token_id",
            "output_hidden_states", "output_attentions", "return_dict",
        ):
            cfg.pop(key, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = []
    for name, p in base.named_parameters():
        clean = name.replace(".base_layer", "")
        if any(tok in clean for tok in _HEAD_TOKENS):
            continue
        params.append((clean, p))
    if params:
        picks = sorted({0, len(params) // 3, (2 * len(params)) // 3, len(params) - 1})
        for i in picks:
            name, p = params[i]
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to("cpu", torch.float64).numpy()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(str(p.dtype).encode())
            h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()[:32]


target_linear_modules = linear_targets
"""Alias of :func:`osrm_lora.model.keys.linear_targets`: the ``nn.Linear`` modules that LoRA targets
select by PEFT's rule."""


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------------
@dataclass
class StatsStore:
    """Statistics per (task, group) plus metadata.

    ``tensors`` keys are ``f"{task}::{group}::{kind}"`` with kind in ``count`` (0-d int64), ``sum``
    (n), ``gram`` (n x n) and ``sample_means`` (num_samples x n). ``meta`` records the model
    fingerprint, tokenizer, settings, task names, group members and ``module_to_group``.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    _module_cache: dict[str, str] = field(default_factory=dict, repr=False)

    # ---- metadata --------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.meta["tasks"])

    @property
    def groups(self) -> list[str]:
        return list(self.meta["groups"])

    @property
    def module_to_group(self) -> dict[str, str]:
        return dict(self.meta["module_to_group"])

    @property
    def modules(self) -> list[str]:
        return list(self.meta["module_to_group"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["model_fingerprint"])

    def settings(self) -> dict[str, Any]:
        """The collection settings (see :data:`SETTING_KEYS`)."""
        return {k: self.meta.get(k) for k in SETTING_KEYS}

    def resolve_module(self, key: str) -> str:
        """Map a module key (possibly without or with an extra base-model prefix such as ``bert.``)
        onto a module key of this store (:func:`osrm_lora.model.keys.key_candidates`)."""
        if key in self._module_cache:
            return self._module_cache[key]
        cands = key_candidates(key, self.meta["module_to_group"])
        if len(cands) != 1:
            why = "matches several modules" if cands else "is not in the statistics store"
            raise OsrmError(
                f"module {key!r} {why}; recompute statistics with the adapter's base model and target modules"
            )
        hit = cands[0]
        self._module_cache[key] = hit
        return hit

    def group_of(self, module: str) -> str:
        """The input group of a module key."""
        return str(self.meta["module_to_group"][self.resolve_module(module)])

    def _get(self, task: str, group: str, kind: str) -> torch.Tensor:
        if task not in self.meta["tasks"]:
            raise OsrmError(
                f"task {task!r} is not in the statistics store (has {', '.join(self.meta['tasks'])}); "
                "recompute statistics including it"
            )
        if group not in self.meta["groups"]:
            group = self.group_of(group)
        return self.tensors[f"{task}{_SEP}{group}{_SEP}{kind}"]

    # ---- statistics ------------------------------------------------------------------------------
    def count(self, task: str, group: str) -> int:
        """Number of tokens of ``task`` seen by ``group`` (a group name or a module key)."""
        return int(self._get(task, group, "count").item())

    def sum(self, task: str, group: str) -> torch.Tensor:
        return self._get(task, group, "sum")

    def gram(self, task: str, group: str) -> torch.Tensor:
        return self._get(task, group, "gram")

    def sample_means(self, task: str, group: str) -> torch.Tensor:
        """``(num_samples, n)``: each sample's token mean (padding rule of the store)."""
        return self._get(task, group, "sample_means")

    def token_mean(self, task: str, group: str) -> torch.Tensor:
        """Mean over all tokens of the task (sum / count)."""
        return self.sum(task, group).double() / max(self.count(task, group), 1)

    def task_mean(self, task: str, group: str) -> torch.Tensor:
        """Mean of the per-sample means (what the reference code's task vector is proportional to)."""
        return self.sample_means(task, group).double().mean(dim=0)

    def second_moment(self, task: str, group: str) -> torch.Tensor:
        """Uncentred token second moment ``Gram / count`` (float64, ``n x n``)."""
        count = self.count(task, group)
        if count == 0:
            raise OsrmError(f"task {task!r} has no tokens in the statistics; recompute with non-empty texts")
        return self.gram(task, group).double() / count

    # ---- checks ----------------------------------------------------------------------------------
    def check_matches(self, model_fingerprint: str | None = None, settings: Mapping[str, Any] | None = None) -> None:
        """Raise a one-line :class:`OsrmError` if the store was made for another model or with other
        settings (only the settings given are compared)."""
        if model_fingerprint is not None and model_fingerprint != self.fingerprint:
            raise OsrmError(
                f"statistics store was computed for another model (fingerprint {self.fingerprint} != "
                f"{model_fingerprint}); recompute statistics with this model"
            )
        for key, want in (settings or {}).items():
            have = self.meta.get(key)
            if key == "dtype" and isinstance(want, torch.dtype):
                want = str(want).replace("torch.", "")
            if key == "tasks":
                missing = [t for t in want if t not in self.meta["tasks"]]
                if missing:
                    raise OsrmError(
                        f"statistics store lacks tasks {missing}; recompute statistics including them"
                    )
                continue
            if have != want:
                raise OsrmError(
                    f"statistics store was computed with {key}={have!r}, not {want!r}; "
                    "recompute statistics with the current settings"
                )

    # ---- I/O -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Atomically write ``path/`` with ``stats.safetensors``, ``stats.json`` and their sha256 in
        ``SHA256SUMS`` (verified by :meth:`load`)."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_dir(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}, str(tmp / STATS_FILE))
            write_json(tmp / META_FILE, self.meta)
            write_checksums(tmp, [STATS_FILE, META_FILE])
        logger.info("saved statistics for %d tasks, %d groups to %s", len(self.tasks), len(self.groups), path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StatsStore:
        """Read a store written by :meth:`save`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / STATS_FILE).exists() or not (path / META_FILE).exists():
            raise OsrmError(f"{path} is not a statistics store ({STATS_FILE} + {META_FILE}); run `osrm-lora profile` first")
        _verify_store_checksums(path)
        meta = read_json(path / META_FILE)
        if not isinstance(meta, dict) or meta.get("version") != STORE_VERSION:
            raise OsrmError(f"{path / META_FILE} has an unknown format; recompute the statistics")
        try:
            tensors = load_file(str(path / STATS_FILE))
        except (SafetensorError, OSError) as exc:
            raise OsrmError(f"{path / STATS_FILE} is corrupt ({exc}); recompute the statistics") from exc
        for task in meta["tasks"]:
            for group in meta["groups"]:
                for kind in ("count", "sum", "gram", "sample_means"):
                    if f"{task}{_SEP}{group}{_SEP}{kind}" not in tensors:
                        raise OsrmError(f"{path / STATS_FILE} lacks {kind} of {task}/{group}; recompute the statistics")
        return cls(tensors=tensors, meta=meta)


def _verify_store_checksums(path: Path) -> None:
    """Raise if a file of the store differs from its sha256 in ``SHA256SUMS`` (stores written before
    checksums were recorded have none and are read as they are)."""
    bad = verify_checksums(path)
    if bad is None:
        logger.debug("%s has no %s; reading it unverified", path, CHECKSUM_FILE)
    elif bad:
        raise OsrmError(f"statistics store {path} is corrupt: {', '.join(bad)} does not match its sha256 in "
                        f"{CHECKSUM_FILE}; recompute it (osrm-lora profile, or run --force profile)")


# --------------------------------------------------------------------------------------------------
# collection
# --------------------------------------------------------------------------------------------------
class _Collector:
    """Hook state: accumulates statistics of the current task per group."""

    def __init__(self, names: dict[nn.Module, str], parents: dict[str, str], include_padding: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.names = names
        self.parents = parents
        self.include_padding = include_padding
        self.dtype = dtype
        self.device = device
        self.mask: torch.Tensor | None = None
        # per batch, shared by every module: the mask as weights and its token counts
        self._weights: dict[torch.dtype, torch.Tensor] = {}
        self._counts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # grouping: module -> leader, fixed by the first forward pass
        self.leader_of: dict[str, str] | None = None
        self._pass_leader: dict[str, str] = {}
        self._last: tuple[str, Any, str] | None = None
        self.acc: dict[str, dict[str, Any]] = {}
        self.batch_sum: dict[str, torch.Tensor] = {}
        self.batch_cnt: dict[str, torch.Tensor] = {}
        self.warned_unmasked: set[str] = set()

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.to(self.device).bool()
        self._weights = {}
        self._counts = {}
        self._pass_leader = {}
        self._last = None
        self.batch_sum = {}
        self.batch_cnt = {}

    def end_batch(self) -> None:
        if self.leader_of is None:
            self.leader_of = dict(self._pass_leader)
        else:
            if self._pass_leader != self.leader_of:
                raise OsrmError(
                    "the modules reading the same input changed between batches; "
                    "this architecture is not supported by activation statistics"
                )
        for leader, psum in self.batch_sum.items():
            means = psum / self.batch_cnt[leader].clamp_min(1).unsqueeze(1).to(psum.dtype)
            self.acc[leader]["sample_means"].append(means)  # moved to the CPU once, at the end of the task
        self._last = None

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self.names[module]
        x = args[0] if args else next(iter(kwargs.values()))
        parent = self.parents[name]
        last = self._last
        if last is not None and last[0] == parent and last[1] is x:
            # same parent, identical input object as the previous target call: reuse its statistic
            self._pass_leader.setdefault(name, last[2])
            return
        leader = self._pass_leader.setdefault(name, name)
        # hold only the latest input (bounded memory); identity is checked with ``is``, so a freed
        # tensor's id can never be mistaken for a live one
        self._last = (parent, x, leader)
        self._accumulate(leader, name, x.detach())

    def new_accumulator(self, n: int) -> dict[str, Any]:
        """Empty statistics of one module-input group of width ``n``."""
        return {
            "count": torch.zeros((), dtype=torch.int64, device=self.device),
            "sum": torch.zeros(n, dtype=self.dtype, device=self.device),
            "gram": torch.zeros(n, n, dtype=self.dtype, device=self.device),
            "sample_means": [],
        }

    def _batch_counts(self, key: str, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token count of the batch and per sample, computed once per batch for ``key``."""
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts.setdefault(key, (keep.sum(), keep.sum(dim=1)))
        return counts

    def _accumulate(self, leader: str, name: str, x: torch.Tensor) -> None:
        assert self.mask is not None
        mask = self.mask
        bsz = mask.shape[0]
        n = x.shape[-1]
        x = x.to(self.device, self.dtype)
        if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x3 = x.reshape(bsz, mask.shape[1], n)
            if self.include_padding:
                xw, counts = x3, self._batch_counts("all", torch.ones_like(mask))
            else:
                # masked multiply instead of boolean indexing: padded rows become zero rows, which add
                # nothing to the sum or the Gram matrix, and nothing forces a device-host
                # synchronisation; the weights and counts are made once per batch, not per module
                weights = self._weights.get(x3.dtype)
                if weights is None:
                    weights = self._weights.setdefault(x3.dtype, mask.unsqueeze(-1).to(x3.dtype))
                xw, counts = x3 * weights, self._batch_counts("mask", mask)
        elif x.shape[0] == bsz:
            if name not in self.warned_unmasked:
                logger.warning("input of %s does not have a (batch, seq) layout; all its positions are used", name)
                self.warned_unmasked.add(name)
            xw = x.reshape(bsz, -1, n)
            keep = torch.ones(xw.shape[:2], dtype=torch.bool, device=xw.device)
            counts = (keep.sum(), keep.sum(dim=1))
        else:
            raise OsrmError(f"cannot match the input of {name} (shape {tuple(x.shape)}) to the batch; unsupported module")
        flat = xw.reshape(-1, n)
        acc = self.acc.get(leader)
        if acc is None:
            acc = self.acc[leader] = self.new_accumulator(n)
        psum = xw.sum(dim=1)  # per sample; the total sum follows from it without another pass over x
        pcnt = counts[1]
        acc["count"] += counts[0]
        acc["sum"] += psum.sum(dim=0)
        acc["gram"].addmm_(flat.T, flat)
        if leader in self.batch_sum:  # module called several times in one forward (shared layers)
            self.batch_sum[leader] += psum
            self.batch_cnt[leader] = self.batch_cnt[leader] + pcnt  # not in place: pcnt is shared per batch
        else:
            self.batch_sum[leader] = psum
            self.batch_cnt[leader] = pcnt


def _reduce_task(collector: _Collector, modules: dict[str, nn.Linear], mine: list[int], env: DistEnv) -> None:
    """Combine one task's accumulators over the ranks: counts, sums and Grams are all-reduced; the
    per-sample means are gathered and put back in batch order. Afterwards every rank holds exactly
    what one process would have accumulated (up to floating-point summation order)."""
    # rank 0 always processed batch 0, so it knows which modules read the same input
    collector.leader_of = broadcast_object(collector.leader_of)
    assert collector.leader_of is not None
    leaders = list(dict.fromkeys(collector.leader_of.values()))
    for leader in leaders:
        acc = collector.acc.get(leader)
        if acc is None:  # this rank had no batch of the task
            acc = collector.acc[leader] = collector.new_accumulator(int(modules[leader].in_features))
        acc["count"] = all_reduce_sum(acc["count"])
        acc["sum"] = all_reduce_sum(acc["sum"])
        acc["gram"] = all_reduce_sum(acc["gram"])
        means = [m.cpu() for m in acc["sample_means"]]
        gathered = all_gather_objects(list(zip(mine, means)))
        ordered = sorted((c, m) for part in gathered for c, m in part)
        acc["sample_means"] = [m.to(collector.device) for _, m in ordered]


def _normalise_texts(texts_by_task: TextsByTask) -> dict[str, tuple[list[str], list[str] | None]]:
    out: dict[str, tuple[list[str], list[str] | None]] = {}
    if not texts_by_task:
        raise ConfigError("no tasks given for statistics; pass texts for at least one task")
    for task, value in texts_by_task.items():
        if not task or _SEP in task:
            raise ConfigError(f"task name {task!r} is empty or contains {_SEP!r}; rename the task")
        if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], str):
            texts, pairs = list(value[0]), (None if value[1] is None else list(value[1]))
        else:
            texts, pairs = list(value), None  # type: ignore[arg-type]
        if pairs is not None and len(pairs) != len(texts):
            raise ConfigError(f"task {task!r} has {len(texts)} texts but {len(pairs)} text pairs; fix the data")
        if not texts:
            raise ConfigError(f"task {task!r} has no texts; give it training texts")
        out[str(task)] = (texts, pairs)
    return out


def sample_indices(num: int, n_samples: int, seed: int) -> list[int]:
    """The seeded sample of ``min(n_samples, num)`` indices used for a task (a seeded permutation)."""
    perm = np.random.default_rng(seed).permutation(num)
    return [int(i) for i in perm[: min(n_samples, num)]]


@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Linear], collector: _Collector) -> Iterator[None]:
    handles = []
    try:
        for mod in modules.values():
            handles.append(mod.register_forward_pre_hook(collector.hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _group_name(parent: str, members: list[str]) -> str:
    leaves = "+".join(m.rsplit(".", 1)[-1] for m in members)
    return f"{parent}.{leaves}" if parent else leaves


def collect_statistics(
    model: nn.Module,
    tokenizer: Any,
    texts_by_task: TextsByTask,
    target_modules: Sequence[str],
    *,
    n_samples: int = 100,
    max_length: int = 128,
    batch_size: int = 16,
    include_padding: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
    pad_to_max_length: bool = False,
) -> StatsStore:
    """Run the (pre-trained) model in eval mode without gradients over ``n_samples`` seeded samples
    per task and accumulate, per task and per module-input group, the token count, sum, Gram matrix
    (in ``dtype``, float32 or float64) and the per-sample token means.

    ``texts_by_task`` maps task -> texts, or task -> ``(texts, text_pairs or None)``. Tokens are
    truncated to ``max_length``; batches are padded to their longest member, or to ``max_length``
    with ``pad_to_max_length``. Accumulators live on ``device`` (default: the model's device); inputs
    go to the model's device. Hooks are removed afterwards, also on errors; the model's train/eval
    mode is restored.
    """
    if dtype not in _DTYPES.values():
        raise ConfigError(f"statistics dtype {dtype} is not supported; use torch.float32 or torch.float64")
    if n_samples < 1 or batch_size < 1 or max_length < 1:
        raise ConfigError("n_samples, batch_size and max_length must be positive; fix the statistics settings")
    data = _normalise_texts(texts_by_task)
    modules = linear_targets(model, target_modules)
    module_names: dict[nn.Module, str] = {mod: name for name, mod in modules.items()}
    parents = {name: name.rsplit(".", 1)[0] if "." in name else "" for name in modules}
    model_dev = _model_device(model)
    acc_dev = torch.device(device) if device is not None else model_dev
    collector = _Collector(module_names, parents, include_padding, dtype, acc_dev)
    padding: Any = "max_length" if pad_to_max_length else True

    tensors: dict[str, torch.Tensor] = {}
    per_task: dict[str, dict[str, int]] = {}
    leader_order: list[str] = []
    was_training = model.training
    model.eval()
    try:
        from osrm_lora.logutil import Progress

        env = get_env()
        total_batches = sum(len(shard(range(-(-min(len(t), n_samples) // batch_size)), env)) for t, _ in data.values())
        progress = Progress("profile activations", total_batches)
        with _hooks(modules, collector), torch.no_grad(), progress:
            for task, (texts, pairs) in data.items():
                idx = sample_indices(len(texts), n_samples, seed)
                if len(idx) < n_samples:
                    logger.warning("task %s has only %d texts (< n_samples=%d); using all", task, len(idx), n_samples)
                collector.acc = {}
                # the same batches as one process would make; with several processes each takes every
                # W-th batch (round robin) and the sums are all-reduced below
                chunks = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
                mine = shard(range(len(chunks)), env)
                for c in mine:
                    chunk = chunks[c]
                    a = [texts[i] for i in chunk]
                    b = None if pairs is None else [pairs[i] for i in chunk]
                    enc = tokenizer(a, b, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
                    enc = {k: v.to(model_dev) for k, v in enc.items()}
                    if "attention_mask" not in enc:
                        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
                    collector.start_batch(enc["attention_mask"])
                    progress.advance(1)
                    model(**enc)
                    collector.end_batch()
                if env.active:
                    _reduce_task(collector, modules, mine, env)
                assert collector.leader_of is not None
                leaders = list(dict.fromkeys(collector.leader_of.values()))
                if not leader_order:
                    leader_order = leaders
                missing = [m for m in modules if m not in collector.leader_of]
                if missing:
                    raise OsrmError(
                        f"target modules {missing[:3]} were not called in the forward pass; choose modules the model uses"
                    )
                for leader in leader_order:
                    acc = collector.acc[leader]
                    tensors[f"{task}{_SEP}{leader}{_SEP}count"] = acc["count"].cpu().to(torch.int64)
                    tensors[f"{task}{_SEP}{leader}{_SEP}sum"] = acc["sum"].cpu()
                    tensors[f"{task}{_SEP}{leader}{_SEP}gram"] = acc["gram"].cpu()
                    tensors[f"{task}{_SEP}{leader}{_SEP}sample_means"] = torch.cat(acc["sample_means"]).cpu().to(dtype)
                first = collector.acc[leader_order[0]]
                per_task[task] = {"samples": len(idx), "tokens": int(first["count"])}
                collector.acc = {}
                logger.info("statistics for %s: %d samples, %d tokens", task, len(idx), per_task[task]["tokens"])
    finally:
        model.train(was_training)

    assert collector.leader_of is not None
    members: dict[str, list[str]] = {leader: [] for leader in leader_order}
    for name in modules:  # named_modules order
        members[collector.leader_of[name]].append(name)
    gname = {leader: _group_name(parents[leader], members[leader]) for leader in leader_order}
    renamed = {}
    for key, val in tensors.items():
        task, leader, kind = key.split(_SEP)
        renamed[f"{task}{_SEP}{gname[leader]}{_SEP}{kind}"] = val
    dims = {gname[leader]: int(modules[leader].in_features) for leader in leader_order}
    meta: dict[str, Any] = {
        "version": STORE_VERSION,
        "model_fingerprint": model_fingerprint(model),
        "model_class": type(_unwrap(model)).__name__,
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "vocab_size": int(len(tokenizer)) if hasattr(tokenizer, "__len__") else None,
        "max_length": int(max_length),
        "n_samples": int(n_samples),
        "seed": int(seed),
        "include_padding": bool(include_padding),
        "pad_to_max_length": bool(pad_to_max_length),
        "dtype": str(dtype).replace("torch.", ""),
        "target_modules": [str(t) for t in target_modules],
        "tasks": list(data),
        "per_task": per_task,
        "groups": [gname[leader] for leader in leader_order],
        "group_members": {gname[leader]: members[leader] for leader in leader_order},
        "group_dims": dims,
        "module_to_group": {name: gname[collector.leader_of[name]] for name in modules},
    }
    return StatsStore(tensors=renamed, meta=meta)


def stats_from_samples(
    samples: Mapping[str, Mapping[str, Sequence[torch.Tensor]]],
    *,
    dtype: torch.dtype = torch.float64,
    fingerprint: str = "synthetic",
    meta: Mapping[str, Any] | None = None,
) -> StatsStore:
    """Build a store from given per-sample module inputs: ``samples[task][module]`` is a list of
    ``(tokens_i, n)`` tensors (all tokens count). Every module is its own group. For synthetic
    experiments, tests and externally captured activations."""
    tasks = list(samples)
    if not tasks:
        raise ConfigError("no tasks given; pass samples for at least one task")
    modules = list(samples[tasks[0]])
    tensors: dict[str, torch.Tensor] = {}
    dims: dict[str, int] = {}
    per_task: dict[str, dict[str, int]] = {}
    for task in tasks:
        if list(samples[task]) != modules:
            raise ConfigError(f"task {task!r} has other modules than {tasks[0]!r}; give every task the same modules")
        for mod in modules:
            xs = [torch.as_tensor(x).to(dtype) for x in samples[task][mod]]
            X = torch.cat(xs)
            dims[mod] = int(X.shape[1])
            tensors[f"{task}{_SEP}{mod}{_SEP}count"] = torch.tensor(X.shape[0], dtype=torch.int64)
            tensors[f"{task}{_SEP}{mod}{_SEP}sum"] = X.sum(0)
            tensors[f"{task}{_SEP}{mod}{_SEP}gram"] = X.T @ X
            tensors[f"{task}{_SEP}{mod}{_SEP}sample_means"] = torch.stack([x.mean(0) for x in xs])
            per_task[task] = {"samples": len(xs), "tokens": int(X.shape[0])}
    full: dict[str, Any] = {
        "version": STORE_VERSION,
        "model_fingerprint": fingerprint,
        "model_class": "synthetic",
        "tokenizer": "",
        "vocab_size": None,
        "max_length": None,
        "n_samples": None,
        "seed": None,
        "include_padding": False,
        "pad_to_max_length": False,
        "dtype": str(dtype).replace("torch.", ""),
        "target_modules": modules,
        "tasks": tasks,
        "per_task": per_task,
        "groups": modules,
        "group_members": {m: [m] for m in modules},
        "group_dims": dims,
        "module_to_group": {m: m for m in modules},
    }
    full.update(meta or {})
    return StatsStore(tensors=tensors, meta=full)
