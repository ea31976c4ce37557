"""Handing an embedding network from one run to another (bench.weights): pre-train, then train episodically."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from bench.config import RunConfig
from bench.runner import run
from bench.suite import expand_suite
from bench.weights import load_embedding, save_embedding, weights_path
from tasks import algorithm_class

TINY = dict(dataset="omniglot", ways=5, shots=1, queries=2, steps=2, val_every=2, val_episodes=0,
            test_episodes=10, eval_batch=5, threads=1)

TWO_STAGE_SUITE = {
    "name": "two-stage",
    "defaults": {"dataset": "omniglot", "steps": 2},
    "grid": {"shots": [1, 5], "seed": [0]},
    "algorithms": {
        "protonet": {"init_from": "baseline", "train_ways": 20},  # listed first on purpose
        "baseline": {"dataset_args": {"train_mode": "batches", "batch_size": 8}},
        "matching": {},
        "protonet-5way": {"algorithm": "protonet", "init_from": "baseline", "shots": 5, "train_ways": 5},
    },
}


def test_init_from_an_algorithm_of_the_suite_names_its_run_at_the_same_grid_point():
    runs = {(c.algorithm, c.shots): c for c in expand_suite(TWO_STAGE_SUITE)}
    for shots in (1, 5):
        pretraining, episodic = runs["baseline", shots], runs["protonet", shots]
        assert episodic.init_from == pretraining.name and pretraining.save_weights
        assert not runs["matching", shots].save_weights and runs["matching", shots].init_from is None
        # Saving weights is not part of what a run computes: the pre-training keeps the key it has alone.
        alone = RunConfig(**{**pretraining.to_dict(), "save_weights": False})
        assert alone.key() == pretraining.key()
    # An entry named differently from its algorithm, with its own shots, starts from the same grid point's run.
    variants = [c for c in expand_suite(TWO_STAGE_SUITE) if c.train_ways == 5]
    assert [(c.algorithm, c.shots, c.init_from) for c in variants] == \
        [("protonet", 5, runs["baseline", 1].name), ("protonet", 5, runs["baseline", 5].name)]
    # The run named depends on the pre-training run's configuration (its name carries its key).
    changed = {**TWO_STAGE_SUITE, "algorithms": {**TWO_STAGE_SUITE["algorithms"], "baseline": {"steps": 3}}}
    assert {c.key() for c in expand_suite(changed) if c.algorithm == "protonet"}.isdisjoint(
        {c.key() for c in runs.values() if c.algorithm == "protonet"})
    # Narrowed to the episodic algorithm, it still names the pre-training run (whose record must exist).
    narrowed = expand_suite(TWO_STAGE_SUITE, ["protonet"])
    assert [c.init_from for c in narrowed] == [runs["baseline", 1].name, runs["baseline", 5].name]


@pytest.mark.parametrize("algorithms, message", [
    ({"protonet": {"init_from": "protonet"}}, "its own run"),
    ({"protonet": {"init_from": "matching"}, "matching": {"init_from": "baseline"}, "baseline": {}},
     "chains are not supported"),
])
def test_bad_init_from_in_a_suite_is_named(algorithms, message):
    with pytest.raises(ValueError, match=message):
        expand_suite({"name": "bad", "algorithms": algorithms})


def test_weights_round_trip_between_algorithms_and_mismatches_are_named(tmp_path):
    torch.manual_seed(0)
    baseline = algorithm_class("baseline")(train_classes=10)
    save_embedding(baseline, tmp_path, "pre")
    protonet = algorithm_class("protonet")()
    assert not torch.equal(next(protonet.encoder.parameters()), next(baseline.backbone.parameters()))
    provenance = load_embedding(protonet, tmp_path, "pre")
    for (name, mine), (_, theirs) in zip(protonet.encoder.state_dict().items(), baseline.backbone.state_dict().items()):
        assert torch.equal(mine, theirs), name  # parameters and BatchNorm running statistics
    assert provenance == {"from": "pre", "weights_sha1": hashlib.sha1(weights_path(tmp_path, "pre").read_bytes()).hexdigest()}

    with pytest.raises(ValueError, match="does not fit.*same backbone settings"):
        load_embedding(algorithm_class("protonet")(hidden=32), tmp_path, "pre")
    with pytest.raises(FileNotFoundError, match="no saved weights of run 'elsewhere'.*Run it first"):
        load_embedding(protonet, tmp_path, "elsewhere")
    weights_path(tmp_path, "broken").write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="not a weights file.*--force"):
        load_embedding(protonet, tmp_path, "broken")
    relation = algorithm_class("relation")()  # Conv-4's parameter names and shapes, other paddings and pooling
    load_embedding(relation, tmp_path, "pre")
    assert all(torch.equal(relation.encoder.state_dict()[name], tensor)
               for name, tensor in baseline.backbone.state_dict().items())
    with pytest.raises(ValueError, match="Reptile has no stand-alone embedding network"):
        save_embedding(algorithm_class("reptile")(), tmp_path, "reptile")


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "anil"])
def test_the_maml_family_starts_from_a_pretrained_backbone_without_its_running_statistics(tmp_path, algorithm):
    torch.manual_seed(0)
    baseline = algorithm_class("baseline")(train_classes=10)
    save_embedding(baseline, tmp_path, "pre")
    learner = algorithm_class(algorithm)()
    head = learner.network.head.weight.detach().clone()
    provenance = load_embedding(learner, tmp_path, "pre")
    pretrained = baseline.backbone.state_dict()
    loaded = learner.embedding_network().state_dict()
    assert loaded and all(torch.equal(tensor, pretrained[name]) for name, tensor in loaded.items())
    assert not any(name.endswith("running_mean") for name in loaded)  # MAML's BatchNorm uses batch statistics
    assert provenance["batchnorm_running_statistics"].startswith("dropped")
    assert torch.equal(learner.network.head.weight, head)  # the head is not part of the backbone
    # the other way, a batch-statistics backbone lacks what a running-statistics network needs: named, not guessed
    save_embedding(learner, tmp_path, "meta")
    with pytest.raises(ValueError, match="does not fit.*running_mean"):
        load_embedding(algorithm_class("protonet")(), tmp_path, "meta")


def test_a_run_starts_from_the_saved_weights_of_another_and_records_them(tmp_path: Path):
    pretraining = RunConfig(algorithm="baseline", save_weights=True,
                            dataset_args={"train_mode": "batches", "batch_size": 8}, **TINY)
    record = run(pretraining, tmp_path, progress=False)
    assert record["status"] == "ok" and record["weights"] == f"weights/{pretraining.name}.pt"
    saved = torch.load(tmp_path / record["weights"], weights_only=True)["state_dict"]

    episodic = RunConfig(algorithm="protonet", init_from=pretraining.name, **{**TINY, "steps": 1})
    started_from = {}
    import bench.runner as runner

    def load_and_capture(task, results, name):
        provenance = load_embedding(task, results, name)
        started_from.update({k: v.clone() for k, v in task.embedding_network().state_dict().items()})
        return provenance

    runner_load, runner.load_embedding = runner.load_embedding, load_and_capture
    try:
        second = run(episodic, tmp_path, progress=False)
    finally:
        runner.load_embedding = runner_load
    assert second["status"] == "ok" and second["init"]["from"] == pretraining.name
    assert second["init"]["weights_sha1"] == hashlib.sha1((tmp_path / record["weights"]).read_bytes()).hexdigest()
    assert all(torch.equal(started_from[name], tensor) for name, tensor in saved.items())
    assert "weights" not in second  # only runs asked to save their weights write them
