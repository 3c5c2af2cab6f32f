"""Ctrl-C: exit 130, one honest line on stderr, and what the file promises to keep is kept."""
import csv
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT


def interrupt_when(cmd, ready, cwd, timeout=120, presses=4):
    """Start `cmd`, send SIGINT once `ready()` holds, return (exit code, stderr). If the run goes on, press again, as
    a user would: CI once saw bear_lag.py train on after a Ctrl-C in its set-up (a KeyboardInterrupt raised inside a
    finalizer is printed and dropped)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    for press in range(presses):
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=timeout / presses)
            return proc.returncode, err
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    _, err = proc.communicate()
    return proc.returncode, err


def test_cpq_interrupt_keeps_the_best_and_the_last_evaluation(tmp_path, dataset_file):
    """Ctrl-C in training, after an evaluation: the best and the latest evaluation's checkpoints stay, and the one
    stderr line says where they are and how to continue."""
    save, last = tmp_path / "out" / "cpq.pt", tmp_path / "out" / "cpq_last.pt"
    cmd = [sys.executable, os.path.join(ROOT, "cpq.py"), "--no-cuda", "--hidden-sizes", "32", "32", "--vae-hidden",
           "32", "--batch-size", "32", "--total-steps", "100000", "--eval-every", "20", "--eval-episodes", "1",
           "--dataset-path", dataset_file, "--save-path", str(save)]
    code, err = interrupt_when(cmd, last.exists, tmp_path)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    step = int(line.split("interrupted at step ")[1].split(";")[0])
    assert line == (f"cpq.py: interrupted at step {step}; kept {save} (best) and {last}: continue with --resume "
                    f"{last}")
    kept = torch.load(last, weights_only=True)
    assert 20 <= kept["step"] <= step < 100000 and kept["step"] % 20 == 0 and "optimizers" in kept
    assert torch.load(save, weights_only=True)["step"] <= kept["step"]


def test_sac_lag_apid_interrupt_saves_the_policy_so_far(tmp_path, dataset_file):
    save = tmp_path / "s.pt"
    progress = tmp_path / "s_progress.csv"
    cmd = [sys.executable, os.path.join(ROOT, "sac_lag_apid.py"), "--no-cuda", "--hidden-sizes", "32", "32",
           "--online-episodes", "400", "--episodes-per-iter", "2", "--updates-per-iter", "3", "--eval-every", "400",
           "--eval-episodes", "1", "--dataset-path", dataset_file, "--save-path", str(save)]
    code, err = interrupt_when(cmd, lambda: progress.exists() and len(progress.read_text().splitlines()) >= 3,
                               tmp_path)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    episodes = int(line.split("interrupted after ")[1].split(" ")[0])
    assert line == (f"sac_lag_apid.py: interrupted after {episodes} of 400 episodes: the policy so far is in "
                    f"{tmp_path / 's_interrupted.pt'}")
    rows = list(csv.DictReader(open(progress)))
    assert 0 < episodes < 400 and int(rows[-1]["episodes"]) == episodes and rows[-1]["eval_return"]  # evaluated
    ckpt = torch.load(tmp_path / "s_interrupted.pt", weights_only=True)
    assert 0 < ckpt["step"] < 400 * 200 and not save.exists()


def test_bear_lag_interrupt_is_one_line(tmp_path, dataset_file):
    log = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "bear_lag.py"), "--no-cuda", "--hidden-sizes", "32", "32",
           "--vae-hidden", "32", "--batch-size", "32", "--total-steps", "100000", "--eval-every", "100000",
           "--dataset-path", dataset_file, "--save-path", str(log / "b.pt")]
    code, err = interrupt_when(cmd, lambda: any(log.glob("events.out.tfevents.*")) if log.exists() else False,
                               tmp_path)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("bear_lag.py: interrupted")
