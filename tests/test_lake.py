"""Lake et al. 2015 protocol: within-alphabet 20-way evaluation episodes, and scoring external runs in
the format of ``all_runs.zip`` (runs built here from real Omniglot evaluation drawings)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from datamodules import DataError, OmniglotDataModule
from datamodules.episodes import EpisodeSampler, GroupedEpisodeSampler, seeded_generator
from datamodules.lake_runs import evaluate_runs, load_runs
from tasks.base import EpisodicTask
from tasks.protonet import ProtoNet, prototypes, squared_distances

EVALUATION_ZIP = Path(os.environ["METABENCH_DATA"]) / "omniglot" / "images_evaluation.zip"
# run01: Angelic; run02: Tengwar. Test item m shows the same drawing as training class PAIRING[m].
PAIRING = [(7 * m + 3) % 20 for m in range(20)]
MISLABELLED = (2, 9, 17)  # run02's class_labels.txt points these items at the next class


@pytest.fixture(scope="module")
def lake_module() -> OmniglotDataModule:
    datamodule = OmniglotDataModule(split="lake", within_alphabet=True, ways=20, shots=1, queries=1,
                                    meta_batch=4, eval_batch=25, val_episodes=50, test_episodes=400)
    datamodule.setup()
    return datamodule


def alphabet_of(datamodule: OmniglotDataModule, class_ids: torch.Tensor) -> list[str]:
    return [datamodule.store.class_names[c].split("/")[0] for c in class_ids.tolist()]


def test_within_alphabet_evaluation_episodes_take_all_20_classes_from_one_alphabet(lake_module):
    for split in ("val", "test"):
        episodes = lake_module.episodes[split]
        assert episodes.shape[1:] == (20, 2)
        classes = episodes[:, :, 0] // lake_module.store.per_class
        alphabets = [set(alphabet_of(lake_module, row)) for row in classes]
        assert all(len(a) == 1 for a in alphabets)                          # one alphabet per episode
        assert all(row.unique().numel() == 20 for row in classes)           # 20 distinct characters
        assert set(alphabet_of(lake_module, classes.flatten())) <= set(alphabet_of(lake_module, lake_module.split_classes("test")))
    test_alphabets = {a.pop() for a in (set(alphabet_of(lake_module, row)) for row in lake_module.episodes["test"][:, :, 0] // 20)}
    assert len(test_alphabets) == 20                                        # every evaluation alphabet is used
    examples = lake_module.episodes["test"] % 20
    assert (examples[:, :, 0] != examples[:, :, 1]).all()                   # test drawing != training drawing
    # Training episodes are not restricted to one alphabet.
    train = next(iter(lake_module.train_dataloader()))["indices"][:, :, 0] // 20
    assert any(len(set(alphabet_of(lake_module, row))) > 1 for row in train)


def test_within_alphabet_requests_that_cannot_work_are_named():
    with pytest.raises(DataError, match="use it with split='lake'"):
        OmniglotDataModule(split="vinyals", within_alphabet=True)
    datamodule = OmniglotDataModule(split="lake", within_alphabet=True, ways=48, shots=1, queries=1)
    with pytest.raises(DataError, match="need an alphabet with 48 characters; the largest has 47"):
        datamodule.setup()


def test_training_within_alphabet_draws_each_episode_from_one_background_alphabet_at_one_rotation(lake_module):
    datamodule = OmniglotDataModule(split="lake", within_alphabet=True, train_within_alphabet=True,
                                    train_rotations=True, ways=20, shots=1, queries=1, train_queries=5,
                                    meta_batch=64, eval_batch=25, val_episodes=50, test_episodes=400)
    datamodule.setup()
    per_class = datamodule.store.per_class
    train = next(iter(datamodule.train_dataloader()))["indices"][:, :, 0] // per_class
    names = [[datamodule.store.class_names[c] for c in row.tolist()] for row in train]
    groups = [{(name.split("/")[0], name.split("/")[-1]) for name in row} for row in names]
    assert all(len(group) == 1 for group in groups)                          # one alphabet, one rotation
    assert len({group.pop()[1] for group in groups}) > 1                     # but all four rotations occur
    assert all(row.unique().numel() == 20 for row in train)
    background = set(alphabet_of(datamodule, datamodule.split_classes("train")))
    assert set(alphabet_of(datamodule, train.flatten())) <= background
    # Only training changes: the test and validation episodes are the flag-free module's.
    for split in ("val", "test"):
        assert torch.equal(datamodule.episodes[split], lake_module.episodes[split])
    too_wide = OmniglotDataModule(split="lake", train_within_alphabet=True, ways=5, train_ways=56)
    with pytest.raises(DataError, match="need an alphabet with 56 characters; the largest has 55. Use train_ways <= 55"):
        too_wide.setup()
    with pytest.raises(DataError, match="use it with split='lake'"):
        OmniglotDataModule(split="vinyals", train_within_alphabet=True)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_meta_batch_is_one_vectorised_call_whatever_its_size(grouped, count_ops):
    class_ids = torch.arange(100, 160)
    groups = torch.arange(60) // 13  # groups of 13, 13, 13, 13 and 8 classes
    sampler = GroupedEpisodeSampler(class_ids, groups, 20, 10, 1, 5) if grouped else \
        EpisodeSampler(class_ids, 20, 10, 1, 5)
    counts = [count_ops(lambda: sampler.sample(tasks, seeded_generator(0))) for tasks in (1, 256)]
    assert counts[0] == counts[1]
    indices = sampler.sample(256, seeded_generator(0))
    assert indices.shape == (256, 10, 6)
    if grouped:  # the group of 8 classes can never host a 10-way episode
        group_of = groups[(indices[:, :, 0] // 20) - 100]
        assert (group_of == group_of[:, :1]).all() and set(group_of[:, 0].tolist()) == {0, 1, 2, 3}


def write_runs(root: Path) -> dict[str, list[str]]:
    """run01 (Angelic) and run02 (Tengwar) in all_runs.zip layout; returns the characters per run."""
    characters = {}
    with zipfile.ZipFile(EVALUATION_ZIP) as archive:
        names = archive.namelist()
        for run, alphabet in (("run01", "Angelic"), ("run02", "Tengwar")):
            chosen = sorted({n.split("/")[2] for n in names if n.startswith(f"images_evaluation/{alphabet}/character")})[:20]
            characters[run] = [f"{alphabet}/{c}" for c in chosen]
            (root / run / "training").mkdir(parents=True)
            (root / run / "test").mkdir()
            for k, character in enumerate(chosen):
                first = sorted(n for n in names if n.startswith(f"images_evaluation/{alphabet}/{character}/"))[0]
                (root / run / "training" / f"class{k + 1:02d}.png").write_bytes(archive.read(first))
            lines = []
            for m, k in enumerate(PAIRING):
                (root / run / "test" / f"item{m + 1:02d}.png").write_bytes(
                    (root / run / "training" / f"class{k + 1:02d}.png").read_bytes())
                listed = (k + 1) % 20 if run == "run02" and m in MISLABELLED else k
                lines.append(f"{run}/test/item{m + 1:02d}.png {run}/training/class{listed + 1:02d}.png")
            (root / run / "class_labels.txt").write_text("\n".join(lines) + "\n")
    return characters


class PixelNearestNeighbour(EpisodicTask):
    """Classifies a query by the nearest support image in pixel space: exact copies are always right."""

    def predict(self, episode):
        support, queries = episode.support_x.flatten(2), episode.query_x.flatten(2)
        return -squared_distances(queries, prototypes(support, episode.support_y, episode.ways))


def test_runs_are_parsed_decoded_like_the_store_and_scored_per_run(tmp_path, lake_module):
    characters = write_runs(tmp_path)
    runs = load_runs(tmp_path)
    assert [run.name for run in runs] == ["run01", "run02"]
    run01, run02 = runs
    assert run01.training_files[:2] == ["run01/training/class01.png", "run01/training/class02.png"]
    assert run01.test_files[-1] == "run01/test/item20.png"
    assert run01.labels.tolist() == PAIRING
    assert run02.labels.tolist() == [(k + 1) % 20 if m in MISLABELLED else k for m, k in enumerate(PAIRING)]
    # Same preprocessing as the Omniglot store: class k is the first drawing of its character.
    index = {name: i for i, name in enumerate(lake_module.store.class_names)}
    for run in runs:
        assert run.training.shape == (20, 1, 28, 28) and run.test.shape == (20, 1, 28, 28)
        for k, character in enumerate(characters[run.name]):
            assert torch.equal(run.training[k], lake_module.store.images[index[f"{character}/rot000"], 0])

    result = evaluate_runs(PixelNearestNeighbour(ways=20), runs)
    assert result["runs"] == {"run01": 0.0, "run02": len(MISLABELLED) / 20}
    assert result["error"] == len(MISLABELLED) / 40 and result["items"] == 40

    protonet = ProtoNet(ways=20).train()
    scored = evaluate_runs(protonet, runs)
    assert protonet.training  # mode restored
    protonet.eval()
    with torch.no_grad():
        for i, run in enumerate(runs):
            episode = run.episode(i)
            accuracy = protonet.episode_scores(protonet.predict(episode), episode.query_y).item()
            assert scored["runs"][run.name] == pytest.approx(1 - accuracy, abs=1e-6)


@pytest.mark.parametrize("breakage, fragment", [
    ("no runs", "no runs found in"),
    ("bad line", r"class_labels.txt line 4: expected '<test image> <training image>', got 'run01/test/item04.png'"),
    ("unknown class", r"line 1: run01/training/class21.png is not one of the 20 images"),
    ("listed twice", r"line 2: run01/test/item01.png is listed twice"),
    ("missing item", r"line 20: .*run01/test/item20.png does not exist"),
])
def test_malformed_runs_get_one_clear_error(tmp_path, breakage, fragment):
    if breakage != "no runs":
        write_runs(tmp_path)
        labels = tmp_path / "run01/class_labels.txt"
        lines = labels.read_text().splitlines()
        if breakage == "bad line":
            lines[3] = lines[3].split()[0]
        elif breakage == "unknown class":
            lines[0] = f"{lines[0].split()[0]} run01/training/class21.png"
        elif breakage == "listed twice":
            lines[1] = f"run01/test/item01.png {lines[1].split()[1]}"
        else:
            (tmp_path / "run01/test/item20.png").unlink()
        labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=fragment):
        load_runs(tmp_path)


def test_affine_augmentation_distorts_training_episodes_only_and_is_seeded():
    def module(augmented: bool, seed: int = 0) -> OmniglotDataModule:
        datamodule = OmniglotDataModule(split="lake", within_alphabet=True, ways=20, shots=1, queries=1,
                                        train_ways=10, train_queries=2, meta_batch=2, eval_batch=5,
                                        val_episodes=0, test_episodes=10, seed=seed, affine_augmentation=augmented)
        datamodule.setup()
        return datamodule

    plain, augmented, again = module(False), module(True), module(True)
    test_batch = next(iter(augmented.test_dataloader()))
    assert torch.equal(augmented.on_after_batch_transfer(test_batch, 0).query_x,
                       plain.on_after_batch_transfer(test_batch, 0).query_x)   # evaluation: never distorted
    batch = next(iter(augmented.train_dataloader()))
    distorted = augmented.on_after_batch_transfer(batch, 0)
    original = plain.on_after_batch_transfer(batch, 0)
    assert distorted.query_x.shape == original.query_x.shape == (2, 20, 1, 28, 28)
    differs = (distorted.query_x - original.query_x).abs().flatten(2).amax(-1) > 1e-4
    assert 0.8 < differs.float().mean() < 1.0                                  # 15/16 of the images move
    assert torch.equal(again.on_after_batch_transfer(batch, 0).query_x, distorted.query_x)
    other_seed = module(True, seed=1).on_after_batch_transfer(batch, 0)
    assert not torch.equal(other_seed.query_x, distorted.query_x)
