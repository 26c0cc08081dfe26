"""Use trained or merged adapters: evaluate on task splits, predict labels, export standalone models."""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from osrm_lora.backbone import (
    _DEFAULT_ALIASES,
    HeadInfo,
    apply_deltas,
    load_classifier,
    load_head,
    load_tokenizer,
    resolve_model_path,
    select_device,
    set_head,
)
from osrm_lora.errors import OsrmError
from osrm_lora.fsutil import atomic_dir, read_json

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 128
"""Token limit of evaluate / predict for an adapter whose metrics.json does not record its own."""


# --------------------------------------------------------------------------- where models and adapters are
def _looks_like_path(text: str) -> bool:
    """Whether a --model value that does not exist is meant as a local path rather than a Hub id
    (``org/name`` or a bare legacy name): it starts with . / ~, has a backslash or several slashes,
    its first component is an existing local directory, or it is no valid Hub id."""
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or text.endswith("/"):
        return True
    if "/" in text and Path(text.split("/", 1)[0]).is_dir():
        return True
    try:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # re-exported lazily, invisible to mypy

        validate_repo_id(text)
    except HFValidationError:
        return True
    except ImportError:  # pragma: no cover
        pass
    return False


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: no Hub requests."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connection to the Hub endpoint ($HF_ENDPOINT, default huggingface.co:443)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def cached_hub_model(repo_id: str) -> Path | None:
    """The local snapshot directory of a Hub model in the HF cache (its config.json cached), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid id or an unreadable cache: not cached
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def check_model_available(model: str | None, option: str = "--model") -> str:
    """Fail fast, with one line, on a model that cannot be loaded: a local path that does not exist,
    or a Hub id that is not in the HF cache while the Hub is offline (HF_HUB_OFFLINE) or unreachable
    (instead of transformers retrying for most of a minute). Returns what to load: the local
    directory, the cached snapshot of a Hub id when the Hub cannot be reached, or the Hub id."""
    if model is None or str(model).lower() in _DEFAULT_ALIASES:
        return resolve_model_path(model)
    text = str(model)
    if Path(text).expanduser().exists():
        return resolve_model_path(text)  # checks config.json
    if _looks_like_path(text):
        raise OsrmError(f"{option} {text}: the local path does not exist; check the path (a Hub id looks like org/name)")
    cached = cached_hub_model(text)
    if hub_offline():
        if cached is None:
            raise OsrmError(f"{option} {text} is neither a local directory nor a model in the Hugging Face cache, and the "
                            "Hub is offline (HF_HUB_OFFLINE is set); check the path, or download the model while online")
        return str(cached)
    if not hub_reachable():
        if cached is None:
            raise OsrmError(f"{option} {text} is neither a local directory nor a model in the Hugging Face cache, and the "
                            "Hub cannot be reached; check the path, or download the model while online")
        return str(cached)
    if cached is None and not hub_has_model(text):
        raise OsrmError(f"{option} {text} is neither a local directory (no such path) nor a model on the Hugging Face "
                        "Hub (or one you have access to); check the path or the model id")
    return text


def hub_has_model(repo_id: str) -> bool:
    """False only if the Hub answers that ``repo_id`` does not exist (or is not accessible); True on
    any other outcome (network trouble is left to the loader)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:  # pragma: no cover
        return True
    try:
        HfApi().model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - anything else: let transformers try (and report)
        return True
    return True


