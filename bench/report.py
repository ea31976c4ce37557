"""``make wandb-sync`` and ``make report``: upload offline W&B runs; a W&B report comparing a suite's algorithms.

Both need a W&B API key (``WANDB_API_KEY`` or ``wandb login``) and network; without them they say
so and exit, and the local leaderboard (``leaderboard/leaderboard.html``) holds the same comparison.
The report is defined in :func:`build_report` (``wandb-workspaces`` reports API): the leaderboard
table of the records, a bar chart of the mean test score per run, score vs training time, and the
runs table, all over the W&B runs of the suite's group.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.wandb_logging import offline_runs, online_problem, project_name, wandb_mode, wandb_root

LOCAL_LEADERBOARD = Path("leaderboard/leaderboard.html")


def unsynced_runs() -> list[Path]:
    """Offline run folders that ``wandb sync`` has not marked as synced yet."""
    return [folder for folder in offline_runs() if not list(folder.glob("*.wandb.synced"))]


def sync_offline_runs() -> int:
    runs = unsynced_runs()
    if not runs:
        print(f"no unsynced offline W&B runs under {wandb_root() / 'wandb'}: nothing to upload")
        return 0
    problem = online_problem()
    if problem:
        print(f"wandb-sync: {problem}. The {len(runs)} offline run(s) stay in {wandb_root() / 'wandb'} and can be "
              "uploaded later with `make wandb-sync`.", file=sys.stderr)
        return 1
    command = [str(Path(sys.executable).with_name("wandb")), "sync", *map(str, runs)]
    print(f"uploading {len(runs)} offline run(s) to project {project_name()!r} ...")
    return subprocess.run(command).returncode


def build_report(suite: str, entity: str, leaderboard_markdown: str):
    """The W&B report of ``suite`` (its runs are the W&B group of that name): a ``wandb_workspaces`` Report."""
    import wandb_workspaces.reports.v2 as wr

    runs = wr.Runset(entity=entity, project=project_name(), name=f"suite {suite}", filters=f"Group = '{suite}'",
                     groupby=["config.run.algorithm"])
    panels = [
        wr.BarPlot(title="mean test score per run (95% CI in the table below)", metrics=[wr.SummaryMetric("test/mean")],
                   orientation="h"),
        wr.ScatterPlot(title="test score vs training time (s)", x=wr.SummaryMetric("train/seconds"),
                       y=wr.SummaryMetric("test/mean"), log_x=True),
        wr.RunComparer(diff_only="split"),
    ]
    return wr.Report(
        entity=entity, project=project_name(), title=f"metabench: suite {suite}",
        description="Few-shot meta-learning algorithms on identical fixed test episodes (built by `make report`).",
        blocks=[
            wr.H1(text=f"metabench — suite {suite}"),
            wr.P(text="Every run was tested on the same fixed episodes; scores are means with 95% confidence "
                      "intervals. The table is the local leaderboard, built from the run records."),
            wr.MarkdownBlock(text=leaderboard_markdown),
            wr.PanelGrid(runsets=[runs], panels=panels),
        ],
    )


def leaderboard_tables(readme: Path) -> str:
    """The tables of the local leaderboard README (its images are local files: left out)."""
    if not readme.exists():
        return "(no local leaderboard yet: run `make leaderboard`)"
    return "\n".join(line for line in readme.read_text().splitlines() if not line.startswith("!["))


def report_command(suite: str, records: Path) -> int:
    mode = wandb_mode()
    problem = None if mode == "online" else f"WANDB_MODE={mode} (the report needs WANDB_MODE=online)"
    problem = problem or online_problem()
    if problem:
        print(f"report: no W&B report built: {problem}. The same comparison is in the local leaderboard: "
              f"open {LOCAL_LEADERBOARD.resolve()} in a browser (`make leaderboard` rebuilds it).")
        return 0
    import wandb

    entity = os.environ.get("WANDB_ENTITY") or wandb.Api().default_entity
    report = build_report(suite, entity, leaderboard_tables(records.parent / "README.md"))
    report.save()
    print(f"W&B report: {report.url}")
    return 0
