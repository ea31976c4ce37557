"""The distributed half of tests/test_ddp.py (not a test itself): ``python tests/ddp_worker.py SETTINGS.json``.

Lightning's "ddp" strategy re-launches this script once per extra rank. Every rank tests the given
ProtoNet weights on the fixed Omniglot episodes with the trainer that ``bench.runner`` builds, then
fits one step; between the two it tests a data module with fewer evaluation chunks than ranks. Each rank writes what it saw to ``OUT/rank<r>.json``; rank 0 also writes the gathered
test summary to ``OUT/summary.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytorch_lightning as pl  # noqa: E402

from bench.config import RunConfig  # noqa: E402
from bench.runner import make_trainer  # noqa: E402
from datamodules import OmniglotDataModule  # noqa: E402
from tasks.protonet import ProtoNet  # noqa: E402


class SeenEpisodes(pl.Callback):
    """The ids of the evaluation episodes this rank tested."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.ids.extend(batch.ids.tolist())


def main(settings_file: str) -> None:
    settings = json.loads(Path(settings_file).read_text())
    torch.set_num_threads(1)
    datamodule = OmniglotDataModule(**settings["datamodule"])
    task = ProtoNet(**settings["task"])
    task.load_state_dict(torch.load(settings["weights"], weights_only=True))
    seen = SeenEpisodes()
    trainer = make_trainer(RunConfig.from_dict(settings["run"]), [seen], progress=False)
    trainer.test(task, datamodule=datamodule, verbose=False)
    summary, seen_ids = task.test_summary, list(seen.ids)
    # Fewer evaluation chunks than ranks: rank 1 has no episode to test and must still take part.
    trainer.test(task, datamodule=OmniglotDataModule(**settings["small_datamodule"]), verbose=False)
    small_summary = task.test_summary
    trainer.fit(task, datamodule=datamodule)
    out = Path(settings["out"])
    record = {
        "rank": trainer.global_rank, "world_size": trainer.world_size,
        "datamodule_rank": datamodule.rank, "datamodule_world_size": datamodule.world_size,
        "test_ids_seen": seen_ids, "steps": trainer.global_step,
        "first_train_indices": next(iter(datamodule.train_dataloader()))["indices"].tolist(),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(summary))
        (out / "small_summary.json").write_text(json.dumps(small_summary))


if __name__ == "__main__":
    main(sys.argv[1])
