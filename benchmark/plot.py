"""Curves and tables from a folder of benchmark/run_grid.py results.

    python benchmark/plot.py benchmark/results/carrun_grid --cost-limit 20

Writes into the folder:
  curves.png   mean ± sample std over seeds of the training-episode return and cost (iteration means, smoothed over
               `--smooth` iterations) against online episodes, one line per method, the cost limit drawn
               (the paper's Figures 3 and 5); one row of panels per `--groups` entry (default: 4 methods a row);
  table.md     per method, mean ± sample std [95 % t-interval of the mean] over seeds of: offline → after VPA → final deterministic evaluation
               (return, cost, normalised return, normalised cost), online violations (training episodes over the
               limit) and cumulative online cost, and the seeds it has.
"""
import csv
import glob
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import List, Optional

import matplotlib
import numpy as np
import scipy.stats
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = {"recommended": "Recommended (defaults: gated, growing anchor, target halved per rollback)",
          "recommended_8a3a5ad": "Recommended as of 8a3a5ad (deploy at ≤ d, no margin, no hold)",
          "recommended_daecbfc": "Recommended as of daecbfc (constant anchor to the replay's actions)",
          "recommended+anchor2_d77f5ce": "+ growing anchor, as of d77f5ce (no rollback tightening)",
          "recommended+anchor_d77f5ce": "+ growing anchor, all on the deployed policy, as of d77f5ce",
          "marvel": "Marvel (VPA + aPID)", "warm_start": "Warm Start (SAC-Lag, dual)", "apid_only": "aPID only",
          "vpa_only": "VPA only (dual)", "vpa_pid": "VPA + PID", "scratch": "From Scratch (paper schedule)",
          "scratch_standard": "From Scratch (1 update/step)", "famo2o_offline15k": "FamO2O-Lag (15k offline steps)",
          "famo2o": "FamO2O-Lag", "offline": "Offline policy, deployed unchanged"}


@dataclass
class Args:
    folder: tyro.conf.Positional[str]
    """a run_grid.py --out folder"""
    cost_limit: float = 20.0
    """drawn in the cost panel"""
    smooth: int = 4
    """moving average over this many iterations (1: none)"""
    methods: Optional[List[str]] = None
    """methods to show, in this order (default: all found)"""
    title: str = ""
    """figure title"""
    groups: Optional[List[str]] = None
    ("one row of (return, cost) panels per group, each a comma-separated list of methods, e.g. "
     "`recommended,marvel warm_start,scratch` (default: the methods in order, at most 4 per row)")


def load_runs(folder: str) -> dict:
    """method → list of (training rows, result json) over seeds."""
    runs = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(folder, "*_seed*.json"))):
        method = re.sub(r"_seed\d+\.json$", "", os.path.basename(path))
        rows = [r for r in csv.DictReader(open(path.removesuffix(".json") + ".csv")) if r["lambda"]]
        runs[method].append((rows, json.load(open(path))))
    return runs


