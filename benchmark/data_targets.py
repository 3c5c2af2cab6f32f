"""The data's own yardsticks for a cost limit d: per-trajectory (return, cost) of a DSRL-format dataset, and the
median and 90th-percentile return among the trajectories whose cost is at most d.

    python benchmark/data_targets.py                                   # the bundled datasets, d = 10, 20, 40
    python benchmark/data_targets.py --dataset-path X.hdf5 --limits 20

A trajectory ends at a `terminals` or `timeouts` flag (and at the file's end). Percentiles are numpy's default
(linear interpolation). These are the targets issue 27 and docs/results.md compare the learners against.
"""
import glob
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import h5py
import numpy as np
import tyro


@dataclass
class Args:
    dataset_path: Optional[str] = None  # one DSRL-format HDF5 file (default: every datasets/*.hdf5)
    limits: Tuple[float, ...] = (10.0, 20.0, 40.0)  # cost limits d
    json_out: Optional[str] = None  # also write the table as JSON here


def trajectories(path: str):
    """(returns, costs) per trajectory, each an array."""
    with h5py.File(path, "r") as f:
        rewards, costs = f["rewards"][()].reshape(-1), f["costs"][()].reshape(-1)
        ends = np.logical_or(f["terminals"][()].reshape(-1), f["timeouts"][()].reshape(-1))
    ends[-1] = True
    bounds = np.flatnonzero(ends) + 1
    starts = np.concatenate([[0], bounds[:-1]])
    cum_r, cum_c = np.concatenate([[0.0], np.cumsum(rewards)]), np.concatenate([[0.0], np.cumsum(costs)])
    return cum_r[bounds] - cum_r[starts], cum_c[bounds] - cum_c[starts]


def targets(returns: np.ndarray, costs: np.ndarray, limit: float) -> dict:
    safe = returns[costs <= limit]
    row = {"d": limit, "trajectories": int(len(returns)), "safe": int(len(safe))}
    if len(safe):
        row.update(median=float(np.median(safe)), p90=float(np.percentile(safe, 90)), best=float(safe.max()))
    return row


def main(args: Args) -> list:
    paths = [args.dataset_path] if args.dataset_path else sorted(glob.glob(os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets", "*.hdf5")))
    if not paths or not all(os.path.isfile(p) for p in paths):
        sys.exit(f"data_targets.py: error: no dataset at {args.dataset_path or 'datasets/*.hdf5'}")
    rows = []
    print(f"{'dataset':32}{'d':>6}{'trajs':>7}{'safe':>6}{'median':>9}{'p90':>9}{'best':>9}")
    for path in paths:
        returns, costs = trajectories(path)
        for limit in args.limits:
            row = {"dataset": os.path.basename(path), **targets(returns, costs, limit)}
            rows.append(row)
            print(f"{row['dataset']:32}{limit:>6g}{row['trajectories']:>7}{row['safe']:>6}"
                  + "".join(f"{row.get(k, float('nan')):>9.1f}" for k in ("median", "p90", "best")))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
