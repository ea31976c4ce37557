"""Episode pipelines for ``make perf``: ours (index sampler + device gather) and learn2learn's TaskDataset.

learn2learn gets the same decoded images as we do (:class:`StoreImages`, a map-style dataset over our
uint8 store that returns float images in [0, 1]) inside its usual transform chain ``NWays, KShots,
LoadData, RemapLabels, ConsecutiveLabels``, so the comparison is of the episode machinery alone; and,
for Omniglot, its stock pipeline as ``l2l.vision.benchmarks`` builds it (PNG files read and resized per
image, random class rotation), which is what a learn2learn user runs.
"""
from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import ConcatDataset, Dataset

from bench.perf_timing import Workload, synchronize
from datamodules.base import EpisodicDataModule
from datamodules.download import cache_root, data_root
from datamodules.episodes import Episode, seeded_generator
from datamodules.store import ImageStore

OMNIGLOT_PARTS = ("images_background", "images_evaluation")


class StoreImages(Dataset):
    """The images of ``class_ids`` in our store as a map-style dataset: ``(float image in [0, 1], class)``."""

    def __init__(self, store: ImageStore, class_ids: torch.Tensor) -> None:
        self.flat, self.per_class = store.flat("cpu"), store.per_class
        self.class_ids = class_ids.tolist()

    def __len__(self) -> int:
        return len(self.class_ids) * self.per_class

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label, example = divmod(index, self.per_class)
        return self.flat[self.class_ids[label] * self.per_class + example].float().div_(255.0), label

    def labels_to_indices(self) -> dict[int, list[int]]:
        return {label: list(range(label * self.per_class, (label + 1) * self.per_class))
                for label in range(len(self.class_ids))}


def l2l_taskset(dataset: Dataset, labels_to_indices: dict[int, list[int]], ways: int, samples: int,
                extra: Callable[[object], list] = lambda meta: []):
    """learn2learn's TaskDataset of ``ways``-way tasks with ``samples`` examples per class."""
    import learn2learn as l2l

    meta = l2l.data.MetaDataset(dataset, labels_to_indices=labels_to_indices)
    transforms = l2l.data.transforms
    chain = [transforms.NWays(meta, ways), transforms.KShots(meta, samples), transforms.LoadData(meta),
             transforms.RemapLabels(meta), transforms.ConsecutiveLabels(meta), *extra(meta)]
    return l2l.data.TaskDataset(meta, chain, num_tasks=-1)


def l2l_in_memory_taskset(datamodule: EpisodicDataModule, ways: int, samples: int):
    """learn2learn's TaskDataset over the training classes of our decoded store."""
    dataset = StoreImages(datamodule.store, datamodule.split_classes("train"))
    return l2l_taskset(dataset, dataset.labels_to_indices(), ways, samples)


def l2l_stock_omniglot_taskset(ways: int, samples: int):
    """learn2learn's Omniglot pipeline as ``l2l.vision.benchmarks.omniglot_tasksets`` builds it, or None.

    torchvision's Omniglot reads the extracted PNGs (extracted once from ``$METABENCH_DATA/omniglot``
    into ``$METABENCH_CACHE/learn2learn``); its md5 check of the upstream zips is skipped because local
    copies are re-zipped. Each image is opened, resized to 28x28 (Lanczos) and inverted when loaded;
    tasks come from 1100 training characters with a random rotation per class, as in learn2learn.
    """
    import learn2learn as l2l
    from PIL.Image import LANCZOS
    from torchvision import transforms
    from torchvision.datasets import Omniglot

    root = cache_root() / "learn2learn"
    if not _extract_omniglot(root / "omniglot-py"):
        return None

    class LocalOmniglot(Omniglot):
        def _check_integrity(self) -> bool:
            return True

    background = LocalOmniglot(str(root), background=True)
    evaluation = LocalOmniglot(str(root), background=False)
    offset = len(background._characters)
    labels = [c for _, c in background._flat_character_images] + \
             [c + offset for _, c in evaluation._flat_character_images]
    image_transform = transforms.Compose([transforms.Resize(28, interpolation=LANCZOS), transforms.ToTensor(),
                                          lambda x: 1.0 - x])

    class FullOmniglot(Dataset):  # learn2learn's FullOmniglot over the local folders
        def __init__(self) -> None:
            self.parts = ConcatDataset((background, evaluation))

        def __len__(self) -> int:
            return len(self.parts)

        def __getitem__(self, index: int):
            image, _ = self.parts[index]
            return image_transform(image), labels[index]

    labels_to_indices: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        labels_to_indices.setdefault(label, []).append(index)
    meta = l2l.data.MetaDataset(FullOmniglot(), labels_to_indices=labels_to_indices)
    train = l2l.data.FilteredMetaDataset(meta, labels=list(range(1100)))
    transforms_ = l2l.data.transforms
    chain = [transforms_.FusedNWaysKShots(train, n=ways, k=samples), transforms_.LoadData(train),
             transforms_.RemapLabels(train), transforms_.ConsecutiveLabels(train),
             l2l.vision.transforms.RandomClassRotation(train, [0.0, 90.0, 180.0, 270.0])]
    return l2l.data.TaskDataset(train, chain, num_tasks=-1)


