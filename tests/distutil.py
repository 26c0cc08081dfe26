"""Run a script under ``torchrun`` (torch.distributed.run) with N CPU processes and the gloo backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(args: list[str], nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 300,
             module: bool = False, reset: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --nproc_per_node NPROC [-m] ARGS...`` on CPU (no GPU visible).

    Returns the completed process (stdout+stderr in ``.stdout``); the caller checks ``returncode``.
    ``reset``: removes the command's outputs; given, a run in which a rank aborted at gloo teardown
    is run once more from scratch (see below).
    """
    full_env = dict(os.environ)
    full_env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                     "PYTHONPATH": SRC + os.pathsep + full_env.get("PYTHONPATH", "")})
    full_env.update(env or {})

    def once() -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *(["-m"] if module else []), *args]
        return subprocess.run(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)

    proc = once()
    if reset is not None and proc.returncode != 0 and GLOO_TEARDOWN_ABORT in proc.stdout:
        # gloo's teardown race (a rank's transport thread still joinable when its peer has closed the
        # connection; pytorch/pytorch#28126, gloo#227) aborts a rank at exit on a loaded machine; the
        # whole command is run again once, and the caller checks that run's outputs as before.
        print(f"torchrun: a rank aborted at gloo teardown; running the command again\n{proc.stdout[-2000:]}")
        reset()
        proc = once()
    return proc
