"""Run the online methods of the Marvel benchmark over seeds, two processes at a time, and collect their results.

    python benchmark/run_grid.py --offline-checkpoint runs/cpq_s0/cpq.pt --seeds 0 1 2 3 4 \
        --methods marvel warm_start apid_only vpa_only vpa_pid scratch --out benchmark/results/carrun_grid

Per seed, VPA runs once (`vpa.py --init <offline checkpoint> --seed S`) and every method that starts from VPA
shares its output; the methods that start from the offline checkpoint share that. Each (method, seed) is one
`sac_lag_apid.py` process with `OMP_NUM_THREADS=1` (two torch processes with two threads each oversubscribe 2 cores
badly). A run whose result file already exists in `--out` is skipped, so the grid can be run in chunks and
resumed. Into `--out` go, per run, `<method>_seed<S>.csv` (sac_lag_apid.py's per-iteration progress) and
`<method>_seed<S>.json` (the command, the commit, and the offline / after-VPA / final evaluations with the online
violations), and per seed `vpa_seed<S>_spearman.csv`. `benchmark/plot.py` turns them into curves and tables.

The offline checkpoint can be one file for all seeds, or a pattern with `{seed}` (one CPQ run per seed).
"""
import csv
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's online phase, spelled out: sac_lag_apid.py's defaults are the safe-finetuning configuration
# (docs/algorithms.md, "Safe finetuning"), so the paper's methods switch each of its mechanisms off.
# (the same settings as sac_lag_apid.py --paper, spelled out so that a method can still change one of them)
PAPER = ["--deploy", "learner", "--bc-weight", "0", "--offline-ratio", "0", "--cost-signal", "episodes",
         "--no-bounded-gain-adaptation", "--updates-per-iter", "20", "--batch-size", "64", "--cost-margin", "0"]
# method → (starting point, extra sac_lag_apid.py flags). "vpa": the VPA-aligned checkpoint; "offline": the offline
# checkpoint as it is; "scratch": random networks. `recommended` is what marvel_full.py runs by default; the six of
# the paper (its Figures 3 and 5) follow.
METHODS = {
    "recommended": ("vpa", []),                                       # sac_lag_apid.py's defaults
    "marvel": ("vpa", PAPER),                                         # VPA + aPID
    "warm_start": ("offline", PAPER + ["--lagrangian", "dual"]),      # plain SAC-Lag from the offline checkpoint
    "apid_only": ("offline", PAPER),                                  # aPID, no VPA
    "vpa_only": ("vpa", PAPER + ["--lagrangian", "dual"]),            # VPA, plain dual ascent
    "vpa_pid": ("vpa", PAPER + ["--lagrangian", "pid"]),              # VPA, PID with fixed gains
    "scratch": ("scratch", PAPER),                                    # From Scratch, paper schedule (aPID)
    # From Scratch with a standard SAC schedule: one update of 256 per env step, same env-step budget
    "scratch_standard": ("scratch", PAPER + ["--episodes-per-iter", "1", "--updates-per-iter", "200",
                                             "--batch-size", "256"]),  # later flags win over PAPER's
}
# Variants for diagnosis: `<method>+<variant>` adds these flags, e.g. marvel+autotune.
VARIANTS = {
    "autotune": ["--autotune"],                                    # learn the SAC temperature α
    "mix50": ["--offline-ratio", "0.5"],                           # half of each minibatch from the offline data
    "updates200": ["--updates-per-iter", "200"],                   # 10× the paper's updates per iteration
    "actorlr0.1x": ["--actor-lr", "5e-6"],                         # CarRun's actor lr / 10
    "criticlr0.1x": ["--critic-lr", "5e-4", "--cost-critic-lr", "8e-4"],  # CarRun's critic lrs / 10
    "costfloor": ["--cost-value-floor"],                           # Qc' ≥ 0 in the cost target
}


@dataclass
class Args:
    # help that spans lines is one implicitly joined string: tyro keeps the line breaks of a multi-line docstring
    offline_checkpoint: str
    """offline checkpoint (cpq.py / bear_lag.py), or a pattern with {seed}"""
    out: str
    """results folder (CSVs and JSONs of the finished runs; existing ones are skipped)"""
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """online seeds (VPA uses the same seed)"""
    methods: List[str] = field(default_factory=lambda: ["recommended", "marvel", "warm_start", "scratch"])
    """methods to run: names from METHODS, each optionally with +VARIANT suffixes (e.g. marvel+autotune)"""
    env_id: str = "OfflineCarRun-v0"
    """DSRL environment id"""
    work_dir: str = "runs/grid"
    ("where checkpoints and TensorBoard logs of the runs go (one per task and offline checkpoint: the VPA "
     "checkpoints in it are reused)")
    jobs: int = 2
    """processes at a time (one per core)"""
    extra: str = ""
    """extra flags for every sac_lag_apid.py run of this invocation, as one string, e.g. --extra='--offline-ratio 0.5'"""
    vpa_extra: str = ""
    """extra flags for vpa.py, one string"""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def run(cmd: List[str], log_path: str) -> None:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {' '.join(cmd)} (log: {log_path})")


