"""Run a script under ``torchrun`` (torch.distributed.run) with N CPU processes and the gloo backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(args: list[str], nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 300,
             module: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --nproc_per_node NPROC [-m] ARGS...`` on CPU (no GPU visible).

    Returns the completed process (stdout+stderr in ``.stdout``); the caller checks ``returncode``.
    """
    full_env = dict(os.environ)
    full_env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                     "PYTHONPATH": SRC + os.pathsep + full_env.get("PYTHONPATH", "")})
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    if module:
        cmd.append("-m")
    cmd.extend(args)
    return subprocess.run(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
