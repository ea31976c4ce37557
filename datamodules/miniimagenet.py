"""miniImageNet (Vinyals et al. 2016, "Matching Networks for One Shot Learning") in the split of
Ravi & Larochelle 2017 ("Optimization as a Model for Few-Shot Learning"): 100 ImageNet classes x 600
images, 84x84 RGB; 64 / 16 / 20 classes for train / val / test.

Sources, looked up in ``$METABENCH_DATA/miniimagenet/``:

* Ravi & Larochelle's release: ``images.zip`` (or the ``images/`` folder it holds) of flat jpgs, plus
  ``train.csv``, ``val.csv`` and ``test.csv`` (``filename,label``);
* otherwise learn2learn's pickles ``mini-imagenet-cache-{train,validation,test}.pkl`` (a dict with
  ``image_data`` uint8 ``[N, 84, 84, 3]`` and ``class_dict`` ``{label: [row, ...]}``). Unpickling runs
  code from the file: use pickles from a source you trust.

Nothing is downloaded (ImageNet licence: research, non-commercial use); a missing dataset raises one
error that says which files to place where. The images are decoded once, by one process per core
writing into a single preallocated uint8 store ``[classes, per_class, 3, 84, 84]`` (train classes, then
val, then test, each sorted by label; images in file order), which is cached on disk. Optional and on
the device: normalisation by the per-channel mean and standard deviation of the training images, and,
for training episodes only, random crop with zero padding plus horizontal flip
(:mod:`datamodules.augment`).
"""
from __future__ import annotations

import csv
import io
import math
import mmap
import multiprocessing
import os
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from datamodules.augment import random_crop_flip
from datamodules.base import EpisodicDataModule
from datamodules.download import DATA_ENV, DataError, cache_root, data_root
from datamodules.store import ImageStore, cached_store, file_fingerprint, require

IMAGE_SIZE = 84
SPLIT_CSVS = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
PICKLES = {"train": "mini-imagenet-cache-train.pkl", "val": "mini-imagenet-cache-validation.pkl",
           "test": "mini-imagenet-cache-test.pkl"}
SPLITS = ("ravi",)
MAX_DECODE_PROCESSES = 8


def layout_help(root: Path) -> str:
    return (
        f"miniImageNet is not downloaded automatically (ImageNet licence). Place in {root} either "
        f"(a) images.zip (or the images/ folder of the 60,000 84x84 jpgs) together with "
        f"{', '.join(SPLIT_CSVS.values())} of the Ravi & Larochelle split, or (b) learn2learn's "
        f"{', '.join(PICKLES.values())}; or set {DATA_ENV} to the folder that holds miniimagenet/."
    )


# -- layout shared by both sources -------------------------------------------------------------
def store_layout(splits: dict[str, dict[str, int]], where: str) -> tuple[list[str], int]:
    """Class names ``split/label`` in store order and the common number of images per class.

    ``splits`` maps split -> label -> number of images. Splits must be disjoint and every class must
    have the same number of images (the store is one dense tensor).
    """
    owner: dict[str, str] = {}
    for split, classes in splits.items():
        for label in classes:
            require(label not in owner, f"{where}: class {label} is in both {owner.get(label)} and {split}; "
                                        "the splits must not share classes.")
            owner[label] = split
    counts = {f"{split}/{label}": count for split, classes in splits.items() for label, count in sorted(classes.items())}
    per_class = Counter(counts.values()).most_common(1)[0][0]
    uneven = [f"{name} has {count}" for name, count in counts.items() if count != per_class]
    require(not uneven, f"{where}: every class needs the same number of images ({per_class} for most), but "
                        f"{', '.join(uneven[:5])}{' ...' if len(uneven) > 5 else ''}.")
    return list(counts), per_class


