"""Omniglot (Lake et al. 2015, "Human-level concept learning through probabilistic program induction").

1623 handwritten characters from 50 alphabets, 20 drawers each, resized to 28x28 (strokes bright).
Two splits:

* ``"vinyals"`` -- Vinyals et al. 2016 (Matching Networks) as published with Prototypical Networks
  (Snell et al. 2017): every character rotated by 0/90/180/270 degrees is a class of its own;
  4112 / 688 / 1692 classes for train / val / test. Rotations are precomputed in the store, so the
  augmentation costs nothing at sampling time: it is index arithmetic.
* ``"lake"`` -- the original background (30 alphabets, 964 characters) for training and evaluation
  (20 alphabets, 659 characters) for testing, no rotations. There is no separate validation set in
  this protocol: validation episodes are drawn from the evaluation alphabets with their own seed and
  are for monitoring only (no model selection is done on them). With ``within_alphabet=True`` every
  validation/test episode takes all its classes from one evaluation alphabet, as in the original
  20-way 1-shot task of Lake et al. 2015 (use ``ways=20, shots=1, queries=1``); externally given
  runs in that task's format are scored by :mod:`datamodules.lake_runs`.

Either split may distort its training images on the device with Koch et al. 2015's random affine
transforms (``affine_augmentation=True``, :func:`datamodules.augment.random_affine`); evaluation
images never are.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules.augment import random_affine
from datamodules.base import EpisodicDataModule
from datamodules.episodes import EpisodeSampler, GroupedEpisodeSampler
from datamodules.download import DataError, RemoteFile, cache_root, data_root, locate_or_fetch
from datamodules.store import ImageStore, cached_store, file_fingerprint, require

UPSTREAM = "https://github.com/brendenlake/omniglot/raw/master/python"
ARCHIVES = {
    "images_background": RemoteFile(f"{UPSTREAM}/images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": RemoteFile(f"{UPSTREAM}/images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
}
EXPECTED = {"images_background": (30, 964), "images_evaluation": (20, 659)}  # alphabets, characters
DRAWERS = 20
SPLIT_URL = "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals"
# md5 of the split files, measured on the copies in ../shared/data (the files published with
# Prototypical Networks; line counts 4112 / 688 / 1692 / 4800 match the paper).
SPLIT_MD5 = {
    "train": "433d1fcc2b20dcee2983ceb524586f7f",
    "val": "78c535fa427b12b6596908376a0b3f34",
    "test": "43534e6d5f9e74acbb7de1b4874abad8",
    "trainval": "888433268015439fd05fb6e9006ead50",
}
VINYALS_CLASSES = {"train": 4112, "val": 688, "test": 1692}
ROTATIONS = 4
LAYOUT_HELP = (
    "Expected under {root}/omniglot/: images_background.zip and images_evaluation.zip (or the extracted "
    "folders images_background/ and images_evaluation/), laid out as "
    "<images_background|images_evaluation>/<Alphabet>/characterNN/<drawing>.png with 20 drawings per character."
)


def _read_source(root: Path, part: str, download: bool) -> dict[str, list[tuple[str, bytes]]]:
    """PNG bytes of one Omniglot part grouped by ``Alphabet/characterNN``, from folder or zip."""
    folder = root / part
    characters: dict[str, list[tuple[str, bytes]]] = {}
    if folder.is_dir():
        for png in sorted(folder.glob("*/*/*.png")):
            key = f"{png.parent.parent.name}/{png.parent.name}"
            characters.setdefault(key, []).append((png.name, png.read_bytes()))
        return characters
    archive = locate_or_fetch(Path("omniglot") / f"{part}.zip", ARCHIVES[part], download)
    try:
        with zipfile.ZipFile(archive) as handle:
            for member in sorted(handle.namelist()):
                parts = member.split("/")
                if len(parts) == 4 and parts[0] == part and parts[3].endswith(".png"):
                    characters.setdefault(f"{parts[1]}/{parts[2]}", []).append((parts[3], handle.read(member)))
    except zipfile.BadZipFile as error:
        raise DataError(f"{archive} is not a readable zip ({error}). Replace it. " + LAYOUT_HELP.format(root=data_root())) from error
    return characters


def _validate(part: str, characters: dict[str, list[tuple[str, bytes]]]) -> None:
    want_alphabets, want_characters = EXPECTED[part]
    alphabets = {name.split("/")[0] for name in characters}
    help_text = LAYOUT_HELP.format(root=data_root())
    require(len(alphabets) == want_alphabets,
            f"Omniglot {part}: found {len(alphabets)} alphabets, expected {want_alphabets}. {help_text}")
    require(len(characters) == want_characters,
            f"Omniglot {part}: found {len(characters)} characters, expected {want_characters}. {help_text}")
    short = sorted(name for name, drawings in characters.items() if len(drawings) != DRAWERS)
    require(not short, f"Omniglot {part}: characters without exactly {DRAWERS} drawings: "
                       f"{', '.join(short[:5])}{' ...' if len(short) > 5 else ''}. {help_text}")


def _decode(png: bytes, size: int) -> np.ndarray:
    image = Image.open(io.BytesIO(png)).convert("L").resize((size, size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(image, dtype=np.uint8)


def build_omniglot_store(size: int = 28, download: bool = True) -> ImageStore:
    """Decode all 1623 x 20 Omniglot drawings (background then evaluation) into one store."""
    root = data_root() / "omniglot"
    names: list[str] = []
    arrays: list[np.ndarray] = []
    for part in ARCHIVES:
        characters = _read_source(root, part, download)
        _validate(part, characters)
        for name in sorted(characters):
            names.append(name)
            arrays.append(np.stack([_decode(png, size) for _, png in characters[name]]))
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(2)  # [1623, 20, 1, size, size]
    return ImageStore(images, names)


def _source_key() -> dict:
    root = data_root() / "omniglot"
    key = {}
    for part in ARCHIVES:
        archive, folder = root / f"{part}.zip", root / part
        key[part] = file_fingerprint(archive if archive.exists() else folder)
    return key


class OmniglotDataModule(EpisodicDataModule):
    """N-way K-shot Omniglot episodes; ``split`` is ``"vinyals"`` or ``"lake"`` (see module doc).

    ``within_alphabet`` (Lake split only): evaluation episodes draw all classes from one alphabet.
    ``train_rotations`` (Lake split only): the 90/180/270-degree rotations of the background characters
    are extra training classes, the augmentation of Santoro et al. 2016 and Vinyals et al. 2016; the
    evaluation characters stay unrotated, so the test episodes do not change.
    ``train_within_alphabet`` (Lake split only): every training episode takes its classes from one background
    alphabet at one rotation, as the test episodes do (alphabets with fewer than ``train_ways`` characters
    are never drawn): the model trains on the hard distinctions it is tested on.
    ``affine_augmentation``: every training image gets its own random rotation, shear, scale and shift
    (Koch et al. 2015, the Siamese networks of the Lake split), seeded from ``seed`` and the rank.
    """

    def __init__(self, split: str = "vinyals", image_size: int = 28, download: bool = True,
                 within_alphabet: bool = False, train_rotations: bool = False, affine_augmentation: bool = False,
                 train_within_alphabet: bool = False, **episode_args) -> None:
        if split not in ("vinyals", "lake"):
            raise DataError(f"unknown Omniglot split {split!r}: use 'vinyals' or 'lake'")
        for option, value in (("within_alphabet", within_alphabet), ("train_rotations", train_rotations),
                              ("train_within_alphabet", train_within_alphabet)):
            if value and split != "lake":
                raise DataError(f"{option}=True belongs to the Lake et al. 2015 protocol: use it with split='lake' "
                                "(the Vinyals split always has rotations as classes)")
        super().__init__(**episode_args)
        self.split, self.image_size, self.download = split, image_size, download
        self.within_alphabet, self.train_rotations = within_alphabet, train_rotations
        self.affine_augmentation, self.train_within_alphabet = affine_augmentation, train_within_alphabet

    @property
    def name(self) -> str:
        return f"omniglot-{self.split}{'-within-alphabet' if self.within_alphabet else ''}"

    def eval_sampler(self, split: str, class_ids: torch.Tensor) -> EpisodeSampler:
        if not self.within_alphabet:
            return super().eval_sampler(split, class_ids)
        return self._alphabet_sampler(split, class_ids, self.ways, self.shots, self.queries)

    def train_sampler(self, class_ids: torch.Tensor, ways: int, shots: int, queries: int) -> EpisodeSampler:
        if not self.train_within_alphabet:
            return super().train_sampler(class_ids, ways, shots, queries)
        return self._alphabet_sampler("train", class_ids, ways, shots, queries)

    def _alphabet_sampler(self, split: str, class_ids: torch.Tensor, ways: int, shots: int,
                          queries: int) -> GroupedEpisodeSampler:
        """Episodes whose classes share one alphabet and one rotation (evaluation classes are unrotated)."""
        groups = [(name.split("/")[0], name.split("/")[-1]) for name in
                  (self.store.class_names[c] for c in class_ids.tolist())]
        group_index = {group: i for i, group in enumerate(sorted(set(groups)))}
        group_ids = torch.tensor([group_index[group] for group in groups])
        largest = int(group_ids.bincount().max())
        if ways > largest:
            option = "train_ways" if split == "train" else "ways"
            raise DataError(f"{self.name} {split}: {ways}-way episodes within one alphabet need an alphabet "
                            f"with {ways} characters; the largest has {largest}. Use {option} <= {largest}.")
        return GroupedEpisodeSampler(class_ids, group_ids, self.store.per_class, ways, shots, queries)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        return random_affine(images, self.augment_generator()) if self.affine_augmentation else images

    def build_store(self) -> ImageStore:
        base = cached_store(f"omniglot{self.image_size}", {"size": self.image_size, "source": _source_key()},
                            lambda: build_omniglot_store(self.image_size, self.download), cache_root())
        # Rotated copies as classes of their own: class id = character * 4 + quarter turns.
        rotated = torch.stack([torch.rot90(base.images, k, dims=(-2, -1)) for k in range(ROTATIONS)], dim=1)
        names = [f"{name}/rot{90 * k:03d}" for name in base.class_names for k in range(ROTATIONS)]
        return ImageStore(rotated.reshape(-1, *base.images.shape[1:]), names)

    def split_classes(self, split: str) -> torch.Tensor:
        if self.split == "lake":
            part_sizes = EXPECTED["images_background"][1]
            characters = torch.arange(part_sizes) if split == "train" else \
                torch.arange(part_sizes, part_sizes + EXPECTED["images_evaluation"][1])
            if split == "train" and self.train_rotations:
                return (characters[:, None] * ROTATIONS + torch.arange(ROTATIONS)).flatten()
            return characters * ROTATIONS
        lines = self._vinyals_lines(split)
        index = {name: i for i, name in enumerate(self.store.class_names)}
        missing = [line for line in lines if line not in index]
        require(not missing, f"Vinyals split file {split}.txt names classes absent from the images: "
                             f"{missing[:3]}. Check that the split files match the Omniglot archives.")
        require(len(lines) == VINYALS_CLASSES[split],
                f"Vinyals split file {split}.txt lists {len(lines)} classes, expected {VINYALS_CLASSES[split]}.")
        return torch.tensor([index[line] for line in lines])

    def _vinyals_lines(self, split: str) -> list[str]:
        path = locate_or_fetch(Path("omniglot/splits/vinyals") / f"{split}.txt",
                               RemoteFile(f"{SPLIT_URL}/{split}.txt", SPLIT_MD5[split]), self.download)
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