def check_causal_lm(path: str) -> None:
    """Refuse a model that is not a causal LM (an encoder such as the default MiniLM, a classifier):
    transformers would attach a randomly initialised LM head and report a random loss."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OsrmError(f"cannot read the config of model {path}: {first}; check the model path or id") from exc
    model_type = getattr(config, "model_type", "?")
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = list(getattr(config, "architectures", None) or [])
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        what = architectures[0] if architectures else f"model type {model_type!r}"
        raise OsrmError(f"model {path} ({what}) is not a causal language model; evaluate-lm needs one "
                        "(e.g. a Llama, Qwen or GPT-2 checkpoint) - pass --model a causal LM")
    if architectures and not any(a in causal_names or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise OsrmError(f"model {path} is a {architectures[0]}, not a causal language model: its LM head would be "
                        "randomly initialised and the loss meaningless; pass --model a causal LM checkpoint")


def check_adapter_dir(path: str | os.PathLike[str], what: str = "adapter directory") -> Path:
    """An existing directory, else a one-line error saying that it does not exist."""
    p = Path(path)
    if not p.exists():
        raise OsrmError(f"{what} {p} does not exist; check the path")
    if not p.is_dir():
        raise OsrmError(f"{what} {p} is a file, not a directory; pass the directory `osrm-lora train` or `merge` wrote")
    return p


def is_full_model_dir(path: str | Path) -> bool:
    """A whole model directory (``merge --format full``: config.json and weights, no adapter)."""
    p = Path(path)
    weights = any((p / f).exists() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    return p.is_dir() and (p / "config.json").exists() and weights and not (p / "adapter_config.json").exists()


def check_merged_dir(path: str | Path, what: str = "merged adapter", option: str = "--merged") -> Path:
    """A merged PEFT adapter directory or a merged full model (``--format full``); an EMR (per-task)
    merge output is refused with the names of its per-task subfolders, which are the adapters to pass."""
    if is_full_model_dir(path):
        return Path(path)
    p = check_adapter_dir(path, what)
    if not (p / "adapter_config.json").exists() and (p / "merge_info.json").exists():
        try:
            info = read_json(p / "merge_info.json")
        except OsrmError:
            info = {}
        per_task = info.get("per_task") if isinstance(info, dict) else None
        if per_task:
            subs = ", ".join(f"{p / str(t.get('dir'))} (task {t.get('task')})" for t in per_task if isinstance(t, dict))
            raise OsrmError(f"{p} is an EMR (per-task) merge output with one adapter per task, not one merged adapter; "
                            f"pass each task's subfolder as {option}, with that task's adapter: {subs}")
    return p


def adapter_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Dense per-module updates (scaling included) of a PEFT LoRA adapter directory."""
    from osrm_lora.adapters import load_adapter

    return load_adapter(adapter_dir).deltas()


def base_model_for(model: str | None, info: HeadInfo, adapter_dir: str | Path) -> str:
    """--model if given, else the base model the adapter's head.json records (a missing local path
    from another machine: the embedded default model)."""
    if model in (None, "", "default") and info.base_model:
        if Path(info.base_model).exists():
            return info.base_model
        if not _looks_like_path(info.base_model) and info.base_model.lower() not in _DEFAULT_ALIASES:
            try:  # a Hub id, or a relative path from where the adapter was trained
                return check_model_available(info.base_model)
            except OsrmError:
                raise OsrmError(f"the base model of {adapter_dir} ({info.base_model!r}, recorded in its head.json) is "
                                "neither a local directory here nor a model in the Hugging Face cache with the Hub "
                                "reachable; pass --model with the base model's directory") from None
    return resolve_model_path(model)


def load_task_model(
    adapter_dir: str | Path,
    *,
    merged: str | Path | None = None,
    model: str | None = None,
    device: str | None = None,
) -> tuple[nn.Module, Any, HeadInfo]:
    """A plain sequence classifier for the adapter's task: base + (own or merged) update + task head.
    A merged full model (``merge --format full``) is the base itself, with the task's head."""
    check_adapter_dir(adapter_dir)
    if merged is not None:
        check_merged_dir(merged)
    state, info = load_head(adapter_dir)
    full = merged is not None and is_full_model_dir(merged)
    path = str(merged) if full else base_model_for(model, info, adapter_dir)
    tokenizer = load_tokenizer(path)
    net = load_classifier(path, info.num_labels, info.problem_type, device=select_device(device), pad_token_id=tokenizer.pad_token_id)
    set_head(net, state, info.num_labels, info.problem_type)
    if not full:
        apply_deltas(net, adapter_deltas(merged if merged is not None else adapter_dir))
    net.eval()
    return net, tokenizer, info


