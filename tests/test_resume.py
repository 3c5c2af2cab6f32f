"""cpq.py survives Ctrl-C: it keeps a resumable checkpoint, and --resume ends the run exactly as if it had never
stopped (the same tensors, the same evaluations, on CPU)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV_ID, ROOT, synthetic_dataset, write_hdf5

import cpq

STEPS = 400  # evaluations at 100, 200, 300, 400; tiny networks run them in a few seconds


def flags(dataset, save):
    return ["--dataset-path", dataset, "--total-steps", str(STEPS), "--batch-size", "32", "--eval-every", "100",
            "--eval-episodes", "1", "--hidden-sizes", "16", "16", "--vae-hidden", "16", "--no-cuda",
            "--save-path", str(save)]


def run_cpq(args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "cpq.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def flat(ckpt, prefix=""):
    out = {}
    for k, v in ckpt.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_hdf5(tmp_path_factory.mktemp("data") / "synthetic.hdf5", synthetic_dataset())


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_cpq(flags(dataset, out / "cpq.pt"), out)
    assert not (out / "cpq_resume.pt").exists()  # a finished run leaves nothing to resume
    return out


@pytest.mark.parametrize("when", ["before the first evaluation", "after an evaluation"])
def test_ctrl_c_then_resume_equals_the_uninterrupted_run(when, dataset, uninterrupted, tmp_path):
    resume = tmp_path / "cpq_resume.pt"
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cpq.py"), *flags(dataset, tmp_path / "cpq.pt")],
                                stdout=out, stderr=err, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # Ctrl-C is caught once the start line is printed; the evaluation at step 100 writes the resumable file
        started = (lambda: "transitions from" in stdout.read_text()) if when.startswith("before") else resume.exists
        deadline = time.time() + 120
        while not started() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    message = stderr.read_text()
    assert proc.returncode == 130 and "Traceback" not in message, message[-2000:]
    state = torch.load(resume, weights_only=True)
    assert message.strip().splitlines()[-1] == (f"cpq.py: interrupted at step {state['step']}: "
                                                f"resumable checkpoint {resume}; continue with --resume {resume}")
    assert 0 < state["step"] < STEPS and state["algo"] == "cpq"
    assert (state["resume"]["last_eval"] is None) == when.startswith("before")

    run_cpq([*flags(dataset, tmp_path / "cpq.pt"), "--resume", str(resume)], tmp_path)
    assert not resume.exists()
    for name in ("cpq.pt", "cpq_last.pt"):  # the best and the last checkpoint, tensor for tensor and eval for eval
        ours, theirs = (flat(torch.load(d / name, weights_only=True)) for d in (tmp_path, uninterrupted))
        assert ours.keys() == theirs.keys()
        differ = [k for k in ours if (not torch.equal(ours[k], theirs[k]) if torch.is_tensor(ours[k])
                                      else ours[k] != theirs[k])]
        assert set(differ) <= {"args.save_path", "args.resume"}, (name, differ)


def test_resume_refuses_what_cannot_continue_the_run(dataset, uninterrupted, tmp_path, capsys):
    last = torch.load(uninterrupted / "cpq_last.pt", weights_only=True)
    resumable = tmp_path / "cpq_resume.pt"  # the flags checks only look at these parts of a *_resume.pt
    torch.save({**last, "resume": {"save_path": str(uninterrupted / "cpq.pt"), "device": "cpu"}}, resumable)
    same = dict(env_id=ENV_ID, dataset_path=dataset, total_steps=STEPS, batch_size=32, eval_every=100,
                eval_episodes=1, hidden_sizes=(16, 16), vae_hidden=16, cuda=False)
    for resume, changes, error in [
            (tmp_path / "nope.pt", {}, "cannot read checkpoint"),
            (uninterrupted / "cpq.pt", {}, "not a resumable checkpoint"),
            (resumable, {"batch_size": 64}, r"differ from the interrupted run's: --batch-size \(was 32\)"),
            (resumable, {"total_steps": 800}, r"--total-steps \(was 400\)"),
            (resumable, {"save_path": str(tmp_path / "out" / "cpq.pt")}, "--save-path"),
            (resumable, {"hidden_sizes": (32, 32)}, "checkpoint is for"),
            (resumable, {"env_id": "OfflineBallRun-v0"}, "checkpoint is for")]:
        with pytest.raises(cpq.InputError, match=error), capsys.disabled():  # Bullet's env builder vs pytest capture
            cpq.main(cpq.Args(**{**same, **changes, "resume": str(resume)}))
    assert not (tmp_path / "out").exists()  # refused before any work
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "cpq.py"), *flags(dataset, tmp_path / "cpq.pt"),
                           "--resume", str(tmp_path / "nope.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "nope.pt" in proc.stderr, proc.stderr