def _extract_omniglot(folder: Path) -> bool:
    """Extract the Omniglot zips into ``folder`` once; False if the zips are not there."""
    if all((folder / part).is_dir() for part in OMNIGLOT_PARTS):
        return True
    archives = [data_root() / "omniglot" / f"{part}.zip" for part in OMNIGLOT_PARTS]
    if not all(archive.exists() for archive in archives):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    for archive in archives:
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(folder)
    return True


def split_l2l_task(data: torch.Tensor, labels: torch.Tensor, shots: int, device: torch.device):
    """Support / query of a learn2learn task (classes consecutive, ``shots`` support examples first)."""
    data, labels = data.to(device), labels.to(device)
    ways = int(labels.max()) + 1
    position = torch.arange(labels.numel(), device=device) % (labels.numel() // ways)
    support = position < shots
    return data[support], labels[support], data[~support], labels[~support]


def our_episodes(datamodule: EpisodicDataModule, tasks: int, device: torch.device,
                 seed: int = 0) -> Callable[[], Episode]:
    """A function returning the next training meta-batch of ``tasks`` episodes, gathered on ``device``."""
    sampler, generator = datamodule.samplers["train"], seeded_generator(seed)
    ids = torch.full((tasks,), -1, dtype=torch.long, device=device)

    def next_episode() -> Episode:
        indices = sampler.sample(tasks, generator).to(device, non_blocking=True)
        return datamodule.gather(indices, ids, datamodule.train_shots, training=True)

    return next_episode


def calibrated(name: str, call: Callable[[], object], episodes_per_call: int, device: torch.device,
               target_seconds: float, notes: dict | None = None) -> Workload:
    """A workload repeating ``call`` enough times to last about ``target_seconds`` (measured once)."""
    call()
    synchronize(device)
    started = time.perf_counter()
    call()
    synchronize(device)
    calls = max(1, round(target_seconds / max(time.perf_counter() - started, 1e-6)))

    def step() -> None:
        for _ in range(calls):
            call()

    return Workload(name, step, units=calls * episodes_per_call, unit="episode", notes=notes or {})


def sampler_workloads(label: str, datamodule: EpisodicDataModule, tasks: int, device: torch.device,
                      target_seconds: float, stock_taskset=None) -> list[Workload]:
    """Ours (indices only; indices + pixels on the device) and learn2learn's (same images; stock)."""
    sampler, generator = datamodule.samplers["train"], seeded_generator(0)
    ways, samples = sampler.ways, sampler.examples_per_class
    workloads = [
        calibrated(f"{label} ours: indices", lambda: sampler.sample(tasks, generator), tasks, device,
                   target_seconds, {"what": f"EpisodeSampler.sample of {tasks} episodes (CPU)"}),
        calibrated(f"{label} ours: episodes", our_episodes(datamodule, tasks, device), tasks, device,
                   target_seconds, {"what": f"sample {tasks} episodes + gather float pixels on {device.type}"}),
    ]
    taskset = l2l_in_memory_taskset(datamodule, ways, samples)
    workloads.append(calibrated(f"{label} learn2learn: same images", taskset.sample, 1, device, target_seconds,
                                {"what": "TaskDataset(NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels) "
                                         "over our decoded images in memory"}))
    if stock_taskset is not None:
        workloads.append(calibrated(f"{label} learn2learn: stock pipeline", stock_taskset.sample, 1, device,
                                    target_seconds,
                                    {"what": "omniglot_tasksets pipeline: PNG read + Resize(28) + "
                                             "RandomClassRotation per task (FusedNWaysKShots)"}))
    return workloads
