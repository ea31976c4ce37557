"""Scoring a model on externally given one-shot runs of Lake et al. 2015 ("Human-level concept learning
through probabilistic program induction"), in the format of the original ``all_runs.zip``
(github.com/brendenlake/omniglot, extracted):

    run01/ .. run20/
        training/class01.png .. class20.png    one drawing of each of 20 characters of one alphabet
        test/item01.png .. item20.png          another drawer's drawing of each character
        class_labels.txt                       lines "run01/test/item01.png run01/training/class05.png"

Each run becomes one 20-way 1-shot :class:`~datamodules.episodes.Episode` (support: the training
images in file order, labels 0..19; queries: the test items, labelled with the position of their
training image). Images get exactly the preprocessing of the Omniglot store (``_decode`` of
:mod:`datamodules.omniglot`). The model's ``predict`` classifies every test item; the error rate is the
fraction of test items given the wrong training image, per run and over all items.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from datamodules.download import DataError
from datamodules.episodes import Episode
from datamodules.omniglot import _decode
from datamodules.store import require

if TYPE_CHECKING:
    from tasks.base import EpisodicTask

LAYOUT = ("expected run folders (run01/, run02/, ...) each holding training/*.png, test/*.png and class_labels.txt "
          "with lines '<run>/test/<item>.png <run>/training/<class>.png' (the layout of Lake's all_runs.zip, extracted)")


@dataclass
class LakeRun:
    """One run: uint8 images ``[n, 1, size, size]`` and, per test item, its training image's position."""

    name: str
    training_files: list[str]
    test_files: list[str]
    training: torch.Tensor
    test: torch.Tensor
    labels: torch.Tensor

    def episode(self, index: int, device: torch.device | str = "cpu",
                normalize: Callable[[torch.Tensor], torch.Tensor] = lambda images: images) -> Episode:
        """This run as a one-task :class:`Episode` (id ``index``), images in [0, 1] then ``normalize``d."""
        ways = len(self.training_files)
        support = normalize(self.training.to(device).float().div_(255)).unsqueeze(0)
        queries = normalize(self.test.to(device).float().div_(255)).unsqueeze(0)
        return Episode(support_x=support, support_y=torch.arange(ways, device=device).unsqueeze(0),
                       query_x=queries, query_y=self.labels.to(device).unsqueeze(0),
                       ids=torch.tensor([index], device=device), ways=ways)


def read_run(root: Path, name: str, image_size: int = 28) -> LakeRun:
    """Parse and decode run ``root/name`` (paths in ``class_labels.txt`` are relative to ``root``)."""
    folder = root / name
    labels_file = folder / "class_labels.txt"
    training_files = sorted(f"{name}/training/{path.name}" for path in (folder / "training").glob("*.png"))
    require(bool(training_files), f"{folder}/training holds no .png images; {LAYOUT}.")
    position = {path: i for i, path in enumerate(training_files)}
    test_files, labels = [], []
    for number, line in enumerate(labels_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        require(len(fields) == 2, f"{labels_file} line {number}: expected '<test image> <training image>', "
                                  f"got {line!r}; {LAYOUT}.")
        test_file, training_file = fields
        require(training_file in position, f"{labels_file} line {number}: {training_file} is not one of the "
                                           f"{len(training_files)} images in {folder}/training.")
        require(test_file not in test_files, f"{labels_file} line {number}: {test_file} is listed twice.")
        require((root / test_file).is_file(), f"{labels_file} line {number}: {root / test_file} does not exist.")
        test_files.append(test_file)
        labels.append(position[training_file])
    require(bool(test_files), f"{labels_file} lists no test images; {LAYOUT}.")

    def decode(files: list[str]) -> torch.Tensor:
        pixels = np.stack([_decode((root / file).read_bytes(), image_size) for file in files])
        return torch.from_numpy(pixels).unsqueeze(1)

    return LakeRun(name, training_files, test_files, decode(training_files), decode(test_files),
                   torch.tensor(labels))


def load_runs(root: Path, image_size: int = 28) -> list[LakeRun]:
    """Every run under ``root`` (folders with a ``class_labels.txt``), in name order."""
    root = Path(root)
    require(root.is_dir(), f"{root} is not a folder; {LAYOUT}.")
    names = sorted(path.parent.name for path in root.glob("*/class_labels.txt"))
    require(bool(names), f"no runs found in {root}: {LAYOUT}.")
    return [read_run(root, name, image_size) for name in names]


def evaluate_runs(task: EpisodicTask, runs: list[LakeRun],
                  normalize: Callable[[torch.Tensor], torch.Tensor] = lambda images: images) -> dict:
    """Error rates of ``task`` on ``runs``: per run and overall (``{"runs": {name: error}, "error", "items"}``).

    The task is evaluated as Lightning tests it (eval mode, no gradient graph kept; algorithms that
    adapt re-enable gradients themselves); its training mode is restored afterwards.
    """
    if not runs:
        raise DataError("no runs to evaluate")
    was_training = task.training
    task.eval()
    errors, wrong_total, items_total = {}, 0, 0
    try:
        with torch.no_grad():
            for index, run in enumerate(runs):
                episode = run.episode(index, task.device, normalize)
                predicted = task.predict(episode).argmax(-1)
                wrong = int((predicted != episode.query_y).sum())
                errors[run.name] = wrong / episode.query_y.numel()
                wrong_total += wrong
                items_total += episode.query_y.numel()
    finally:
        task.train(was_training)
    return {"runs": errors, "error": wrong_total / items_total, "items": items_total}
