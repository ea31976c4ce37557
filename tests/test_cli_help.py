"""Every command's ``--help`` prints (argparse formats help strings with ``%``, so a bare ``95%`` breaks it)."""
from __future__ import annotations

import pytest

from bench.cli import main

COMMANDS = ["run", "suite", "leaderboard", "regress", "temperature", "compare", "wandb-sync", "report"]


@pytest.mark.parametrize("argv", [["--help"]] + [[command, "--help"] for command in COMMANDS])
def test_help_prints_and_names_the_commands(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m bench")
    if argv == ["--help"]:
        assert all(command in text for command in COMMANDS)
