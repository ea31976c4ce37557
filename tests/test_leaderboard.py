"""The leaderboard is a pure function of the records: tables per protocol, paper numbers, paired tests, files."""
from __future__ import annotations

import csv
import io
import statistics

import pytest

from bench.config import RunConfig
from bench.leaderboard import PAPERS, build_leaderboard, collect, load_papers
from bench.leaderboard_render import render_markdown
from bench.records import SCHEMA, write_record
from bench.seeds import seed_groups


def scores(base: float, count: int = 100, spread: float = 0.2) -> list[float]:
    return [min(1.0, max(0.0, base + spread * (((i * 37) % 11) / 10 - 0.5))) for i in range(count)]


def add_record(folder, algorithm, values, metric="acc", status="ok", episodes_sha1="e" * 16, **fields) -> dict:
    config = RunConfig(**{"algorithm": algorithm, "dataset": "omniglot", "dataset_args": {"split": "vinyals"},
                          "test_episodes": len(values), "steps": 100, "meta_batch": 4, "suite": "unit", **fields})
    record = {"schema": SCHEMA, "status": status, "key": config.key(), "name": config.name,
              "config": config.to_dict(), "metric": metric, "wall_time_s": 12.0,
              "hardware": {"cpu": "x86_64", "cpu_model": "Test CPU", "torch_threads": 1, "device": "cpu"}}
    if status == "ok":
        record.update(test={"mean": sum(values) / len(values), "ci95": 0.01, "std": 0.05, "episodes": len(values),
                            "episode_ids": list(range(len(values))), "episode_scores": values,
                            "episodes_sha1": episodes_sha1},
                      train={"steps": 100, "seconds": 10.0 + len(algorithm), "episodes_per_s": 40.0})
    else:
        record["error"] = "NonFiniteLossError: loss became nan at step 3"
    write_record(folder / f"{config.name}.json", record)
    return record


@pytest.fixture
def records(tmp_path):
    folder = tmp_path / "records"
    add_record(folder, "protonet", scores(0.98, spread=0.04))
    add_record(folder, "maml", scores(0.90))
    add_record(folder, "matching", scores(0.98, spread=0.04), seed=1)  # identical episodes' scores: p = 1
    add_record(folder, "relation", [], status="failed", test_episodes=100)
    add_record(folder, "maml", scores(0.5, spread=0.4), metric="mse", dataset="sinusoid", dataset_args={},
               ways=1, shots=10)
    add_record(folder, "pretrained", scores(2.5, spread=1.0), metric="mse", dataset="sinusoid", dataset_args={},
               ways=1, shots=10)
    add_record(folder, "protonet", scores(0.7), shots=5)  # another protocol: its own table
    (folder / f"half-{'b' * 12}.json").write_text('{"schema": 1, "status": "ok", "key"')
    return folder


def test_tables_group_by_protocol_rank_and_test_against_the_best(records):
    board = collect(records, load_papers())
    slugs = [table.slug for table in board.tables]
    assert slugs == ["omniglot-vinyals-5w1s-15q-100ep", "omniglot-vinyals-5w5s-15q-100ep", "sinusoid-1w10s-15q-100ep"]
    omniglot = board.tables[0]
    assert [e.algorithm for e in omniglot.entries][2] == "maml"
    assert omniglot.entries[0].p_vs_best is None and omniglot.entries[1].p_vs_best == 1.0
    assert omniglot.entries[2].p_vs_best < 1e-6
    protonet = next(e for e in omniglot.entries if e.algorithm == "protonet")
    assert (protonet.paper.value, protonet.paper.cite) == (98.8, "snell2017")
    assert protonet.paper_difference == pytest.approx(100 * protonet.mean - 98.8)
    assert "relation" in omniglot.references  # published, not run in this table
    sinusoid = board.tables[2]
    assert [e.algorithm for e in sinusoid.entries] == ["maml", "pretrained"]  # MSE: lower is better
    assert [r["config"]["algorithm"] for r in board.failed] == ["relation"]
    assert len(board.problems) == 1 and "half-bbbbbbbbbbbb.json" in board.problems[0]


