"""Golden runs: every entry point with its default configuration on a short budget (CPU, one thread, seed 0, the
bundled CarRun data), summarised as SHA-256 digests of every tensor in the checkpoints they write plus their
evaluation numbers. tests/test_golden.py reruns them and compares with the committed tests/golden.json exactly, so
a change that alters what any file computes cannot pass unnoticed.

    python tests/golden_runs.py   # rewrite tests/golden.json (only when a change of behaviour is intended)
"""
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden.json")
DATA = os.path.join(ROOT, "datasets", "OfflineCarRun-v0.hdf5")
COMMON = ["--no-cuda", "--seed", "0", "--dataset-path", DATA, "--eval-episodes", "2"]
ONLINE = ["--online-episodes", "20", "--eval-every", "10"]
# name -> (file, flags, checkpoints written, relative to the run's folder); later runs start from earlier ones
RUNS = {
    "cpq": ("cpq.py", ["--total-steps", "200", "--eval-every", "100", "--save-path", "cpq/cpq.pt"],
            ["cpq/cpq.pt"]),
    "bear_lag": ("bear_lag.py", ["--total-steps", "100", "--eval-every", "50", "--save-path", "bear/bear_lag.pt"],
                 ["bear/bear_lag.pt"]),
    "vpa": ("vpa.py", ["--init", "cpq/cpq.pt", "--total-steps", "200", "--eval-every", "100", "--diagnostic-pairs",
                       "6", "--pairs-per-episode", "3", "--mc-horizon", "30", "--save-path", "vpa/vpa.pt"],
            ["vpa/vpa.pt"]),
    "sac_lag_apid": ("sac_lag_apid.py", ["--init", "vpa/vpa.pt", *ONLINE, "--save-path", "sac/sac_lag.pt"],
                     ["sac/sac_lag.pt"]),
    "sac_lag_apid_paper": ("sac_lag_apid.py", ["--init", "vpa/vpa.pt", "--paper", *ONLINE,
                                               "--save-path", "sacp/sac_lag.pt"], ["sacp/sac_lag.pt"]),
    "sac_lag_apid_scratch": ("sac_lag_apid.py", ["--init", "scratch", "--paper", *ONLINE,
                                                 "--save-path", "sacs/sac_lag.pt"], ["sacs/sac_lag.pt"]),
    "safe_iql": ("safe_iql.py", ["--total-steps", "200", "--eval-every", "100", "--save-path", "iql/safe_iql.pt"],
                 ["iql/safe_iql.pt"]),
    "marvel_full": ("marvel_full.py", ["--offline-steps", "200", "--offline-eval-every", "100", "--vpa-steps", "200",
                                       *ONLINE, "--save-dir", "marvel"],
                    ["marvel/safe_iql.pt", "marvel/vpa.pt", "marvel/sac_lag.pt"]),
    "marvel_full_cpq": ("marvel_full.py", ["--offline-algo", "cpq", "--offline-steps", "200", "--offline-eval-every",
                                           "100", "--vpa-steps", "200", *ONLINE, "--save-dir", "marvelc"],
                        ["marvelc/cpq.pt", "marvelc/vpa.pt", "marvelc/sac_lag.pt"]),
    "marvel_full_paper": ("marvel_full.py", ["--paper", "--offline-steps", "200", "--offline-eval-every", "100",
                                             "--vpa-steps", "200", *ONLINE, "--save-dir", "marvelp"],  # CPQ
                          ["marvelp/cpq.pt", "marvelp/vpa.pt", "marvelp/sac_lag.pt"]),
    "famo2o_lag": ("famo2o_lag.py", ["--offline-steps", "200", "--eval-every", "100", "--online-episodes", "10",
                                     "--online-eval-every", "5", "--save-path", "famo2o/famo2o_lag.pt"],
                   ["famo2o/famo2o_lag.pt"]),
}


def digest(value) -> object:
    """Tensors (nested in dicts and lists) as SHA-256 of their bytes; numbers as they are; other values dropped."""
    if torch.is_tensor(value):
        return hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    if isinstance(value, dict):
        out = {str(k): digest(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


# what a checkpoint says about the run: its networks and its evaluation (not its args or optimizer state, which
# name flags and so change when a flag is renamed)
SUMMARISED = ("actor", "learner_actor", "critic", "critic_target", "cost_critic", "cost_critic_target", "vae",
              "log_alpha_c", "value", "cost_value", "eval", "balance", "policy")


def summarise(path: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k: digest(ckpt[k]) for k in SUMMARISED if k in ckpt}


# two chains of about equal time, run side by side (one thread each); within a chain, in order
CHAINS = (("cpq", "vpa", "sac_lag_apid", "sac_lag_apid_paper", "bear_lag", "safe_iql"),
          ("sac_lag_apid_scratch", "marvel_full", "marvel_full_cpq", "marvel_full_paper", "famo2o_lag"))


def run_chain(workdir: str, names) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DSRL_SUPPRESS_IMPORT_ERROR": "1"}
    results = {}
    for name in names:
        script, flags, outputs = RUNS[name]
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *COMMON, *flags], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        results[name] = {out: summarise(os.path.join(workdir, out)) for out in outputs}
    return results


def run_all(workdir: str) -> dict:
    with ThreadPoolExecutor(len(CHAINS)) as pool:
        parts = list(pool.map(lambda chain: run_chain(workdir, chain), CHAINS))
    return {name: result for part in parts for name, result in part.items()}


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        golden = run_all(tmp)
    with open(GOLDEN, "w") as f:
        json.dump(golden, f, indent=1, sort_keys=True)
    print(f"wrote {GOLDEN}: {', '.join(golden)}")