def smooth(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 1:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    head = c[1:k] / np.arange(1, k)  # growing window at the start
    return np.concatenate([head, (c[k:] - c[:-k]) / k])[:len(x)]


def curves(runs: dict, groups: List[List[str]], args: Args, path: str) -> None:
    """One row of panels per group of methods, so that bands do not hide each other; a method keeps its colour."""
    methods = list(dict.fromkeys(m for group in groups for m in group))  # a method may appear in several groups
    colors = dict(zip(methods, plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors))
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 0.5 + 4.2 * len(groups)), squeeze=False)
    for (ax_ret, ax_cost), group in zip(axes, groups):
        for method in group:
            seeds = runs[method]
            n = min(len(rows) for rows, _ in seeds)  # a common length (all runs have the same schedule)
            episodes = np.array([int(r["episodes"]) for r in seeds[0][0][:n]])
            for ax, key in ((ax_ret, "return"), (ax_cost, "cost")):
                ys = np.stack([smooth(np.array([float(r[key]) for r in rows[:n]]), args.smooth) for rows, _ in seeds])
                mean, std = ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros(ys.shape[1])
                ax.plot(episodes, mean, color=colors[method],
                        label=f"{LABELS.get(method, method)} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
                low = mean - std if key == "return" else np.maximum(mean - std, 0.0)  # a cost is never below 0
                ax.fill_between(episodes, low, mean + std, color=colors[method], alpha=0.15)
        ax_cost.axhline(args.cost_limit, color="k", linestyle="--", linewidth=1,
                        label=f"cost limit d = {args.cost_limit:g}")
        ax_ret.set_ylabel("episode return (training episodes)")
        ax_cost.set_ylabel("episode cost (training episodes)")
        for ax in (ax_ret, ax_cost):
            ax.set_xlabel("online episodes")
            ax.grid(alpha=0.3)
        ax_cost.legend(fontsize=7, loc="upper right")
    fig.suptitle(args.title or f"{os.path.basename(os.path.normpath(args.folder))}: mean ± sample std over seeds, "
                                f"{args.smooth}-iteration moving average")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def mean_std(values: List[float], digits: int) -> str:
    """mean ± sample standard deviation (ddof 1) [95 % Student-t interval of the mean] over seeds."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "—"
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    half = float(scipy.stats.t.ppf(0.975, len(values) - 1)) * std / math.sqrt(len(values))
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{mean - half:.{digits}f}, {mean + half:.{digits}f}]"


def table(runs: dict, methods: List[str]) -> str:
    lines = ["| method | seeds | stage | return | cost | norm. return | norm. cost | online violations | cumulative online cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        results = [r for _, r in runs[method]]
        for stage in ("offline", "after_vpa", "final"):
            evals = [r[stage] for r in results if r.get(stage)]
            if not evals:
                continue
            cells = [mean_std([e[k] for e in evals], d) for k, d in
                     (("return", 1), ("cost", 1), ("normalized_return", 3), ("normalized_cost", 2))]
            online = ["", ""] if stage != "final" else [mean_std([e["online_violations"] for e in evals], 1),
                                                       mean_std([e["cumulative_cost"] for e in evals], 0)]
            seeds = ",".join(str(r["seed"]) for r in results)
            lines.append(f"| {LABELS.get(method, method)} | {seeds} | {stage.replace('_', ' ')} | " + " | ".join(cells + online) + " |")
    lines += ["", "Per seed: final deterministic evaluation against the run's own offline start.", "",
              "| method | seed | offline return / cost | final return / cost | final ≥ offline | online violations |",
              "|---|---|---|---|---|---|"]
    for method in methods:
        for _, r in sorted(runs[method], key=lambda run: run[1]["seed"]):
            final, offline = r["final"], r.get("offline")
            start = f"{offline['return']:.1f} / {offline['cost']:.1f}" if offline else "—"
            better = ("yes" if final["return"] >= offline["return"] else "no") if offline else "—"
            lines.append(f"| {LABELS.get(method, method)} | {r['seed']} | {start} | {final['return']:.1f} / "
                         f"{final['cost']:.1f} | {better} | {final['online_violations']} |")
    return "\n".join(lines) + "\n"


def main(args: Args) -> None:
    runs = load_runs(args.folder)
    if not runs:
        raise SystemExit(f"plot.py: error: no *_seed*.json results in {args.folder}")
    methods = [m for m in (args.methods or sorted(runs, key=lambda m: list(LABELS).index(m) if m in LABELS else 99))
               if m in runs]
    if args.groups:
        groups = [[m for m in group.split(",") if m] for group in args.groups]
        unknown = sorted({m for group in groups for m in group} - set(runs))
        if unknown:
            raise SystemExit(f"plot.py: error: --groups: no results for {', '.join(unknown)} in {args.folder}")
    else:
        groups = [methods[i:i + 4] for i in range(0, len(methods), 4)]
    curves(runs, groups, args, os.path.join(args.folder, "curves.png"))
    with open(os.path.join(args.folder, "table.md"), "w") as f:
        f.write(table(runs, methods))
    print(table(runs, methods))
    print(f"wrote {os.path.join(args.folder, 'curves.png')} and table.md")


if __name__ == "__main__":
    main(tyro.cli(Args))
