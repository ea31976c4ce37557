"""ProtoNet and MAML on EpisodicTask: math, gradients, evaluation mode, errors, end-to-end records."""
from __future__ import annotations

import json

import pytest
import torch

from bench.config import RunConfig
from bench.records import read_record
from bench.runner import run
from datamodules.episodes import Episode
from tasks import algorithm_class
from tasks.base import NonFiniteLossError, summarize_episodes
from tasks.maml import MAML
from tasks.protonet import ProtoNet, prototypes, squared_distances


def tiny_episode(tasks=2, ways=3, shots=2, queries=2, size=16, dtype=torch.float32, seed=0) -> Episode:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(tasks, ways, shots + queries, 1, size, size, generator=generator, dtype=dtype)
    return Episode.from_grouped(images, shots, torch.arange(tasks))


def test_prototypes_and_distances_match_a_direct_computation():
    support = torch.randn(2, 6, 4)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    centres = prototypes(support, labels, 3)
    for task in range(2):
        for cls in range(3):
            assert torch.allclose(centres[task, cls], support[task][labels[task] == cls].mean(0), atol=1e-6)
    queries = torch.randn(2, 5, 4)
    direct = ((queries.unsqueeze(2) - centres.unsqueeze(1)) ** 2).sum(-1)
    assert torch.allclose(squared_distances(queries, centres), direct, atol=1e-5)


def test_protonet_temperature_divides_the_logits_and_keeps_the_predictions():
    torch.manual_seed(0)
    plain, tempered = ProtoNet(image_size=16), ProtoNet(image_size=16, temperature=16.0)
    tempered.load_state_dict(plain.state_dict())
    episode = tiny_episode(ways=5, shots=2)
    with torch.no_grad():
        logits, scaled = plain.predict(episode), tempered.predict(episode)
    assert torch.allclose(scaled * 16.0, logits, rtol=1e-5, atol=1e-4)
    assert torch.equal(scaled.argmax(-1), logits.argmax(-1))
    with pytest.raises(ValueError, match="temperature must be positive"):
        ProtoNet(image_size=16, temperature=0.0)


def test_protonet_cosine_metric_scores_queries_by_the_angle_to_each_prototype():
    torch.manual_seed(0)
    task = ProtoNet(image_size=16, metric="cosine", temperature=0.1)
    episode = tiny_episode(ways=5, shots=2)
    task.eval()
    with torch.no_grad():
        logits = task.predict(episode)
        support, queries = task.embed(episode)
        centres = prototypes(support, episode.support_y, episode.ways)
    for t in range(logits.shape[0]):
        for q in range(logits.shape[1]):
            for c in range(logits.shape[2]):
                cosine = torch.nn.functional.cosine_similarity(queries[t, q], centres[t, c], dim=0)
                assert torch.allclose(logits[t, q, c], cosine / 0.1, atol=1e-4)
    assert logits.abs().max() <= 1 / 0.1 + 1e-4  # bounded by the scale, whatever the feature norms
    with pytest.raises(ValueError, match="unknown metric 'manhattan'.*'euclidean'.*'cosine'"):
        ProtoNet(image_size=16, metric="manhattan")


def test_maml_second_order_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    task = MAML(ways=3, hidden=3, image_size=16, inner_lr=0.3, inner_steps=2).double()
    episode = tiny_episode(dtype=torch.float64)
    loss, _ = task.training_loss(episode)
    loss.backward()
    parameter = task.network.head.weight
    eps = 1e-6
    for index in [(0, 0), (1, 2), (2, 1)]:
        with torch.no_grad():
            parameter[index] += eps
            plus = task.training_loss(episode)[0].item()
            parameter[index] -= 2 * eps
            minus = task.training_loss(episode)[0].item()
            parameter[index] += eps
        assert parameter.grad[index].item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-8)


def test_first_order_gradient_is_the_query_gradient_at_the_adapted_parameters():
    from torch.func import functional_call

    from tasks.inner_loop import adapt

    torch.manual_seed(0)
    second = MAML(ways=3, hidden=3, image_size=16, inner_steps=2).double()
    first = MAML(ways=3, hidden=3, image_size=16, inner_steps=2, first_order=True).double()
    first.load_state_dict(second.state_dict())
    episode = tiny_episode(dtype=torch.float64)
    for task in (first, second):
        task.training_loss(episode)[0].backward()
    expected = torch.zeros_like(first.network.head.weight)
    for t in range(episode.tasks):
        start = {k: v.detach() for k, v in first.network.named_parameters()}
        adapted = adapt(first.network, start, {}, episode.support_x[t], episode.support_y[t], first.loss_fn,
                        2, 0.4, first_order=True)
        adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
        loss = first.loss_fn(functional_call(first.network, adapted, (episode.query_x[t],)), episode.query_y[t])
        expected += torch.autograd.grad(loss, adapted["head.weight"])[0] / episode.tasks
    assert torch.allclose(first.network.head.weight.grad, expected, atol=1e-12)
    assert not torch.allclose(first.network.head.weight.grad, second.network.head.weight.grad, atol=1e-4)


