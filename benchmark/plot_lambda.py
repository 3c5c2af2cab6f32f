"""Plot λ and the training-episode cost over online episodes from sac_lag_apid.py progress CSVs.

    python benchmark/plot_lambda.py runs/scratch_s*/sac_lag_progress.csv --cost-limit 20 --output lambda.png
"""
import csv
import os
from dataclasses import dataclass
from typing import List

import matplotlib
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@dataclass
class Args:
    csvs: tyro.conf.Positional[List[str]]
    """progress CSVs written by sac_lag_apid.py (one line per run in each panel)"""
    cost_limit: float = 20.0
    """drawn as a horizontal line in the cost panel"""
    output: str = "lambda.png"
    """PNG to write"""


def main(args: Args) -> None:
    fig, (ax_cost, ax_lam, ax_ret) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for path in args.csvs:
        rows = [r for r in csv.DictReader(open(path)) if r["lambda"]]  # training rows (eval rows leave it empty)
        episodes = [int(r["episodes"]) for r in rows]
        label = os.path.splitext(os.path.basename(path))[0]
        ax_cost.plot(episodes, [float(r["cost"]) for r in rows], label=label)
        ax_lam.plot(episodes, [float(r["lambda"]) for r in rows], label=label)
        ax_ret.plot(episodes, [float(r["return"]) for r in rows], label=label)
    ax_cost.axhline(args.cost_limit, color="k", linestyle="--", linewidth=1, label=f"limit d = {args.cost_limit:g}")
    ax_cost.set_ylabel("episode cost (iteration mean)")
    ax_lam.set_ylabel("λ")
    ax_ret.set_ylabel("episode return (iteration mean)")
    ax_ret.set_xlabel("online episodes")
    ax_cost.legend(fontsize=7)
    for ax in (ax_cost, ax_lam, ax_ret):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(tyro.cli(Args))
