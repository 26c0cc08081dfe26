"""Run under torchrun by tests/test_distributed.py: DDP training, sharded profiling, error propagation.

    torchrun --nproc_per_node 2 tests/dist_worker.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tinymodels import keyword_task  # noqa: E402

from osrm_lora import distributed as D  # noqa: E402
from osrm_lora.backbone import load_classifier, load_tokenizer  # noqa: E402
from osrm_lora.config import LoraSettings, TrainSettings  # noqa: E402
from osrm_lora.errors import OsrmError  # noqa: E402
from osrm_lora.pipeline import run_jobs  # noqa: E402
from osrm_lora.stats import collect_statistics  # noqa: E402
from osrm_lora.train import train_task  # noqa: E402

LORA = LoraSettings(rank=4, alpha=8)
TRAIN = TrainSettings(epochs=2, batch_size=16, lr=5e-3, max_length=16, eval_batch_size=7)


def ddp_task():  # noqa: ANN201
    return keyword_task("kw", ["red", "green"], n=72, seed=5)


def stats_texts() -> dict[str, list[str]]:
    return {name: list(keyword_task(name, kws, n=60, seed=s).train.texts)
            for name, kws, s in (("a", ["red"], 1), ("b", ["blue", "good"], 2), ("c", ["bad"], 3))}


def main(model: str, out: Path) -> None:
    torch.set_num_threads(1)
    env = D.init_distributed("cpu")
    assert env.world_size == 2 and env.backend == "gloo", env

    # 1. one adapter trained data parallel (global batch 16 = 2 x 8)
    train_task(ddp_task(), out / "ddp_adapter", model=model, lora=LORA, train=TRAIN, seed=7, device="cpu")
    # the same with the base, LoRA factors and head sharded (FSDP2)
    train_task(ddp_task(), out / "fsdp_adapter", model=model, lora=LORA,
               train=TRAIN.model_copy(update={"strategy": "fsdp"}), seed=7, device="cpu")

    # 2. statistics with the batches split over the ranks; every rank must end with the full store
    tok = load_tokenizer(model)
    m = load_classifier(model, 2, device="cpu")
    store = collect_statistics(m, tok, stats_texts(), ["query", "value"], n_samples=40, batch_size=6,
                               max_length=16, dtype=torch.float64, seed=3)
    gathered = D.all_gather_objects({k: v for k, v in store.tensors.items()})
    for k, v in gathered[0].items():
        assert torch.equal(v, gathered[1][k]), f"ranks hold different {k}"
    if env.is_main:
        store.save(out / "stats")

    # 3. a job failing on rank 1 only must raise on every rank (no rank left waiting)
    def job(i: int) -> None:
        if i == 1:
            raise OsrmError("job 1 broke")

    try:
        run_jobs([0, 1], job)
    except OsrmError as exc:
        (out / f"error_rank{env.rank}.txt").write_text(str(exc))
    # rank 0's value on every rank; a failure on rank 0 raised on every rank
    assert D.from_rank0(lambda: env.rank + 10) == 10

    def broken() -> int:
        raise OsrmError("rank 0 broke")

    try:
        D.from_rank0(broken)
    except OsrmError as exc:
        (out / f"from_rank0_rank{env.rank}.txt").write_text(str(exc))
    D.barrier()
    # 4. a finished command leaves the group with every rank: rank 0 waits for the late rank 1
    if env.rank == 1:
        time.sleep(1.0)
        (out / "rank1_finished.txt").write_text("1")
    D.shutdown(synchronize=True)
    if env.rank == 0:
        (out / "rank0_left_after_rank1.txt").write_text(str((out / "rank1_finished.txt").exists()))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