def shared_uint8(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed uint8 array in anonymous shared memory: processes forked later write into it in place."""
    size = math.prod(shape)
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), dtype=np.uint8, count=size).reshape(shape)


def decode_processes() -> int:
    """One decoding process per usable core (at most MAX_DECODE_PROCESSES)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_DECODE_PROCESSES))


# -- source (a): jpgs + csvs ---------------------------------------------------------------------
def read_split_csv(path: Path) -> dict[str, list[str]]:
    """``{label: [filename, ...]}`` (file order) of one Ravi & Larochelle csv (``filename,label``)."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    require(bool(rows) and [cell.strip() for cell in rows[0]] == ["filename", "label"],
            f"{path}: the first line must be the header 'filename,label'.")
    classes: dict[str, list[str]] = {}
    for number, row in enumerate(rows[1:], start=2):
        require(len(row) == 2, f"{path} line {number}: expected 'filename,label', got {','.join(row)!r}.")
        classes.setdefault(row[1].strip(), []).append(row[0].strip())
    require(bool(classes), f"{path} lists no images.")
    return classes


def image_members(root: Path) -> tuple[Path, bool, dict[str, str]]:
    """The image source (``images.zip`` or ``images/``), whether it is a zip, and ``{filename: member}``."""
    archive, folder = root / "images.zip", root / "images"
    if archive.is_file():
        try:
            with zipfile.ZipFile(archive) as handle:
                names = handle.namelist()
        except zipfile.BadZipFile as error:
            raise DataError(f"{archive} is not a readable zip ({error}). Replace it. " + layout_help(root)) from error
        return archive, True, {name.rsplit("/", 1)[-1]: name for name in names if not name.endswith("/")}
    return folder, False, {entry.name: str(entry) for entry in folder.iterdir() if entry.is_file()}


_OUTPUT: np.ndarray | None = None  # the store [images, 3, H, W] that the decoding processes write into


def decode_into_output(source: str, is_zip: bool, jobs: list[tuple[int, str]]) -> list[str]:
    """Decode ``jobs`` ``(store position, member)`` into ``_OUTPUT``; one line per unusable image."""
    problems = []
    archive = zipfile.ZipFile(source) if is_zip else None
    try:
        for position, member in jobs:
            try:
                data = archive.read(member) if archive else Path(member).read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                        problems.append(f"{member} is {image.size[0]}x{image.size[1]}")
                        continue
                    pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
            except (OSError, ValueError, zipfile.BadZipFile) as error:
                problems.append(f"{member} is unreadable ({error})")
                continue
            _OUTPUT[position] = pixels.transpose(2, 0, 1)
    finally:
        if archive:
            archive.close()
    return problems


def decode_all(source: Path, is_zip: bool, jobs: list[tuple[int, str]], output: np.ndarray) -> list[str]:
    """Decode every job into ``output`` (shared memory), in parallel processes where there are cores."""
    global _OUTPUT
    _OUTPUT = output
    try:
        processes = decode_processes()
        if processes == 1 or len(jobs) < 2 * processes or "fork" not in multiprocessing.get_all_start_methods():
            return decode_into_output(str(source), is_zip, jobs)
        size = math.ceil(len(jobs) / processes)  # one chunk per process: the zip index is read once per process
        chunks = [(str(source), is_zip, jobs[start:start + size]) for start in range(0, len(jobs), size)]
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            return [line for lines in pool.starmap(decode_into_output, chunks) for line in lines]
    finally:
        _OUTPUT = None


def build_store_from_images(root: Path) -> ImageStore:
    """Decode the jpgs listed in the three csvs into one store (see module doc for the order)."""
    listed = {split: read_split_csv(root / name) for split, name in SPLIT_CSVS.items()}
    names, per_class = store_layout({s: {label: len(files) for label, files in classes.items()}
                                     for s, classes in listed.items()}, f"miniImageNet csvs in {root}")
    source, is_zip, members = image_members(root)
    files = [file for name in names for file in listed[name.split("/")[0]][name.split("/", 1)[1]]]
    missing = [file for file in files if file not in members]
    require(not missing, f"{len(missing)} image(s) listed in the csvs are not in {source}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Restore them, or use "
                         f"the csvs that belong to these images. " + layout_help(root))
    duplicated = [file for file, count in Counter(files).items() if count > 1]
    require(not duplicated, f"the csvs in {root} list these images more than once: {', '.join(duplicated[:5])}.")
    output = shared_uint8((len(files), 3, IMAGE_SIZE, IMAGE_SIZE))
    problems = decode_all(source, is_zip, [(i, members[file]) for i, file in enumerate(files)], output)
    require(not problems, f"{len(problems)} miniImageNet image(s) are not readable {IMAGE_SIZE}x{IMAGE_SIZE} images: "
                          f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}. Replace them with the "
                          f"{IMAGE_SIZE}x{IMAGE_SIZE} jpgs of the miniImageNet release.")
    images = torch.from_numpy(output).view(len(names), per_class, 3, IMAGE_SIZE, IMAGE_SIZE)
    return ImageStore(images, names)


# -- source (b): learn2learn pickles ---------------------------------------------------------------
def read_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    """``image_data`` and ``class_dict`` of one learn2learn miniImageNet pickle, validated."""
    try:
        with open(path, "rb") as handle:
            payload = pickle.load(handle)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as error:
        raise DataError(f"{path} is not a readable pickle ({error}). Replace it with learn2learn's file.") from error
    found = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
    require(isinstance(payload, dict) and {"image_data", "class_dict"} <= payload.keys(),
            f"{path}: expected learn2learn's miniImageNet cache, a dict with keys 'image_data' and "
            f"'class_dict', but found {found}. Replace it with learn2learn's file.")
    images, classes = payload["image_data"], payload["class_dict"]
    require(isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3),
            f"{path}: 'image_data' must be uint8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got "
            f"{getattr(images, 'dtype', type(images).__name__)} {list(getattr(images, 'shape', []))}.")
    require(isinstance(classes, dict) and all(
        len(rows) and min(rows) >= 0 and max(rows) < len(images) for rows in classes.values()),
        f"{path}: 'class_dict' must map each label to a non-empty list of rows of 'image_data'.")
    return images, classes


def build_store_from_pickles(root: Path) -> ImageStore:
    """Copy the three pickles into one store. Each pickle is read twice (first only to size the store),
    so at most one pickle and the store are in memory at once."""
    paths = {split: root / name for split, name in PICKLES.items()}
    counts = {split: {label: len(rows) for label, rows in read_pickle(path)[1].items()} for split, path in paths.items()}
    names, per_class = store_layout(counts, f"miniImageNet pickles in {root}")
    output = shared_uint8((len(names), per_class, 3, IMAGE_SIZE, IMAGE_SIZE))
    position = {name: i for i, name in enumerate(names)}
    for split, path in paths.items():
        images, classes = read_pickle(path)
        for label, rows in classes.items():
            output[position[f"{split}/{label}"]] = images[np.asarray(rows)].transpose(0, 3, 1, 2)
        del images, classes
    return ImageStore(torch.from_numpy(output), names)


def source_kind(root: Path) -> str:
    """``"images"`` or ``"pickles"``: which complete source ``root`` holds (else one error naming what is missing)."""
    has_images = (root / "images.zip").is_file() or (root / "images").is_dir()
    csvs = [root / name for name in SPLIT_CSVS.values()]
    pickles = [root / name for name in PICKLES.values()]
    if has_images or any(path.exists() for path in csvs):
        missing = [path.name for path in csvs if not path.is_file()] + ([] if has_images else ["images.zip"])
        require(not missing, f"miniImageNet in {root} is incomplete: {', '.join(missing)} missing. " + layout_help(root))
        return "images"
    if any(path.exists() for path in pickles):
        missing = [path.name for path in pickles if not path.is_file()]
        require(not missing, f"miniImageNet in {root} is incomplete: {', '.join(missing)} missing. " + layout_help(root))
        return "pickles"
    raise DataError(f"miniImageNet not found in {root}. " + layout_help(root))


def build_miniimagenet_store(root: Path | None = None) -> ImageStore:
    """The miniImageNet store, decoded from ``root`` (default ``$METABENCH_DATA/miniimagenet``) or its cache."""
    root = root or data_root() / "miniimagenet"
    kind = source_kind(root)
    if kind == "images":
        files = [root / name for name in SPLIT_CSVS.values()]
        files.append(root / "images.zip" if (root / "images.zip").is_file() else root / "images")
        key = {"source": kind, "files": [file_fingerprint(f) for f in files], "pillow": PIL.__version__}
        return cached_store("miniimagenet84", key, lambda: build_store_from_images(root), cache_root())
    key = {"source": kind, "files": [file_fingerprint(root / name) for name in PICKLES.values()]}
    return cached_store("miniimagenet84", key, lambda: build_store_from_pickles(root), cache_root())


def channel_statistics(images: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation, in [0, 1] units, of the classes ``class_ids`` of uint8
    ``images [classes, n, C, H, W]``, from exact per-channel histograms of the pixel values."""
    channels = images.shape[2]
    histogram = torch.zeros(channels, 256, dtype=torch.int64)
    for class_id in class_ids.tolist():  # one class at a time: no large temporary
        for channel in range(channels):
            histogram[channel] += torch.bincount(images[class_id, :, channel].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    counts = histogram.double()
    total = counts.sum(1)
    mean = counts @ values / total
    variance = counts @ values.pow(2) / total - mean.pow(2)
    return mean, variance.clamp_min(0).sqrt()


class MiniImageNetDataModule(EpisodicDataModule):
    """N-way K-shot miniImageNet episodes in the Ravi & Larochelle split (see module doc).

    Args:
        split: ``"ravi"`` (the only split in use).
        normalization: subtract the per-channel mean and divide by the standard deviation of the
            training images (computed once from the store).
        augmentation: random crop after ``crop_padding`` pixels of zero padding, and horizontal flip,
            on training episodes only, seeded from ``seed`` and the rank.
    """

    def __init__(self, split: str = "ravi", normalization: bool = False, augmentation: bool = False,
                 crop_padding: int = 8, **episode_args) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown miniImageNet split {split!r}: the only one is 'ravi' (Ravi & Larochelle 2017)")
        if crop_padding < 0:
            raise DataError(f"crop_padding must be >= 0 (got {crop_padding})")
        super().__init__(**episode_args)
        self.split, self.normalization, self.augmentation = split, normalization, augmentation
        self.crop_padding = crop_padding
        self._statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def name(self) -> str:
        return f"miniimagenet-{self.split}"

    def build_store(self) -> ImageStore:
        return build_miniimagenet_store()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.normalization:
            self.channel_statistics()  # once, here, not inside the first timed training step

    def split_classes(self, split: str) -> torch.Tensor:
        prefix = f"{split}/"
        return torch.tensor([i for i, name in enumerate(self.store.class_names) if name.startswith(prefix)])

    def channel_statistics(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``[C, 1, 1]`` of the training images, on ``device`` (computed once)."""
        if not self._statistics:
            mean, std = channel_statistics(self.store.images, self.split_classes("train"))
            self._statistics["cpu"] = (mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1))
        key = str(torch.device(device))
        if key not in self._statistics:
            self._statistics[key] = tuple(value.to(device) for value in self._statistics["cpu"])
        return self._statistics[key]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if not self.normalization:
            return images
        mean, std = self.channel_statistics(images.device)
        return images.sub_(mean).div_(std)  # in place: the gathered tensor is this batch's own (no extra copies)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        if not self.augmentation:
            return images
        return random_crop_flip(images, self.crop_padding, self.augment_generator())