def run_metrics(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's metrics.json (written by training), or {} for an adapter without one."""
    path = Path(adapter_dir) / "metrics.json"
    if not path.exists():
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def run_max_length(adapter_dir: str | Path, max_length: int | None = None) -> int:
    """``max_length`` if given, else the token limit the adapter was trained with (its metrics.json)."""
    if max_length is not None:
        return int(max_length)
    recorded = (run_metrics(adapter_dir).get("train") or {}).get("max_length")
    return int(recorded) if isinstance(recorded, int) and recorded > 1 else DEFAULT_MAX_LENGTH


def task_for_adapter(adapter_dir: str | Path, info: HeadInfo) -> Any:
    """The adapter's task with the run's splits: the task spec training recorded (local files, HF
    datasets, caps), else the task name, capped to the split sizes the run recorded."""
    from osrm_lora.data import load_task
    from osrm_lora.data.spec import spec_from_name

    metrics = run_metrics(adapter_dir)
    spec = metrics.get("task_spec")
    if spec:
        return load_task(spec)
    try:
        named = spec_from_name(info.task)
    except OsrmError:
        raise OsrmError(f"{adapter_dir}: its metrics.json records no task spec and {info.task!r} is not a built-in "
                        "task; retrain it with this version of osrm-lora (which records the task's data)") from None
    task = load_task(named)
    n_val, n_test = metrics.get("n_validation"), metrics.get("n_test")
    sizes = [n for n in (n_val, n_test) if isinstance(n, int) and n > 0]
    if sizes and (len(task.validation) > max(sizes) or len(task.test) > max(sizes)):  # the run capped them
        task = load_task(named.model_copy(update={"max_eval": max(sizes)}))
    return task


@dataclass(frozen=True)
class TaskScore:
    """One adapter's score: task, split, metric, number of examples, value (0..100) and the score
    training recorded for that split (own adapter only; None when merged or not recorded)."""

    task: str
    split: str
    metric: str
    n: int
    value: float
    recorded: float | None = None

    def line(self) -> str:
        """``task: <split> <metric> <value> (<n> examples)``, plus the score training recorded."""
        text = f"{self.task}: {self.split} {self.metric} {self.value:.2f} ({self.n} examples)"
        return text + (f"; at training {self.recorded:.2f}" if self.recorded is not None else "")


def score_adapters(
    adapter_dirs: Sequence[str],
    *,
    merged: str | None = None,
    split: str = "test",
    model: str | None = None,
    max_length: int | None = None,
    device: str | None = None,
) -> list[TaskScore]:
    """Score each adapter (own update, or the merged one) on its task's ``split``, with the splits and
    (unless ``max_length`` is given) the token limit of the run that trained it."""
    return list(iter_scores(adapter_dirs, merged=merged, split=split, model=model, max_length=max_length,
                            device=device))


def iter_scores(
    adapter_dirs: Sequence[str],
    *,
    merged: str | None = None,
    split: str = "test",
    model: str | None = None,
    max_length: int | None = None,
    device: str | None = None,
) -> Iterator[TaskScore]:
    """:func:`score_adapters` one task at a time (each score as soon as it is computed), with a
    progress line over the tasks on stderr."""
    from osrm_lora.logutil import Progress

    if split not in ("train", "validation", "test"):
        raise OsrmError(f"unknown split {split!r}; use validation or test")
    if not adapter_dirs:
        raise OsrmError("no adapter directories given; pass the adapters to evaluate (each with its task head)")
    with Progress(f"evaluate {len(adapter_dirs)} adapter(s) on {split}", len(adapter_dirs)) as progress:
        for adir in adapter_dirs:
            yield _score_one(adir, merged, split, model, max_length, device)
            progress.advance(1)


def _score_one(adir: str, merged: str | None, split: str, model: str | None, max_length: int | None,
               device: str | None) -> TaskScore:
    from osrm_lora.encoding import encode_split
    from osrm_lora.evaluate import evaluate

    net, tok, info = load_task_model(adir, merged=merged, model=model, device=device)
    task = task_for_adapter(adir, info)
    metrics = run_metrics(adir)
    recorded_n = metrics.get(f"n_{split}")
    if isinstance(recorded_n, int) and recorded_n != len(task.split(split)):
        logger.warning("%s: the %s split has %d examples now but had %d when %s was trained; the task data "
                       "changed, so the scores are not comparable", task.name, split, len(task.split(split)),
                       recorded_n, adir)
    enc = encode_split(tok, task.split(split), run_max_length(adir, max_length), task.problem_type == "regression")
    recorded = metrics.get(split) if merged is None and split in ("validation", "test") else None
    return TaskScore(task.name, split, task.metric, len(enc), evaluate(net, tok, task, enc),
                     float(recorded) if isinstance(recorded, (int, float)) else None)


def evaluate_adapters(
    adapter_dirs: Sequence[str],
    *,
    merged: str | None = None,
    split: str = "test",
    model: str | None = None,
    max_length: int | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """Score each adapter (own update, or the merged one) on its task's ``split``: task -> score."""
    return {s.task: s.value for s in score_adapters(adapter_dirs, merged=merged, split=split, model=model,
                                                    max_length=max_length, device=device)}


@dataclass(frozen=True)
class Prediction:
    """One text's prediction: the label name (or the regression value as text) and, for a
    classifier, the softmax probability of every label."""

    label: str
    scores: dict[str, float]


def predict(
    adapter_dir: str,
    texts: Sequence[str],
    *,
    merged: str | None = None,
    model: str | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
) -> list[Prediction]:
    """Predictions for ``texts`` in batches of ``batch_size``; ``max_length`` defaults to the token
    limit the adapter was trained with."""
    if not texts:
        raise OsrmError("no texts to label; pass texts as arguments or '-' to read stdin")
    net, tok, info = load_task_model(adapter_dir, merged=merged, model=model)
    dev = next(net.parameters()).device
    limit = run_max_length(adapter_dir, max_length)
    names = info.label_names or tuple(str(i) for i in range(info.num_labels))
    out: list[Prediction] = []
    for start in range(0, len(texts), batch_size):
        batch = tok(list(texts[start : start + batch_size]), truncation=True, max_length=limit, padding=True,
                    return_tensors="pt")
        with torch.no_grad():
            logits = net(**{k: v.to(dev) for k, v in batch.items()}).logits.float().cpu()
        if info.problem_type == "regression":
            out += [Prediction(f"{v:.4f}", {}) for v in logits[:, 0].tolist()]
            continue
        for row in logits.softmax(-1).tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(names[best], dict(zip(names, row))))
    return out


def predict_texts(
    adapter_dir: str,
    texts: Sequence[str],
    *,
    merged: str | None = None,
    model: str | None = None,
    max_length: int | None = None,
) -> list[str]:
    """Predicted label names (or regression values) for ``texts`` (see :func:`predict`)."""
    return [p.label for p in predict(adapter_dir, texts, merged=merged, model=model, max_length=max_length)]


def export_models(
    adapter_dirs: Sequence[str],
    out_dir: str,
    *,
    merged: str | None = None,
    model: str | None = None,
) -> list[Path]:
    """Per task: a standalone HF model dir that ``AutoModelForSequenceClassification`` loads."""
    paths: list[Path] = []
    for adir in adapter_dirs:
        net, tok, info = load_task_model(adir, merged=merged, model=model, device="cpu")
        hf_net: Any = net  # a transformers model: config and save_pretrained are not nn.Module members
        names = info.label_names or tuple(str(i) for i in range(info.num_labels))
        hf_net.config.id2label = {i: n for i, n in enumerate(names)} if info.problem_type != "regression" else {0: "score"}
        hf_net.config.label2id = {n: i for i, n in hf_net.config.id2label.items()}
        target = Path(out_dir) / info.task
        with atomic_dir(target) as tmp:
            hf_net.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
        logger.info("exported %s to %s", info.task, target)
        paths.append(target)
    return paths


def _read_text_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise OsrmError(f"text file {p} does not exist; check the path")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise OsrmError(f"{p} is not UTF-8 text; convert it to UTF-8") from None
    lines = [line for line in lines if line]
    if not lines:
        raise OsrmError(f"text file {p} is empty; give one text per line")
    return lines


@torch.no_grad()
def causal_lm_loss(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, max_length: int = 512,
                   batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``texts`` under ``model``."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        target = ids[:, 1:]
        tmask = mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
        total += float(nll[tmask].sum())
        count += int(tmask.sum())
    if count == 0:
        raise OsrmError("the texts have no token to predict (each needs at least two tokens)")
    return total / count


def evaluate_causal_lm(
    text_files: Sequence[str],
    *,
    model: str,
    adapter: str | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Per text file: loss and perplexity of a causal LM with an (own or merged) LoRA update folded in.

    For adapters without classification heads (e.g. causal-LM adapters): merging never needs a head,
    and evaluation is the per-task loss / perplexity on the given text files (one text per line).
    """
    from transformers import AutoModelForCausalLM

    path = check_model_available(model)
    check_causal_lm(path)  # before loading any weights
    if adapter is not None:
        check_merged_dir(adapter, "adapter", "--adapter")
    tok = load_tokenizer(path)
    try:
        net: nn.Module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                   use_safetensors=True if Path(path).exists() else None)
    except (OSError, ValueError, RuntimeError) as exc:
        raise OsrmError(f"cannot load causal LM {path}: {str(exc).splitlines()[0]}; check the model path or id") from exc
    net.to(select_device(device))
    if adapter is not None:
        apply_deltas(net, adapter_deltas(adapter))
    out: dict[str, dict[str, float]] = {}
    for f in text_files:
        loss = causal_lm_loss(net, tok, _read_text_file(f), max_length=max_length, batch_size=batch_size)
        out[str(f)] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    return out
