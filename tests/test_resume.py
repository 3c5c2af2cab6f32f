"""cpq.py --resume: a run continues from the *_last.pt of its latest evaluation (weights, optimizers, step, best so
far); the continuation draws fresh random numbers, so it is not bit-identical to an uninterrupted run."""
import os
import subprocess
import sys

import torch

from conftest import ROOT

import cpq


def run_cpq(*flags, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "cpq.py"), "--no-cuda", "--batch-size", "32",
                           "--eval-every", "2", "--eval-episodes", "1", "--hidden-sizes", "16", "16", "--vae-hidden",
                           "16", *flags], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cpq_resume_continues_from_the_saved_step(dataset_file, tmp_path):
    save, last = tmp_path / "cpq.pt", tmp_path / "cpq_last.pt"
    first = run_cpq("--dataset-path", dataset_file, "--total-steps", "4", "--save-path", str(save), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = torch.load(last, weights_only=True)
    assert before["step"] == 4 and before["eval"]["step"] == 4 and before["best"]["step"] in (2, 4)

    resumed = run_cpq("--dataset-path", dataset_file, "--total-steps", "6", "--save-path", str(save),
                      "--resume", str(last), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = torch.load(last, weights_only=True)
    assert after["step"] == 6 and after["eval"]["step"] == 6
    # training went on at step 5: two more updates on the loaded optimizers (Adam counts its steps; the actor takes
    # two per update with --actor-escape), not six from fresh ones
    steps = {name: {float(s["step"]) for s in state["state"].values()} for name, state in after["optimizers"].items()}
    assert steps == {"actor_opt": {12.0}, "critic_opt": {6.0}, "cost_critic_opt": {6.0}, "vae_opt": {6.0},
                     "alpha_opt": {6.0}}
    # the best so far carries over: the evaluation at 6 replaces it only if it is better
    better = cpq.is_better(after["eval"], before["best"])
    assert after["best"] == (after["eval"] if better else before["best"])
    assert torch.load(save, weights_only=True)["step"] == after["best"]["step"]

    # a best checkpoint has no optimizers: refused in one line
    refused = run_cpq("--dataset-path", dataset_file, "--total-steps", "6", "--save-path", str(save),
                      "--resume", str(save), cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == f"cpq.py: error: --resume {save}: not a cpq.py *_last.pt checkpoint"
