"""Multi-process execution through ``torch.distributed`` (launched by ``torchrun`` or ``accelerate launch``).

There is no launcher here: the launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``, and :func:`init_distributed` joins the process group they describe (NCCL when
the run uses CUDA, gloo on CPU). Everything else in the package asks :func:`get_env` which rank it
is and uses the small collectives below; in a single process they are no-ops, so every code path
is the same with one process or many.

Work split conventions (all deterministic, the same on every rank):

- :func:`shard` gives rank ``r`` the items ``r, r + W, r + 2W, ...`` of a list (round robin).
- Files are written by the rank that owns the work; shared outputs by rank 0 (:attr:`DistEnv.is_main`),
  followed by :func:`barrier` before anyone reads them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from osrm_lora.errors import OsrmError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its global rank, the number of processes, its rank on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when several processes work together (a process group of two or more)."""
        return self.world_size > 1


def launched_distributed() -> bool:
    """True when a launcher (torchrun / accelerate launch) started this process (also as the only one:
    ``--nproc_per_node 1`` still joins a process group, so the backend is exercised)."""
    return all(v in os.environ for v in _LAUNCH_VARS)


def get_env() -> DistEnv:
    """The current process's :class:`DistEnv` (rank 0 of 1 when no process group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                       str(dist.get_backend()))
    return DistEnv()


def init_distributed(device: str | None = "auto", timeout_minutes: float = 60.0) -> DistEnv:
    """Join the process group the launcher described (no-op in a single process).

    The backend is NCCL when the run uses CUDA (``device`` auto with a GPU present, or cuda) and gloo
    otherwise. With CUDA, process ``LOCAL_RANK`` uses GPU ``LOCAL_RANK``; there must be at least as
    many visible GPUs as processes per node. Calling it again returns the existing group's env.
    """
    if dist.is_available() and dist.is_initialized():
        return get_env()
    if not launched_distributed():
        return DistEnv()
    if not dist.is_available():
        raise OsrmError("this torch build has no torch.distributed; install a torch with distributed support")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        n_gpu = torch.cuda.device_count()
        if local_rank >= n_gpu:
            raise OsrmError(f"process with LOCAL_RANK {local_rank} has no GPU ({n_gpu} visible); start at most "
                            f"{n_gpu} processes per node (torchrun --nproc_per_node {n_gpu}) or use device: cpu")
        torch.cuda.set_device(local_rank)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
    if use_cuda:
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(**kwargs)
    env = get_env()
    logger.debug("joined process group: rank %d of %d (local %d, %s)", env.rank, env.world_size, env.local_rank,
                 backend)
    return env


def shutdown(*, synchronize: bool = False, timeout_s: float = 60.0) -> None:
    """Leave the process group (no-op in a single process).

    ``synchronize`` (the command finished on this rank): wait for every rank first, so that no rank
    closes its connections while a peer still uses them (gloo then aborts the peer at exit with
    "terminate called without an active exception"). On gloo the wait is a monitored barrier that
    gives up after ``timeout_s`` (a peer that died never arrives); the group is left either way."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
            else:
                dist.barrier()
        except Exception as exc:  # a peer failed or left: nothing to wait for
            logger.debug("no barrier before leaving the process group: %s", exc)
    dist.destroy_process_group()


def rank_device(device: str | None = "auto") -> torch.device:
    """The device this process computes on: ``cuda:LOCAL_RANK`` for CUDA runs with several
    processes, otherwise the requested device (auto: cuda if available, else cpu)."""
    env = get_env()
    if device in (None, "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and env.active and dev.index is None:
        return torch.device("cuda", env.local_rank)
    return dev


def shard(items: Sequence[T], env: DistEnv | None = None) -> list[T]:
    """This rank's share of ``items`` (round robin: items ``rank, rank + W, ...``)."""
    env = env or get_env()
    return list(items[env.rank :: env.world_size])


def owner(index: int, env: DistEnv | None = None) -> int:
    """The rank that owns item ``index`` under :func:`shard`."""
    env = env or get_env()
    return index % env.world_size


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if get_env().active:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor on ``tensor``'s device; the input itself in one process).

    Moves the data to the backend's device when needed (gloo: CPU, NCCL: the rank's GPU).
    """
    if not get_env().active:
        return tensor
    comm = _comm_device()
    buf = tensor.detach().to(comm).contiguous().clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    env = get_env()
    if not env.active:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not get_env().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on at least one rank."""
    return any(all_gather_objects(bool(flag)))


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a first-time download into a shared cache), then the others."""
    env = get_env()
    if env.active and not env.is_main:
        barrier()
    yield
    if env.active and env.is_main:
        barrier()


def check_same(value: Any, what: str) -> None:
    """Raise on every rank if ``value`` differs between ranks (e.g. a config hash)."""
    values = all_gather_objects(value)
    if any(v != values[0] for v in values):
        raise OsrmError(f"the processes disagree on {what}; start every process with the same config and data")


def from_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` computed on rank 0 only and broadcast to every rank (``fn()`` itself in one process).

    A failure on rank 0 is raised on every rank: rank 0 re-raises its own error, the others an
    :class:`OsrmError` naming it, so no rank waits forever for the broadcast.
    """
    env = get_env()
    if not env.active:
        return fn()
    outcome: tuple[bool, Any] | None = None
    error: BaseException | None = None
    if env.is_main:
        try:
            outcome = (True, fn())
        except Exception as exc:
            error, outcome = exc, (False, f"{type(exc).__name__}: {exc}")
    # rank 0 always sets ``outcome`` before the broadcast, so every rank receives a tuple
    ok, value = cast("tuple[bool, Any]", broadcast_object(outcome))
    if error is not None:
        raise error
    if not ok:
        raise OsrmError(f"rank 0 failed ({value}); see its log")
    return cast("T", value)


def raise_if_any_failed(error: BaseException | None) -> None:
    """Collective error check: if any rank failed, every rank raises (so no rank waits forever).

    Call it on every rank after a piece of work that may fail on some ranks only; pass the
    exception caught there (or None). The failing rank re-raises its own error; the others raise an
    :class:`OsrmError` naming the failing rank and its message.
    """
    if not get_env().active:
        if error is not None:
            raise error
        return
    msgs = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if failed:
        r, m = failed[0]
        raise OsrmError(f"rank {r} failed ({m}); see its log")
