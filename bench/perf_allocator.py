"""``make perf-allocator``: training steps with glibc's default allocator vs ``bench/allocator.py``'s setting.

The setting is process-wide and cannot be undone, so each measurement runs in its own child process;
the two settings alternate round by round (load from other processes hits both alike). Each child times
our ProtoNet 20w5s15q step, our FOMAML 5w1s meta-iteration (meta-batch 32) and the one-batch supervised
proxy (that meta-batch's 2560 images in one batch), workloads of ``make perf``, and learn2learn's ProtoNet
step on the same images, to show whether the setting helps any PyTorch program on CPU or ours alone. Writes ``OUT/NAME.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.allocator import DEFAULT, ENVIRONMENT_VARIABLE, RETAIN
from bench.records import git_state, hardware, now_iso, package_versions, write_record

WORKLOADS = ("ours ProtoNet 20w5s15q", "learn2learn ProtoNet 20w5s15q", "ours FOMAML 5w1s15q, meta-batch 32",
             "proxy: one supervised batch of that meta-batch")


def child(setting: str, steps: int, threads: int) -> dict[str, float]:
    """In this process (already configured for ``setting``): median seconds per step of each workload."""
    from bench.allocator import configure_allocator
    from bench.perf import _datamodule
    from bench.perf_training import l2l_protonet, our_maml, our_protonet, supervised_proxy

    torch.set_num_threads(threads)
    if configure_allocator() != setting:
        raise RuntimeError(f"allocator setting {setting!r} could not be applied in this process")
    cpu = torch.device("cpu")
    twenty_way, five_way = _datamodule("omniglot", 1, 20, 5, 15), _datamodule("omniglot", 32, 5, 1, 15)
    steps_by_name = {WORKLOADS[0]: our_protonet(twenty_way, 64, cpu)[1],
                     WORKLOADS[1]: l2l_protonet(twenty_way, 64, cpu),
                     WORKLOADS[2]: our_maml(five_way, 32, 64, True, cpu, vectorize=False)[1],
                     WORKLOADS[3]: supervised_proxy(five_way, 32, 64, cpu, per_task=False)}
    medians = {}
    for name, step in steps_by_name.items():
        step()  # warm-up
        seconds = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - started)
        medians[name] = statistics.median(seconds)
    return medians


def benchmark(args: argparse.Namespace) -> dict:
    """Alternate child processes of both settings for ``args.rounds`` rounds; write and return the result."""
    rounds: dict[str, list[dict[str, float]]] = {DEFAULT: [], RETAIN: []}
    load_before = os.getloadavg()
    for round_index in range(args.rounds):
        for setting in (DEFAULT, RETAIN) if round_index % 2 == 0 else (RETAIN, DEFAULT):
            command = [sys.executable, "-m", "bench.perf_allocator", "--child", setting, "--steps", str(args.steps),
                       "--threads", str(args.threads)]
            output = subprocess.run(command, env={**os.environ, ENVIRONMENT_VARIABLE: setting}, check=True,
                                    capture_output=True, text=True).stdout
            rounds[setting].append(json.loads(output.strip().splitlines()[-1]))
            print(f"round {round_index + 1}/{args.rounds} {setting}: {rounds[setting][-1]}", flush=True)
    medians = {setting: {name: statistics.median(r[name] for r in results) for name in WORKLOADS}
               for setting, results in rounds.items()}
    result = {"created": now_iso(), "git": git_state(), "versions": package_versions(),
              "hardware": {**hardware(torch.device("cpu")), "torch_threads": args.threads},
              "settings": {"rounds": args.rounds, "steps": args.steps, "threads": args.threads},
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "rounds": rounds, "median_seconds": medians,
              "speedup": {name: medians[DEFAULT][name] / medians[RETAIN][name] for name in WORKLOADS}}
    args.out.mkdir(parents=True, exist_ok=True)
    write_record(args.out / f"{args.name}.json", result)
    (args.out / f"{args.name}.md").write_text(render(result))
    return result


def render(result: dict) -> str:
    hw, settings = result["hardware"], result["settings"]
    lines = [f"# Memory allocator: glibc's default vs keeping freed memory in the process\n",
             f"`make perf-allocator` on {result['created']}: {hw.get('cpu_model')} ({hw.get('cpu_count')} CPUs, "
             f"{settings['threads']} torch threads), torch {result['versions'].get('torch')}, commit "
             f"{(result['git'].get('commit') or 'unknown')[:10]}. {settings['rounds']} rounds, each a fresh process "
             f"per setting (alternating), median of {settings['steps']} steps after one warm-up step per workload; "
             f"the table gives the median over rounds. Load average "
             f"{'/'.join(f'{x:.2f}' for x in result['load_average_before'])} before, "
             f"{'/'.join(f'{x:.2f}' for x in result['load_average_after'])} after. Setting: `bench/allocator.py` (opt-in for `bench run` "
             f"processes: `{ENVIRONMENT_VARIABLE}=retain`).\n",
             "| workload | glibc default, s | retained, s | speed-up |", "|---|---:|---:|---:|"]
    for name in WORKLOADS:
        lines.append(f"| {name} | {result['median_seconds'][DEFAULT][name]:.3f} | "
                     f"{result['median_seconds'][RETAIN][name]:.3f} | {result['speedup'][name]:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("leaderboard"))
    parser.add_argument("--name", default="perf-allocator")
    parser.add_argument("--child", choices=(DEFAULT, RETAIN), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads)))
    else:
        print(render(benchmark(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