def test_leaderboard_files(records, tmp_path):
    out = tmp_path / "board"
    assert build_leaderboard(records, out, wandb_group=None) == 0
    readme = (out / "README.md").read_text()
    assert "## omniglot (split=vinyals): 5-way 1-shot — 15 queries/class, 100 test episodes (accuracy %)" in readme
    best_row = next(line for line in readme.splitlines() if line.startswith("| 1 | matching"))
    protonet_row = next(line for line in readme.splitlines() if line.startswith("| 2 | protonet"))  # tie: by name
    assert "98.1 [vinyals2016]" in best_row and "| best |" in best_row
    assert "98.8 [snell2017]" in protonet_row and "100 × 4" in protonet_row and "Test CPU, 1 thr" in protonet_row
    assert "| 1.000 |" in protonet_row
    assert "## Failed runs" in readme and "NonFiniteLossError" in readme
    assert "## Records that could not be used" in readme and "half-bbbbbbbbbbbb.json" in readme
    assert "[snell2017] Snell, Swersky & Zemel (2017)" in readme
    rows = list(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text())))
    assert len(rows) == 6 and {row["table"] for row in rows} == {"omniglot-vinyals-5w1s-15q-100ep",
                                                               "omniglot-vinyals-5w5s-15q-100ep",
                                                               "sinusoid-1w10s-15q-100ep"}
    page = (out / "leaderboard.html").read_text()
    assert page.count('<table class="sortable">') == 3 and "addEventListener('click'" in page
    assert page.count("data:image/png;base64,") == 6 and "src=\"http" not in page  # self-contained
    plots = sorted(path.name for path in (out / "plots").iterdir())
    assert len(plots) == 6 and all((out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in plots)
    assert "![omniglot-vinyals-5w1s-15q-100ep-scores](plots/omniglot-vinyals-5w1s-15q-100ep-scores.png)" in readme


def test_same_records_give_the_same_files(records, tmp_path):
    build_leaderboard(records, tmp_path / "a", wandb_group=None)
    build_leaderboard(records, tmp_path / "b", wandb_group=None)
    for name in ("README.md", "leaderboard.csv", "leaderboard.html"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_papers_file_is_valid_and_bad_entries_are_named(tmp_path):
    papers = load_papers(PAPERS)
    assert papers["benchmarks"]["omniglot-vinyals"]["results"]["20w5s"]["maml"]["value"] == 98.9
    bad = tmp_path / "papers.yaml"
    bad.write_text("citations: {a: A}\nbenchmarks:\n  x:\n    match: {dataset: omniglot}\n"
                   "    results: {5w1s: {protonet: {value: 1, cite: nope}}}\n")
    with pytest.raises(ValueError, match="x/5w1s/protonet needs"):
        load_papers(bad)


def test_runs_on_default_episodes_share_a_table_and_training_only_arguments_do_not_split_it(tmp_path):
    add_record(tmp_path, "maml", scores(0.9), dataset_args={})  # split defaults to vinyals
    add_record(tmp_path, "baselinepp", scores(0.8), dataset_args={"split": "vinyals", "train_mode": "batches",
                                                                   "batch_size": 16})
    add_record(tmp_path, "protonet", scores(0.9), dataset_args={"split": "lake"})
    board = collect(tmp_path, load_papers())
    assert [t.slug for t in board.tables] == ["omniglot-lake-5w1s-15q-100ep", "omniglot-vinyals-5w1s-15q-100ep"]
    vinyals = board.tables[1]
    assert sorted(e.algorithm for e in vinyals.entries) == ["baselinepp", "maml"]
    assert next(e for e in vinyals.entries if e.algorithm == "maml").paper.value == 98.7
    assert next(e for e in vinyals.entries if e.algorithm == "baselinepp").budget == "100 × batch 16"
    assert board.tables[0].entries[0].paper is None  # no published Lake 5-way number


def test_training_column_tells_apart_runs_of_one_table(tmp_path):
    add_record(tmp_path, "protonet", scores(0.9), ways=20, train_ways=30, train_queries=5,
               hparams={"temperature": 16.0, "lr": 0.01, "metric": "cosine"},
               dataset_args={"split": "lake", "train_rotations": True, "affine_augmentation": True})
    add_record(tmp_path, "maml", scores(0.8), ways=20, train_ways=20, dataset_args={"split": "lake", "download": False})
    add_record(tmp_path, "matching", scores(0.85), ways=20, init_from="baseline-omniglot-lake-20w1s-seed0-0123456789ab",
               hparams={"cosine_scale": 100.0, "full_context": False}, dataset_args={"split": "lake"})
    add_record(tmp_path, "baselinepp", scores(0.7), ways=20, suite=None,
               dataset_args={"split": "lake", "train_mode": "batches", "batch_size": 16, "crop_padding": 4})
    (table,) = collect(tmp_path, load_papers()).tables
    training = {entry.algorithm: entry.training for entry in table.entries}
    assert training == {"protonet": "unit, train 30w1s5q, affine_augmentation, train_rotations, metric cosine, "
                                    "temperature 16",
                        "maml": "unit", "baselinepp": "adhoc, crop_padding=4",
                        "matching": "unit, cosine_scale 100, backbone from baseline run 0123456789ab"}
    markdown = render_markdown(collect(tmp_path, load_papers()), [], tmp_path)
    assert "| unit, train 30w1s5q, affine_augmentation, train_rotations, metric cosine, temperature 16 |" in markdown


def test_runs_on_different_episode_sets_never_share_a_table(tmp_path):
    add_record(tmp_path, "protonet", scores(0.98), episodes_sha1="a" * 16)
    add_record(tmp_path, "maml", scores(0.90), episodes_sha1="b" * 16)  # same protocol, other sampler version
    add_record(tmp_path, "matching", scores(0.90), episodes_sha1="")  # recorded before fingerprints
    board = collect(tmp_path, load_papers())
    assert [(t.slug, [e.algorithm for e in t.entries]) for t in board.tables] == [
        ("omniglot-vinyals-5w1s-15q-100ep-aaaaaaaa", ["protonet"]),
        ("omniglot-vinyals-5w1s-15q-100ep-bbbbbbbb", ["maml"])]
    assert all(t.title.endswith(f"episode set {t.key[-1][:8]}") for t in board.tables)
    assert len(board.problems) == 1 and "matching" in board.problems[0] and "fingerprint" in board.problems[0]


def test_lake_within_alphabet_table_reports_error_rates_next_to_lake_and_koch(tmp_path):
    add_record(tmp_path, "protonet", scores(0.95, spread=0.04), ways=20,
               dataset_args={"split": "lake", "within_alphabet": True})
    board = collect(tmp_path, load_papers())
    (table,) = board.tables
    assert table.error_rate and "error rate %, lower is better" in table.title
    (entry,) = table.entries
    assert entry.shown_mean == pytest.approx(100 * (1 - entry.mean))
    assert {name: number.value for name, number in table.references.items()} == {"human": 4.5, "siamese": 8.0}


def test_validation_curves_are_plotted_against_training_time_where_runs_logged_them(records, tmp_path):
    from bench.leaderboard import Entry
    from bench.plots import validation_curve

    curve = add_record(records, "anil", scores(0.8))
    curve["train"]["validations"] = [{"step": 50, "val/acc": 0.6}, {"step": 100, "val/acc": 0.75}]
    write_record(records / f"{curve['name']}.json", curve)
    times, values = validation_curve(Entry(curve))
    assert times == pytest.approx([7.0, 14.0]) and values == pytest.approx([60.0, 75.0])  # 14 s of training
    assert validation_curve(Entry(curve, error_rate=True))[1] == pytest.approx([40.0, 25.0])
    assert validation_curve(Entry({**curve, "train": {**curve["train"], "validations": []}})) == ([], [])

    out = tmp_path / "board"
    build_leaderboard(records, out, wandb_group=None)
    curves = sorted(path.name for path in (out / "plots").glob("*-curves.png"))
    assert curves == ["omniglot-vinyals-5w1s-15q-100ep-curves.png"]  # only that table has a run with a curve
    assert "(plots/omniglot-vinyals-5w1s-15q-100ep-curves.png)" in (out / "README.md").read_text()


def test_a_paper_note_shared_by_several_runs_is_printed_once_under_its_table(tmp_path):
    for seed in range(3):
        add_record(tmp_path, "protonet", scores(0.45), seed=seed, dataset="miniimagenet", dataset_args={"split": "ravi"})
    (table,) = collect(tmp_path, load_papers()).tables
    assert len(table.entries) == 3 and all(e.paper.note for e in table.entries)
    markdown = render_markdown(collect(tmp_path, load_papers()), [], tmp_path)
    assert markdown.count("\\* protonet: trained 30-way 15 queries (Snell et al. Table 2)") == 1


def test_runs_that_differ_only_in_an_optimiser_setting_show_it_in_the_training_column(tmp_path):
    add_record(tmp_path, "protonet", scores(0.9), hparams={"lr": 0.001, "temperature": 64})
    add_record(tmp_path, "protonet", scores(0.8), hparams={"lr": 0.0001, "temperature": 64})
    add_record(tmp_path, "protonet", scores(0.7), hparams={"temperature": 64, "lr_decay": 0.5})
    add_record(tmp_path, "maml", scores(0.85), hparams={"lr": 0.001})  # alone in its group: nothing added
    (table,) = collect(tmp_path, load_papers()).tables
    training = sorted(entry.training for entry in table.entries)
    assert training == ["unit", "unit, temperature 64, lr 0.0001, lr_decay default",
                        "unit, temperature 64, lr 0.001, lr_decay default", "unit, temperature 64, lr default, lr_decay 0.5"]


def test_a_distinguishing_boolean_hyper_parameter_reads_true_or_false(tmp_path):
    add_record(tmp_path, "matching", scores(0.9), hparams={"full_context": True})
    add_record(tmp_path, "matching", scores(0.8), hparams={"full_context": False})
    (table,) = collect(tmp_path, load_papers()).tables
    assert sorted(entry.training for entry in table.entries) == ["unit, full_context false", "unit, full_context true"]


def test_one_recipe_at_several_seeds_gets_its_spread_over_seeds(tmp_path):
    folder = tmp_path / "records"
    means = {0: 0.90, 1: 0.86, 2: 0.88}
    for seed, base in means.items():
        add_record(folder, "maml", scores(base, spread=0.04), seed=seed)
    add_record(folder, "maml", scores(0.95, spread=0.04), steps=400)  # another recipe, one seed: no spread row
    add_record(folder, "protonet", scores(0.97, spread=0.04))
    table = collect(folder, load_papers()).tables[0]
    groups = seed_groups(table)
    assert len(groups) == 1 and [e.config["seed"] for e in groups[0].entries] == [0, 1, 2]
    shown = [100 * e.mean for e in groups[0].entries]
    assert groups[0].mean == pytest.approx(sum(shown) / 3)
    assert groups[0].std == pytest.approx(statistics.stdev(shown))
    out = tmp_path / "board"
    build_leaderboard(folder, out, wandb_group=None)
    readme = (out / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| maml | 3 |"))
    assert f"{groups[0].mean:.2f} ± {groups[0].std:.2f}" in row and f"0: {shown[0]:.2f}, 1: {shown[1]:.2f}" in row and "100 × 4" in row
    assert readme.count("Across training seeds: the runs above") == 1
    assert (out / "leaderboard.html").read_text().count('<table class="sortable">') == 2