def test_maml_evaluation_adapts_under_no_grad_and_keeps_no_graph():
    task = MAML(ways=3, hidden=4, image_size=16, test_inner_steps=3)
    episode = tiny_episode()
    with torch.no_grad():  # what Lightning does around validation/test steps
        outputs = task.predict(episode)
    assert outputs.shape == (2, 6, 3) and outputs.grad_fn is None and not outputs.requires_grad
    assert all(p.grad is None for p in task.parameters())
    # Adapting changes the prediction: three steps differ from zero steps.
    task.test_inner_steps = 0
    with torch.no_grad():
        assert not torch.allclose(task.predict(episode), outputs)


def test_nan_loss_raises_one_clear_error():
    task = ProtoNet(image_size=16)
    episode = tiny_episode(ways=5, shots=1)
    episode.query_x[:] = float("nan")
    task.log = lambda *args, **kwargs: None
    with pytest.raises(NonFiniteLossError, match="Lower the learning rate"):
        task.training_step(episode, 0)


def test_unknown_algorithm_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown algorithm 'mamll': choose one of .*maml.*protonet"):
        algorithm_class("mamll")


def test_summary_deduplicates_and_orders_by_episode_id():
    summary = summarize_episodes(torch.tensor([2, 0, 1, 2]), torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64))
    assert summary["episode_ids"] == [0, 1, 2] and summary["episode_scores"] == [0.0, 0.5, 1.0]
    assert summary["mean"] == pytest.approx(0.5) and summary["ci95"] == pytest.approx(1.96 * 0.5 / 3 ** 0.5)


TINY = dict(dataset="omniglot", ways=5, shots=1, queries=5, meta_batch=2, eval_batch=10, steps=4, val_every=2,
            val_episodes=10, test_episodes=20, seed=7, threads=1)


@pytest.mark.parametrize("algorithm, hparams", [("protonet", {"hidden": 16}), ("maml", {"hidden": 8})])
def test_tiny_end_to_end_run_writes_a_valid_deterministic_record(tmp_path, algorithm, hparams):
    config = RunConfig(algorithm=algorithm, hparams=hparams, **TINY)
    record = run(config, tmp_path / "a", progress=False)
    path = tmp_path / "a" / f"{config.name}.json"
    saved = read_record(path)
    assert saved == json.loads(json.dumps(record))
    assert saved["status"] == "ok" and saved["key"] == config.key() and saved["metric"] == "acc"
    test = saved["test"]
    assert test["episodes"] == 20 and test["episode_ids"] == list(range(20))
    assert 0.0 <= test["mean"] <= 1.0 and test["ci95"] > 0
    assert saved["train"]["steps"] == 4 and saved["train"]["episodes_per_s"] > 0
    assert [v["step"] for v in saved["train"]["validations"]] == [2, 4]  # the validation curve, val_every=2
    assert all(0.0 <= v["val/acc"] <= 1.0 for v in saved["train"]["validations"])
    assert len(test["episodes_sha1"]) == 16
    for field in ("git", "versions", "hardware", "peak_memory_bytes", "wall_time_s", "config", "seed"):
        assert field in saved
    again = run(config, tmp_path / "b", progress=False)
    assert again["test"]["episode_scores"] == test["episode_scores"]  # same seed, same CPU result


def test_background_run_prints_a_heartbeat_with_the_time_left(tmp_path, monkeypatch, capsys):
    from bench import runner

    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 0.0)  # a line after every step and test batch
    record = run(RunConfig(algorithm="protonet", hparams={"hidden": 8}, **TINY), tmp_path, progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[metabench] t")]
    train = [line for line in lines if " train step " in line]
    assert [line.split()[3] for line in train] == ["1/4", "2/4", "3/4", "4/4"]
    assert "(100%)" in train[-1] and "steps/s" in train[-1] and train[-1].endswith("~0s left")
    assert [line.split()[3] for line in lines if " test batch " in line] == ["1/2,", "2/2,"]
    assert record["hardware"]["kernel_family"] == runner.hardware(torch.device("cpu"))["kernel_family"]


def test_failed_run_is_recorded_with_its_error(tmp_path):
    config = RunConfig(algorithm="protonet", hparams={"no_such_argument": 1}, **TINY)
    with pytest.raises(ValueError, match="does not take"):
        run(config, tmp_path, progress=False)
    saved = read_record(tmp_path / f"{config.name}.json")
    assert saved["status"] == "failed" and "no_such_argument" in saved["error"]


def test_first_order_adaptation_keeps_frozen_parameters_out_of_the_inner_gradient():
    """FOMAML with frozen parameters (ANIL's body): the outer gradient of the frozen parameters is only
    their direct effect on the query loss, never through the inner gradients."""
    from torch.func import functional_call

    from tasks.inner_loop import adapt

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    params = dict(net.named_parameters())
    frozen = {k: v for k, v in params.items() if k.startswith("0.")}
    fast = {k: v for k, v in params.items() if k.startswith("2.")}
    x, y = torch.rand(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss_fn = torch.nn.functional.cross_entropy
    adapted = adapt(net, fast, frozen, x, y, loss_fn, 2, 0.5, first_order=True)
    ours = torch.autograd.grad(loss_fn(functional_call(net, {**frozen, **adapted}, (x,)), y), list(frozen.values()))
    # Reference: adapted = theta_fast + constant; frozen enters the query loss directly only.
    constant = {k: (adapted[k] - fast[k]).detach() for k in fast}
    direct = {k: fast[k] + constant[k] for k in fast}
    reference = torch.autograd.grad(loss_fn(functional_call(net, {**frozen, **direct}, (x,)), y), list(frozen.values()))
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, atol=1e-14)
