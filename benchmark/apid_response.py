"""Open-loop response of the aPID Lagrange multiplier to a fixed episode-cost profile, for several K⁰.

    python benchmark/apid_response.py --output benchmark/results/apid_response/response.png

The controller (`sac_lag_apid.AdaptivePIDLagrangian`, exactly as trained) is fed a cost profile shaped like what a
warm-started CarRun run produces: a safe start (J = 2 for `--safe-iters` iterations), a violation burst
(J = 150 for `--burst-iters`), then safety again (J = 5). For each K⁰ = (K_p, K_i, K_d) it reports how many
iterations after the burst starts λ needs to reach 1 and 5, the peak λ, and how many iterations after the burst
ends λ needs to fall below 0.5. Open loop means the costs do not react to λ: this characterises the controller's
speed, not the learning outcome (the closed-loop runs are in benchmark/results/).
"""
import os
import sys
from dataclasses import dataclass, field
from typing import List, Tuple

import matplotlib
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sac_lag_apid as sl  # noqa: E402


@dataclass
class Args:
    gains: List[Tuple[float, float, float]] = field(default_factory=lambda: [
        (0.005, 0.001, 0.001), (0.05, 0.01, 0.01), (0.5, 0.1, 0.1), (1.0, 0.2, 0.2)])
    """K⁰ triples (K_p, K_i, K_d) to compare"""
    cost_limit: float = 20.0
    """d"""
    safe_iters: int = 10
    """iterations of safe cost before the burst"""
    burst_iters: int = 30
    """iterations of the violation burst"""
    after_iters: int = 60
    """iterations of safe cost after the burst"""
    burst_cost: float = 150.0
    """episode cost during the burst (CarRun runs saw 150–180)"""
    output: str = "benchmark/results/apid_response/response.png"
    """PNG to write (a markdown table goes beside it)"""


def first(seq, predicate, start: int):
    return next((i - start for i, v in enumerate(seq) if i >= start and predicate(v)), None)


def main(args: Args) -> None:
    profile = [2.0] * args.safe_iters + [args.burst_cost] * args.burst_iters + [5.0] * args.after_iters
    burst_end = args.safe_iters + args.burst_iters
    fig, (ax_cost, ax_lam, ax_kp) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    ax_cost.plot(profile, color="k")
    ax_cost.axhline(args.cost_limit, color="k", linestyle="--", linewidth=1, label=f"limit d = {args.cost_limit:g}")
    rows = ["| K⁰ (K_p, K_i, K_d) | K_p at burst start | iters to λ ≥ 1 | iters to λ ≥ 5 | peak λ | iters after burst to λ < 0.5 |",
            "|---|---|---|---|---|---|"]
    for gains in args.gains:
        controller = sl.AdaptivePIDLagrangian(args.cost_limit, *gains)
        lams, kps = [], []
        for J in profile:
            lams.append(controller.update(J))
            kps.append(controller.kp)
        label = f"K⁰ = {gains}"
        ax_lam.plot(lams, label=label)
        ax_kp.plot(kps, label=label)
        fmt = lambda v: "never" if v is None else str(v)
        rows.append(f"| {gains} | {kps[args.safe_iters - 1]:.4g} | {fmt(first(lams, lambda v: v >= 1, args.safe_iters))} | "
                    f"{fmt(first(lams, lambda v: v >= 5, args.safe_iters))} | {max(lams):.2f} | "
                    f"{fmt(first(lams, lambda v: v < 0.5, burst_end))} |")
    ax_cost.set_ylabel("episode cost J (input)")
    ax_lam.set_ylabel("λ")
    ax_lam.set_yscale("symlog", linthresh=0.1)
    ax_kp.set_ylabel("K_p (adapted)")
    ax_kp.set_yscale("log")
    ax_kp.set_xlabel("iteration (one controller update each)")
    ax_cost.legend(fontsize=7)
    ax_lam.legend(fontsize=7)
    for ax in (ax_cost, ax_lam, ax_kp):
        ax.grid(alpha=0.3)
    fig.suptitle("aPID open-loop response: safe start, violation burst, safe again")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=110)
    table = "\n".join(rows) + "\n"
    with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(tyro.cli(Args))