def checkpoint_eval(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True).get("eval")


def final_row(csv_path: str) -> dict:
    """The last evaluation row and the last training row of a progress CSV."""
    rows = list(csv.DictReader(open(csv_path)))
    last_eval = [r for r in rows if r["eval_return"]][-1]
    last_train = [r for r in rows if r["lambda"]][-1]
    return {"return": float(last_eval["eval_return"]), "cost": float(last_eval["eval_cost"]),
            "normalized_return": float(last_eval["eval_normalized_return"]),
            "normalized_cost": float(last_eval["eval_normalized_cost"]),
            "online_violations": int(last_train["violations"]), "cumulative_cost": float(last_train["cumulative_cost"]),
            "episodes": int(last_train["episodes"]), "lambda": float(last_train["lambda"])}


def main(args: Args) -> None:
    unknown = [m for m in args.methods if m.split("+")[0] not in METHODS or
               any(v not in VARIANTS for v in m.split("+")[1:])]
    if unknown:
        sys.exit(f"run_grid.py: error: unknown methods {unknown}; known: {sorted(METHODS)}, variants {sorted(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)
    commit, py = git_commit(), sys.executable

    def offline_path(seed: int) -> str:
        path = args.offline_checkpoint.format(seed=seed)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no offline checkpoint {path}")
        return path

    vpa_locks = {seed: threading.Lock() for seed in args.seeds}

    def vpa_path(seed: int) -> str:
        """VPA once per seed, shared by all VPA methods; its Spearman table is copied into --out."""
        path = os.path.join(args.work_dir, f"vpa_seed{seed}", "vpa.pt")
        with vpa_locks[seed]:  # the first run that needs it makes it; the others wait
            if not os.path.isfile(path):
                run([py, "vpa.py", "--env-id", args.env_id, "--init", offline_path(seed), "--seed", str(seed),
                     "--save-path", path, "--no-cuda", *shlex.split(args.vpa_extra)], path.removesuffix(".pt") + ".log")
            made_from = torch.load(path, map_location="cpu", weights_only=True)["args"]
            if (made_from["env_id"], made_from["init"]) != (args.env_id, offline_path(seed)):
                raise RuntimeError(f"{path} was made from {made_from['init']} on {made_from['env_id']}, not from "
                                   f"{offline_path(seed)} on {args.env_id}; pass another --work-dir")
        spearman = path.removesuffix(".pt") + "_spearman.csv"
        if os.path.isfile(spearman):  # absent with --vpa-extra=--no-diagnostic
            shutil.copy(spearman, os.path.join(args.out, f"vpa_seed{seed}_spearman.csv"))
        return path

    def one(method: str, seed: int) -> str:
        name = f"{method}_seed{seed}"
        result_json = os.path.join(args.out, name + ".json")
        if os.path.exists(result_json):
            return f"{name}: exists, skipped"
        base, *variants = method.split("+")
        start_kind, flags = METHODS[base]
        flags = flags + [flag for v in variants for flag in VARIANTS[v]]
        init = {"vpa": lambda: vpa_path(seed), "offline": lambda: offline_path(seed), "scratch": lambda: "scratch"}
        init_path = init[start_kind]()
        save = os.path.join(args.work_dir, name, "sac_lag.pt")
        cmd = [py, "sac_lag_apid.py", "--env-id", args.env_id, "--init", init_path, "--seed", str(seed),
               "--save-path", save, "--no-cuda", *flags, *shlex.split(args.extra)]
        start = time.time()
        run(cmd, os.path.join(args.work_dir, name, "log.txt"))
        progress = save.removesuffix(".pt") + "_progress.csv"
        shutil.copy(progress, os.path.join(args.out, name + ".csv"))
        result = {"method": method, "seed": seed, "command": " ".join(["python", *cmd[1:]]), "commit": commit,
                  "wall_time_s": round(time.time() - start, 1),
                  "offline": checkpoint_eval(offline_path(seed)) if start_kind != "scratch" else None,
                  "after_vpa": checkpoint_eval(vpa_path(seed)) if start_kind == "vpa" else None,
                  "final": final_row(progress)}
        with open(result_json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(result_json + ".tmp", result_json)
        return f"{name}: final {result['final']['return']:.1f} / {result['final']['cost']:.1f}, " \
               f"{result['final']['online_violations']} violations, {result['wall_time_s']:.0f}s"

    # alternate methods that need VPA with those that do not, so a seed's VPA runs while the other worker has work
    with_vpa = [m for m in args.methods if METHODS[m.split("+")[0]][0] == "vpa"]
    without = [m for m in args.methods if m not in with_vpa]
    order = [m for pair in itertools.zip_longest(with_vpa, without) for m in pair if m is not None]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, m, s) for s in args.seeds for m in order]
        for future in futures:
            try:
                print(future.result(), flush=True)
            except Exception as e:  # report and go on: the other runs' results are still kept
                print(f"failed: {e}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
