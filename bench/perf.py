"""``make perf`` / ``make perf-data``: metabench against learn2learn 0.2.0, side by side, as ratios.

A benchmark, not a test. In one process, with all workloads interleaved round by round (see
:mod:`bench.perf_timing`), it measures

* episodes per second of our sampler (indices; indices plus pixels on the device) and of
  learn2learn's TaskDataset (over the same decoded images; and its stock Omniglot pipeline), for
  Omniglot 5-way 1-shot 15-query and miniImageNet 5-way 5-shot 15-query (:mod:`bench.perf_sampling`);
* seconds per end-to-end meta-iteration of MAML (second order) and FOMAML -- Omniglot 5w1s15q,
  meta-batch 32, Conv-4 with 64 filters, one inner step -- and of Prototypical Networks (20-way 5-shot
  episodes), ours and learn2learn's, plus the plain supervised proxy on the same images and the
  ablations of our optimisations (:mod:`bench.perf_training`);
* peak memory of every workload, and the largest difference between our and learn2learn's
  meta-gradients on one meta-batch (the optimisations change speed, not results).

It writes ``leaderboard/perf.json`` (every timing) and ``leaderboard/perf.md`` (rendered from it by
:mod:`bench.perf_report`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from bench.perf_report import SECOND_ORDER_LAYOUT_ABLATIONS, render
from bench.perf_sampling import l2l_stock_omniglot_taskset, sampler_workloads
from bench.perf_timing import Workload, interleaved, peak_memory, ratio, summary
from bench.perf_training import (l2l_maml, l2l_protonet, our_maml, our_protonet, same_meta_gradient,
                                 supervised_proxy)
from bench.records import git_state, hardware, now_iso, package_versions, write_record
from datamodules.download import DataError
from datamodules.miniimagenet import MiniImageNetDataModule
from datamodules.omniglot import OmniglotDataModule

SCHEMA = 1
# (record key, display name, first order) of the two MAML variants every section times.
MAML_VARIANTS = (("maml", "MAML", False), ("fomaml", "FOMAML", True))
TARGETS = {"maml": 3.0, "fomaml": 3.0, "protonet": 3.0, "sampler": 1000.0, "fomaml_over_proxy": 1.5}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if args.threads:
                torch.set_num_threads(args.threads)
            benchmark(args)
    finally:
        torch.set_num_threads(threads)
    return 0


def benchmark(args: argparse.Namespace) -> dict:
    """Run the requested sections, write ``OUT/NAME.json`` and ``OUT/NAME.md``, print the report."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    result = {"schema": SCHEMA, "created": now_iso(), "git": git_state(), "versions": package_versions(),
              "hardware": hardware(device),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "load_average_before": _load_average(), "targets": TARGETS}
    say = (lambda message: None) if args.quiet else \
        (lambda message: print(f"{time.perf_counter() - started:6.0f}s {message}", flush=True))
    say(f"[perf] {result['hardware']['cpu_model']} / {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.rounds} rounds after {args.warmup} warm-up")
    if "sampling" in args.sections:
        result["sampling"] = sampling_section(args, device, say)
    if "training" in args.sections:
        result["training"] = training_section(args, device, say)
    result["load_average_after"] = _load_average()
    result["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    write_record(args.out / f"{args.name}.json", result)
    text = render(result)
    (args.out / f"{args.name}.md").write_text(text)
    say("")
    if not args.quiet:
        print(text)
    return result


def sampling_section(args: argparse.Namespace, device: torch.device, say) -> dict:
    """Episodes per second, ours vs learn2learn, for each data set that is available."""
    settings = {"omniglot": dict(ways=5, shots=1, queries=15), "miniimagenet": dict(ways=5, shots=5, queries=15)}
    workloads: list[Workload] = []
    datasets: dict[str, dict] = {}
    for dataset, episode in settings.items():
        if dataset not in args.datasets:
            continue
        label = f"{dataset} {episode['ways']}w{episode['shots']}s{episode['queries']}q"
        try:
            datamodule = _datamodule(dataset, meta_batch=args.meta_batch, **episode)
        except (DataError, OSError) as error:
            datasets[dataset] = {"label": label, "skipped": f"{type(error).__name__}: {error}"}
            say(f"[perf] sampling {label}: skipped ({error})")
            continue
        stock = None
        if dataset == "omniglot" and not args.no_stock:
            say("[perf] preparing learn2learn's stock Omniglot pipeline")
            stock = l2l_stock_omniglot_taskset(episode["ways"], episode["shots"] + episode["queries"])
        say(f"[perf] sampling {label}: calibrating")
        group = sampler_workloads(label, datamodule, args.meta_batch, device, args.sampler_seconds, stock)
        datasets[dataset] = {"label": label, "workloads": [w.name for w in group], "episode": episode,
                             "tasks_per_call": args.meta_batch, "image_shape": list(datamodule.store.image_shape)}
        workloads += group
    section: dict = {"datasets": datasets, "workloads": {}}
    if not workloads:
        return section
    say("[perf] sampling: timing")
    seconds = interleaved(workloads, args.rounds, args.warmup, device, say)
    for workload in workloads:
        rates = [workload.units / s for s in seconds[workload.name]]
        section["workloads"][workload.name] = {
            "seconds": seconds[workload.name], "episodes_per_step": workload.units,
            "episodes_per_s": summary(rates), **workload.notes}
    for dataset, info in datasets.items():
        names = info.get("workloads", [])
        theirs = [n for n in names if "learn2learn" in n]
        ours = [n for n in names if " ours: " in n]
        info["ratios"] = {f"{o} / {t}": ratio(_seconds_per_episode(section, t), _seconds_per_episode(section, o))
                          for o in ours for t in theirs}  # our episodes/s over learn2learn's
    return section


def _seconds_per_episode(section: dict, name: str) -> list[float]:
    entry = section["workloads"][name]
    return [s / entry["episodes_per_step"] for s in entry["seconds"]]


def training_section(args: argparse.Namespace, device: torch.device, say) -> dict:
    """Seconds per end-to-end meta-iteration: ours, learn2learn's, the proxy, and our ablations."""
    tasks, hidden = args.meta_batch, args.hidden
    say("[perf] meta-iterations: building workloads")
    five_way = _datamodule("omniglot", meta_batch=tasks, ways=5, shots=1, queries=15)
    twenty_way = _datamodule("omniglot", meta_batch=1, ways=20, shots=5, queries=15)
    workloads: list[Workload] = []
    tasks_built = {}
    for key, label, first_order in MAML_VARIANTS:
        task, step = our_maml(five_way, tasks, hidden, first_order, device)
        tasks_built[key] = task
        workloads.append(Workload(f"ours {label}", step))
        _, theirs = l2l_maml(five_way, tasks, hidden, first_order, device, initial=task.network)
        workloads.append(Workload(f"learn2learn {label}", theirs))
    _, protonet_step = our_protonet(twenty_way, hidden, device)
    workloads += [Workload("ours ProtoNet", protonet_step),
                  Workload("learn2learn ProtoNet", l2l_protonet(twenty_way, hidden, device))]
    if not args.no_stock:  # the comparison: learn2learn end to end on its own data pipeline
        say("[perf] preparing learn2learn's stock Omniglot pipeline")
        stock_five = l2l_stock_omniglot_taskset(5, five_way.samplers["train"].examples_per_class)
        stock_twenty = l2l_stock_omniglot_taskset(20, twenty_way.samplers["train"].examples_per_class)
        if stock_five is not None and stock_twenty is not None:
            for key, label, first_order in MAML_VARIANTS:
                _, theirs = l2l_maml(five_way, tasks, hidden, first_order, device, initial=tasks_built[key].network,
                                     taskset=stock_five)
                workloads.append(Workload(f"learn2learn {label}, stock pipeline", theirs))
            workloads.append(Workload("learn2learn ProtoNet, stock pipeline",
                                      l2l_protonet(twenty_way, hidden, device, taskset=stock_twenty)))
    if not args.no_bf16:  # mixed precision (a run's `precision: bf16-mixed`): a speed-up that changes rounding
        for key, label, first_order in MAML_VARIANTS:
            _, step = our_maml(five_way, tasks, hidden, first_order, device, vectorize=False, precision="bf16-mixed")
            workloads.append(Workload(f"ours {label}, bf16-mixed", step))
        _, step = our_protonet(twenty_way, hidden, device, precision="bf16-mixed")
        workloads.append(Workload("ours ProtoNet, bf16-mixed", step))
    workloads += [Workload("proxy: one supervised batch", supervised_proxy(five_way, tasks, hidden, device, False)),
                  Workload("proxy: supervised, per task", supervised_proxy(five_way, tasks, hidden, device, True))]
    if not args.no_ablations:  # the memory layout Conv-4 does not use on this device (channels-last on CPU only)
        other_layout = device.type != "cpu"
        layout_name = "channels-last" if other_layout else "default layout"
        for key, label, first_order in MAML_VARIANTS:
            _, step = our_maml(five_way, tasks, hidden, first_order, device, channels_last=other_layout)
            workloads.append(Workload(f"ablation: ours {label}, {layout_name}", step))
        _, step = our_protonet(twenty_way, hidden, device, channels_last=other_layout)
        workloads.append(Workload(f"ablation: ours ProtoNet, {layout_name}", step))
        if device.type == "cpu":  # second-order support passes keep the default layout there
            for datamodule, meta_batch, precision, used, ablated in SECOND_ORDER_LAYOUT_ABLATIONS:
                if precision == "bf16-mixed" and args.no_bf16:
                    continue
                source = five_way if datamodule == "five_way" else twenty_way
                meta_batch = meta_batch or tasks
                if not any(w.name == used for w in workloads):
                    _, step = our_maml(source, meta_batch, hidden, False, device, vectorize=False, precision=precision)
                    workloads.append(Workload(used, step))
                _, step = our_maml(source, meta_batch, hidden, False, device, vectorize=False, channels_last=True,
                                   precision=precision)
                workloads.append(Workload(ablated, step))
    say("[perf] meta-iterations: timing (the warm-up also resolves vectorize='auto')")
    seconds = interleaved(workloads, args.rounds, args.warmup, device, say)
    if not args.no_ablations:  # the mode 'auto' did not choose, for the record
        for key, label, first_order in MAML_VARIANTS:
            chosen = tasks_built[key].execution["vectorize"]["vectorize"]
            _, step = our_maml(five_way, tasks, hidden, first_order, device, vectorize=not chosen)
            name = f"ablation: ours {label}, {'loop' if chosen else 'vmap'} instead of {'vmap' if chosen else 'loop'}"
            extra = Workload(name, step)
            say(f"[perf] {name}")
            seconds.update(interleaved([extra], max(2, args.rounds // 2), 0, device, say))  # warmed up by 'auto'
            workloads.append(extra)
    section: dict = {"setting": {"maml": f"Omniglot 5w1s15q, meta-batch {tasks}, Conv-4 ({hidden} filters), "
                                         f"1 inner step (lr {0.4}), Adam",
                                 "protonet": f"Omniglot 20w5s15q, 1 episode per step, Conv-4 ({hidden} filters), Adam"},
                     "workloads": {w.name: {"seconds": seconds[w.name], "summary": summary(seconds[w.name])}
                                   for w in workloads},
                     "vectorize": {key: task.execution["vectorize"] for key, task in tasks_built.items()}}
    say("[perf] peak memory, one workload at a time")
    for workload in workloads:
        section["workloads"][workload.name]["peak_memory"] = peak_memory(workload.step, device)
    say("[perf] same results: our vs learn2learn's meta-gradient on one meta-batch")
    checks = (("float32", torch.float32, tasks, None), ("float64", torch.float64, min(tasks, 4), None),
              ("float32 default layout", torch.float32, tasks, False))
    section["max_meta_gradient_difference"] = {
        f"{key} {name}": same_meta_gradient(five_way, check_tasks, hidden, first_order, device,
                                            tasks_built[key].execution["vectorize"]["vectorize"], dtype, layout)
        for key, _, first_order in MAML_VARIANTS
        for name, dtype, check_tasks, layout in checks
        if layout is None or device.type == "cpu"}  # the default layout is what runs off the CPU anyway
    if not args.no_compile:
        try:
            section["compile"] = compile_ablation(five_way, tasks, hidden, device, args, say)
        except Exception as error:  # noqa: BLE001 -- e.g. no C++ compiler: report it, keep the rest
            section["compile"] = {"failed": f"{type(error).__name__}: {error}"[:500]}
    return section


def compile_ablation(datamodule, tasks: int, hidden: int, device: torch.device, args, say) -> dict:
    """torch.compile on the supervised proxy (the only workload without higher-order gradients)."""
    eager_step = supervised_proxy(datamodule, tasks, hidden, device, False)
    say("[perf] torch.compile: compiling the proxy network")
    started = time.perf_counter()
    compiled_step = supervised_proxy(datamodule, tasks, hidden, device, False, compile_network=True)
    compiled_step()
    compile_seconds = time.perf_counter() - started
    seconds = interleaved([Workload("proxy eager", eager_step), Workload("proxy compiled", compiled_step)],
                          max(2, args.rounds // 2), 1, device, say)
    return {"compile_seconds": compile_seconds, "eager": summary(seconds["proxy eager"]),
            "compiled": summary(seconds["proxy compiled"]),
            "speedup": ratio(seconds["proxy eager"], seconds["proxy compiled"])}


def _datamodule(dataset: str, meta_batch: int, ways: int, shots: int, queries: int):
    common = dict(ways=ways, shots=shots, queries=queries, meta_batch=meta_batch, val_episodes=1, test_episodes=1)
    datamodule = (OmniglotDataModule(split="vinyals", download=False, **common) if dataset == "omniglot"
                  else MiniImageNetDataModule(**common))
    datamodule.setup("fit")
    flat = datamodule.store.flat("cpu")  # a cached store is memory-mapped: read every page in before timing
    flat.view(-1)[::4096].sum()
    return datamodule


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["sampling", "training"], choices=["sampling", "training"])
    parser.add_argument("--datasets", nargs="+", default=["omniglot", "miniimagenet"],
                        choices=["omniglot", "miniimagenet"], help="data sets of the sampling section")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-batch (and per sampler call)")
    parser.add_argument("--hidden", type=int, default=64, help="Conv-4 filters")
    parser.add_argument("--sampler-seconds", type=float, default=0.3, help="length of one timed sampler step")
    parser.add_argument("--no-stock", action="store_true", help="skip learn2learn's stock (PNG) Omniglot pipeline")
    parser.add_argument("--no-bf16", action="store_true", help="skip our bf16-mixed (autocast) workloads")
    parser.add_argument("--no-ablations", action="store_true", help="skip the ablations of our optimisations")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile ablation (compiling takes ~1 min)")
    parser.add_argument("--out", type=Path, default=Path("leaderboard"))
    parser.add_argument("--name", default="perf", help="output files are OUT/NAME.json and OUT/NAME.md")
    parser.add_argument("--quiet", action="store_true", help="print only the final report")
    return parser


if __name__ == "__main__":
    sys.exit(main())
