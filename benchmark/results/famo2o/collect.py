"""Copy famo2o_lag.py runs into this folder in benchmark/run_grid.py's layout (<method>_seed<S>.csv/.json), so that
benchmark/plot.py draws and tabulates them beside the Marvel runs, plus each run's family sweep.

    python benchmark/results/famo2o/collect.py runs/famo2o15k_s{seed}/famo2o.pt 0 1 2 --method famo2o_15k
"""
import json
import os
import shutil
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
from benchmark.run_grid import final_row  # noqa: E402


def main(pattern: str, seeds: list, method: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for seed in seeds:
        path = pattern.format(seed=seed)
        stem = path.removesuffix(".pt")
        offline = torch.load(stem + "_offline.pt", map_location="cpu", weights_only=True)
        args = offline["args"]
        shutil.copy(stem + "_progress.csv", os.path.join(HERE, f"{method}_seed{seed}.csv"))
        shutil.copy(stem + "_family.csv", os.path.join(HERE, f"{method}_seed{seed}_family.csv"))
        shutil.copy(stem + "_family.png", os.path.join(HERE, f"{method}_seed{seed}_family.png"))
        result = {"method": method, "seed": seed, "commit": commit,
                  "command": f"OMP_NUM_THREADS=1 python famo2o_lag.py --env-id {args['env_id']} --seed {seed} --no-cuda "
                             f"--offline-steps {args['offline_steps']} --save-path {path}",
                  "offline": offline["eval"], "family": offline.get("family"), "after_vpa": None,
                  "final": final_row(stem + "_progress.csv")}
        with open(os.path.join(HERE, f"{method}_seed{seed}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(method, seed, result["final"])


if __name__ == "__main__":
    method = sys.argv[sys.argv.index("--method") + 1] if "--method" in sys.argv else "famo2o"
    rest = [a for a in sys.argv[1:] if a not in ("--method", method)]
    main(rest[0], [int(s) for s in rest[1:]], method)
