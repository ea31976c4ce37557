"""``python -m bench compare``: two runs paired by test episode, and one clear error where they cannot be."""
from __future__ import annotations

import pytest

from bench.cli import main
from bench.compare import compare_records, find_record
from test_leaderboard import add_record, scores


def test_paired_difference_wins_and_verdict(tmp_path, capsys):
    base = scores(0.80)
    better = [min(1.0, s + 0.05) for s in base[:90]] + base[90:]  # 90 episodes gain 5 points, 10 are unchanged
    a = add_record(tmp_path, "maml", better, steps=200)
    b = add_record(tmp_path, "maml", base, steps=100)
    comparison = compare_records(a, b)
    gains = [x - y for x, y in zip(better, base)]
    assert comparison.episodes == 100
    assert comparison.mean_difference == pytest.approx(sum(gains) / 100)
    assert comparison.a_higher == sum(g > 0 for g in gains) and comparison.b_higher == 0
    assert 0 < comparison.ci95 < comparison.mean_difference and comparison.p_value < 1e-6
    assert comparison.verdict.startswith("a is better")

    assert main(["compare", a["key"], b["name"], "--records", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"a: {a['name']}" in printed and f"b: {b['name']}" in printed and "200 steps × 4" in printed
    assert f"a - b: +{100 * comparison.mean_difference:.4g} points" in printed
    assert "a is better" in printed


def test_lower_mse_wins_and_equal_runs_are_not_different(tmp_path):
    fields = dict(metric="mse", dataset="sinusoid", dataset_args={}, ways=1, shots=10)
    low = add_record(tmp_path, "maml", scores(0.5, spread=0.4), **fields)
    high = add_record(tmp_path, "pretrained", scores(2.5, spread=1.0), **fields)
    assert compare_records(low, high).verdict.startswith("a is better")
    assert compare_records(high, low).verdict.startswith("b is better")
    twin = add_record(tmp_path, "maml", scores(0.5, spread=0.4), seed=1, **fields)
    same = compare_records(low, twin)
    assert same.p_value == 1.0 and same.mean_difference == 0 and "no significant difference" in same.verdict


def test_runs_are_found_by_key_name_prefix_or_path(tmp_path):
    record = add_record(tmp_path, "protonet", scores(0.9))
    add_record(tmp_path, "maml", scores(0.9))
    path = tmp_path / f"{record['name']}.json"
    for reference in (record["key"], record["name"], "protonet-omniglot", str(path)):
        assert find_record(reference, tmp_path)["key"] == record["key"]


@pytest.mark.parametrize("case, expected", [
    ("other protocol", "tested on different episodes"),
    ("failed run", "has no test result (status failed: NonFiniteLossError"),
    ("ambiguous", "matches 2 records"),
    ("unknown", "give a run key"),
])
def test_runs_that_cannot_be_compared_get_one_clear_error(tmp_path, capsys, case, expected):
    one_shot = add_record(tmp_path, "protonet", scores(0.9))
    five_shot = add_record(tmp_path, "protonet", scores(0.95), shots=5)
    failed = add_record(tmp_path, "relation", [], status="failed", test_episodes=100)
    pairs = {"other protocol": (one_shot["key"], five_shot["key"]), "failed run": (failed["key"], one_shot["key"]),
             "ambiguous": ("protonet", one_shot["key"]), "unknown": ("siamese", one_shot["key"])}
    assert main(["compare", *pairs[case], "--records", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and expected in error and "Traceback" not in error
