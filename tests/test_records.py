"""Run records: atomic writes under concurrent writers, and corrupt/partial/duplicate records reported by name."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from bench.config import RunConfig
from bench.records import (SCHEMA, CorruptRecordError, read_record, record_key_from_filename, scan_records,
                           write_record)


def make_record(config: RunConfig, padding: int = 0) -> dict:
    return {"schema": SCHEMA, "status": "ok", "key": config.key(), "name": config.name, "config": config.to_dict(),
            "padding": "x" * padding}


def _hammer(path: str, writer: int, count: int) -> None:
    config = RunConfig(algorithm="protonet")
    for index in range(count):  # records of very different sizes, so a torn write would show
        write_record(Path(path), {**make_record(config, padding=(writer * 7919 + index * 104729) % 200_000),
                            "writer": writer, "index": index})


def test_concurrent_writers_never_leave_a_partial_record(tmp_path):
    path = tmp_path / "run.json"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_hammer, args=(str(path), writer, 40)) for writer in range(4)]
    for process in writers:
        process.start()
    reads = 0
    while any(process.is_alive() for process in writers):
        if path.exists():
            record = read_record(path)  # raises CorruptRecordError on a torn or partial file
            assert record["key"] == RunConfig(algorithm="protonet").key()
            reads += 1
    for process in writers:
        process.join()
        assert process.exitcode == 0
    assert reads > 0
    final = read_record(path)
    assert final["index"] == 39  # the last write of one of the writers won, whole
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary files left behind


def test_partial_and_incomplete_records_are_named(tmp_path):
    partial = tmp_path / "partial.json"
    partial.write_text('{"schema": 1, "status": "o')
    with pytest.raises(CorruptRecordError, match="partial.json: unreadable record.*delete it"):
        read_record(partial)
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"schema": 1, "status": "ok"}))
    with pytest.raises(CorruptRecordError, match=r"lacks \['key', 'config'\]"):
        read_record(incomplete)


def test_scan_reports_every_problem_and_keys_records(tmp_path):
    good, other = RunConfig(algorithm="protonet"), RunConfig(algorithm="maml")
    write_record(tmp_path / f"{good.name}.json", make_record(good))
    write_record(tmp_path / f"copy-{good.key()}.json", make_record(good))  # the same run twice
    write_record(tmp_path / f"maml-{'0' * 12}.json", make_record(other))  # name and key disagree
    (tmp_path / f"broken-{'a' * 12}.json").write_text("{")
    (tmp_path / f".{good.name}.json.abc123.tmp").write_text("{")  # a write in progress: not a record
    found, problems = scan_records(tmp_path)
    assert list(found) == [good.key()]
    assert len(problems) == 3
    assert any("broken" in p and "unreadable" in p for p in problems)
    assert any("duplicate" in p for p in problems)
    assert any("file name says key 000000000000" in p for p in problems)
    assert scan_records(tmp_path / "absent") == ({}, [])


def test_record_key_from_filename():
    config = RunConfig(algorithm="protonet")
    assert record_key_from_filename(f"{config.name}.json") == config.key()
    assert record_key_from_filename("notes.json") is None


def test_where_a_run_executes_does_not_change_its_key():
    base = RunConfig(algorithm="maml")
    for where in ({"devices": 4}, {"num_nodes": 2}, {"threads": 1}, {"accelerator": "gpu"}, {"suite": "other"}):
        assert RunConfig(algorithm="maml", **where).key() == base.key(), where
    assert RunConfig(algorithm="maml", steps=7).key() != base.key()


def test_precision_is_part_of_the_key_only_when_not_the_float32_default():
    base = RunConfig(algorithm="maml")
    assert RunConfig(algorithm="maml", precision="32").key() == base.key()  # records from before the field
    assert "precision" not in json.dumps(base.key())
    mixed = RunConfig(algorithm="maml", precision="bf16-mixed")
    assert mixed.key() != base.key() and RunConfig.from_dict(mixed.to_dict()).key() == mixed.key()
    with pytest.raises(ValueError, match="unknown precision 'bf16'.*bf16-mixed"):
        RunConfig(algorithm="maml", precision="bf16")


def test_an_unset_meta_batch_is_the_algorithms_own_and_keys_by_its_value():
    # One episode per step unless the paper batches tasks: MAML's family 32 (Finn et al.), Reptile 5 (Nichol et al.).
    defaults = {name: RunConfig(algorithm=name).meta_batch for name in ("protonet", "relation", "baselinepp",
                                                                         "metalstm", "maml", "fomaml", "reptile")}
    assert defaults == {"protonet": 1, "relation": 1, "baselinepp": 1, "metalstm": 1, "maml": 32, "fomaml": 32,
                        "reptile": 5}
    assert RunConfig(algorithm="protonet", meta_batch=1).key() == RunConfig(algorithm="protonet").key()
    assert RunConfig(algorithm="protonet", meta_batch=4).meta_batch == 4
    assert RunConfig.from_dict(RunConfig(algorithm="maml").to_dict()).key() == RunConfig(algorithm="maml").key()
    with pytest.raises(ValueError, match="unknown algorithm 'mamll': choose one of .*maml"):
        RunConfig(algorithm="mamll")
