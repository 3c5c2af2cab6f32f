"""cpq.py, bear_lag.py and stage 1 of marvel_full.py survive Ctrl-C: they keep a resumable checkpoint, and --resume
ends the run exactly as if it had never stopped (the same tensors, the same evaluations, on CPU)."""
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV_ID, ROOT, synthetic_dataset, write_hdf5

import cpq
import marvel_full

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


def sigint_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """Ctrl-C the process as soon as `ready()` holds (or it ends, or the timeout passes), then wait for it."""
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=timeout)


@pytest.mark.parametrize("when", ["before the first evaluation", "after an evaluation"])
def test_ctrl_c_then_resume_equals_the_uninterrupted_run(when, dataset, uninterrupted, tmp_path):
    resume = tmp_path / "cpq_resume.pt"
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cpq.py"), *flags(dataset, tmp_path / "cpq.pt")],
                                stdout=out, stderr=err, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # Ctrl-C is caught once the start line is printed; the evaluation at step 100 writes the resumable file
        started = (lambda: "transitions from" in stdout.read_text()) if when.startswith("before") else resume.exists
        sigint_when(proc, started)
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


# marvel_full.py: stage 1 (cpq.py's loop) keeps cpq_resume.pt the same way and --resume SAVE_DIR continues it bit for
# bit; an interrupted stage 2 or 3 starts over from the last finished stage's checkpoint.


def marvel_flags(dataset, save_dir):
    return ["--no-cuda", "--hidden-sizes", "16", "16", "--vae-hidden", "16", "--eval-episodes", "1",
            "--offline-steps", str(STEPS), "--offline-eval-every", "100", "--offline-batch-size", "32",
            "--vpa-steps", "3", "--online-episodes", "2", "--episodes-per-iter", "2", "--updates-per-iter", "2",
            "--eval-every", "2", "--dataset-path", dataset, "--save-dir", str(save_dir)]


def differing(a, b):
    """The keys (flattened) at which two checkpoint files differ, tensors compared exactly (NaN equals NaN: a Spearman
    ρ of a critic whose Monte-Carlo costs are all 0 is NaN in both runs)."""
    ours, theirs = flat(torch.load(a, weights_only=True)), flat(torch.load(b, weights_only=True))
    assert ours.keys() == theirs.keys()
    nan = lambda v: isinstance(v, float) and v != v
    return {k for k in ours if (not torch.equal(ours[k], theirs[k]) if torch.is_tensor(ours[k])
                                else ours[k] != theirs[k] and not (nan(ours[k]) and nan(theirs[k])))}


def run_marvel(args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "marvel_full.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def marvel_uninterrupted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("marvel_uninterrupted")
    run_marvel(marvel_flags(dataset, out), out)
    assert not (out / "cpq_resume.pt").exists()  # a finished stage 1 leaves nothing to resume
    return out


def test_marvel_ctrl_c_in_stage_1_then_resume_equals_the_uninterrupted_run(dataset, marvel_uninterrupted, tmp_path):
    out, stderr = tmp_path / "out", tmp_path / "stderr.txt"
    resume = out / "cpq_resume.pt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "marvel_full.py"), *marvel_flags(dataset, out)],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
        # the evaluation at step 100 writes the resumable state; Ctrl-C then stops CPQ a step or so later, between
        # evaluations, so --resume must carry the optimizers and RNGs of an arbitrary step
        sigint_when(proc, resume.exists)
    message = stderr.read_text()
    assert proc.returncode == 130 and "Traceback" not in message, message[-2000:]
    state = torch.load(resume, weights_only=True)
    assert message.strip().splitlines()[-1] == (f"marvel_full.py: interrupted in stage 1 (CPQ) at step "
                                                f"{state['step']}: resumable state {resume}; continue with --resume "
                                                f"{out}")
    assert 100 <= state["step"] < STEPS and not (out / "vpa.pt").exists()

    run_marvel([*marvel_flags(dataset, out), "--resume", str(out)], tmp_path)
    assert not resume.exists()
    # stage 1 ends bit for bit as if never stopped (its RNGs and eval env included), so VPA after it and the online
    # stage do too
    for name in ("cpq.pt", "vpa.pt", "sac_lag.pt"):
        assert differing(out / name, marvel_uninterrupted / name) <= {"args.save_dir", "args.resume"}, name
    assert (out / "sac_lag_progress.csv").read_text() == (marvel_uninterrupted / "sac_lag_progress.csv").read_text()


def test_marvel_resume_refuses_what_cannot_continue_the_run(dataset, marvel_uninterrupted, tmp_path, capsys):
    same = dict(env_id=ENV_ID, dataset_path=dataset, cuda=False, hidden_sizes=(16, 16), vae_hidden=16,
                eval_episodes=1, offline_steps=STEPS, offline_eval_every=100, offline_batch_size=32, vpa_steps=3,
                online_episodes=2, episodes_per_iter=2, updates_per_iter=2, eval_every=2)
    stage_1_done, stage_2_done, interrupted = (tmp_path / d for d in ("stage_1_done", "stage_2_done", "interrupted"))
    for folder, files in ((stage_1_done, ["cpq.pt"]), (stage_2_done, ["cpq.pt", "vpa.pt"])):
        folder.mkdir()
        for name in files:  # in the order the run wrote them: a vpa.pt older than cpq.pt is not this run's
            shutil.copy(marvel_uninterrupted / name, folder)
    interrupted.mkdir()  # the flags checks only look at these parts of a cpq_resume.pt
    recorded = dataclasses.asdict(marvel_full.resolve_defaults(marvel_full.Args(**same)))
    torch.save({**torch.load(marvel_uninterrupted / "cpq.pt", weights_only=True),
                "resume": {"args": recorded, "device": "cpu"}}, interrupted / "cpq_resume.pt")
    for resume, changes, error in [
            (tmp_path / "nope", {}, "no such directory"),
            (tmp_path, {}, "nothing to resume"),
            (marvel_uninterrupted, {}, "the run finished"),
            (interrupted, {"offline_batch_size": 64}, r"run's: --offline-batch-size \(was 32\)$"),
            (interrupted, {"hidden_sizes": (32, 32)}, "checkpoint is for"),
            (interrupted, {"save_dir": str(tmp_path / "elsewhere")}, "continues the run in that folder"),
            (stage_1_done, {"offline_actor_lr": 1e-3}, r"run's: --offline-actor-lr \(was 0.0001\)$"),
            (stage_1_done, {"vpa_steps": 5}, r"--vpa-steps \(was 3\)$"),
            (stage_1_done, {"offline_checkpoint": str(stage_1_done / "cpq.pt")}, "--offline-checkpoint"),
            (stage_2_done, {"actor_lr": 1e-3}, r"--actor-lr \(was 5e-05\)$")]:  # vpa.pt records every flag
        with pytest.raises(marvel_full.InputError, match=error), capsys.disabled():  # Bullet's env builder vs capture
            marvel_full.main(marvel_full.Args(**{**same, **changes, "resume": str(resume)}))
    assert not (tmp_path / "nope").exists() and not (tmp_path / "elsewhere").exists()  # refused before any work
    assert sorted(os.listdir(stage_1_done)) == ["cpq.pt"] and sorted(os.listdir(stage_2_done)) == ["cpq.pt", "vpa.pt"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "marvel_full.py"), *marvel_flags(dataset, stage_1_done),
                           "--vpa-steps", "5", "--resume", str(stage_1_done)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--vpa-steps (was 3)" in proc.stderr, proc.stderr


def test_marvel_resume_after_stage_2_restarts_the_online_stage_from_vpa_pt(dataset, marvel_uninterrupted, tmp_path):
    out = tmp_path / "out"  # what a run interrupted in stage 3 leaves (its partial files aside)
    out.mkdir()
    for name in ("cpq.pt", "vpa.pt"):
        shutil.copy(marvel_uninterrupted / name, out)
    run_marvel([*marvel_flags(dataset, out), "--resume", str(out)], tmp_path)
    # the online stage reseeds and starts from vpa.pt, so restarting it ends as the uninterrupted run did
    assert differing(out / "sac_lag.pt", marvel_uninterrupted / "sac_lag.pt") <= {"args.save_dir", "args.resume"}
    assert (out / "cpq.pt").read_bytes() == (marvel_uninterrupted / "cpq.pt").read_bytes()  # reused as it was


def interrupt_and_resume(script, args, tmp_path, stem, resume_suffix="_resume.pt"):
    """Run `script args SAVE` to the end in whole/, again in cut/ stopped by Ctrl-C once its resumable file exists
    (at an arbitrary step after the first evaluation), then `--resume` it there. Returns (whole, cut, the resumable
    state, the interrupted run's last stderr line, the resumed run's stdout); every run's exit status is checked."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for d in (whole, cut):
        d.mkdir()
    path = os.path.join(ROOT, script)
    proc = subprocess.run([sys.executable, path, *args, str(whole / f"{stem}.pt")], capture_output=True, text=True,
                          cwd=whole, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (whole / f"{stem}{resume_suffix}").exists()  # a finished run leaves nothing to resume
    resume, stderr = cut / f"{stem}{resume_suffix}", cut / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, path, *args, str(cut / f"{stem}.pt")], stdout=subprocess.DEVNULL,
                                stderr=err, cwd=cut)
        sigint_when(proc, resume.exists)
    message = stderr.read_text()
    assert proc.returncode == 130 and "Traceback" not in message, message[-2000:]
    state = torch.load(resume, weights_only=True)
    proc = subprocess.run([sys.executable, path, *args, str(cut / f"{stem}.pt"), "--resume", str(resume)],
                          capture_output=True, text=True, cwd=cut, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not resume.exists()
    return whole, cut, state, message.strip().splitlines()[-1], proc.stdout


# bear_lag.py: the same contract as cpq.py (its PID multiplier's state and the MMD weight α carry over too)


def test_bear_lag_ctrl_c_then_resume_equals_the_uninterrupted_run(dataset, tmp_path):
    bear = [*flags(dataset, "unused")[:-2], "--num-samples", "3", "--save-path"]  # the save path goes last
    whole, cut, state, last_line, out = interrupt_and_resume("bear_lag.py", bear, tmp_path, "b")
    resume = cut / "b_resume.pt"
    assert last_line == (f"bear_lag.py: interrupted at step {state['step']}: resumable checkpoint {resume}; "
                         f"continue with --resume {resume}")
    assert 100 <= state["step"] < STEPS and state["algo"] == "bear_lag" and "resuming after step" in out
    for name in ("b.pt", "b_last.pt"):
        assert differing(cut / name, whole / name) <= {"args.save_path", "args.resume"}, name


# famo2o_lag.py: its offline phase keeps *_offline_resume.pt the same way; --resume continues it bit for bit, and the
# family sweep and the online phase after it then come out the same too


def test_famo2o_ctrl_c_offline_then_resume_equals_the_uninterrupted_run(dataset, tmp_path):
    fam = ["--no-cuda", "--dataset-path", dataset, "--hidden-sizes", "16", "16", "--offline-steps", str(STEPS),
           "--batch-size", "32", "--eval-every", "100", "--eval-episodes", "1", "--online-episodes", "2",
           "--episodes-per-iter", "1", "--updates-per-iter", "2", "--family-betas", "1", "5", "--save-path"]
    whole, cut, state, last_line, _ = interrupt_and_resume("famo2o_lag.py", fam, tmp_path, "f", "_offline_resume.pt")
    resume = cut / "f_offline_resume.pt"
    assert last_line == (f"famo2o_lag.py: interrupted in the offline phase at step {state['step']}: resumable state "
                         f"{resume}; continue with --resume {resume}")
    assert 100 <= state["step"] < STEPS
    for name in ("f_offline.pt", "f.pt"):
        assert differing(cut / name, whole / name) <= {"args.save_path", "args.resume"}, name
    for name in ("f_family.csv", "f_progress.csv"):
        assert (cut / name).read_text() == (whole / name).read_text(), name


# sac_lag_apid.py: the online run keeps *_resume.pt at every evaluation and on Ctrl-C (replay buffer, λ controller,
# gate, optimizers, random states, the envs' motors); --resume ends the run as if it had never stopped


@pytest.mark.parametrize("extra", [[], ["--paper"]])
def test_sac_lag_apid_ctrl_c_then_resume_equals_the_uninterrupted_run(extra, dataset, tmp_path):
    online = ["--no-cuda", "--dataset-path", dataset, "--hidden-sizes", "16", "16", "--online-episodes", "40",
              "--episodes-per-iter", "2", "--updates-per-iter", "3", "--batch-size", "16", "--eval-every", "10",
              "--eval-episodes", "1", *extra, "--save-path"]
    whole, cut, state, last_line, _ = interrupt_and_resume("sac_lag_apid.py", online, tmp_path, "s")
    assert 10 <= state["resume"]["counters"]["episodes"] < 40
    assert last_line.endswith(f"continue with --resume {cut / 's_resume.pt'}")
    assert (cut / "s_interrupted.pt").exists()  # the policy so far, for use without resuming
    assert differing(cut / "s.pt", whole / "s.pt") <= {"args.save_path", "args.resume"}
    assert (cut / "s_progress.csv").read_text() == (whole / "s_progress.csv").read_text()


# vpa.py: *_resume.pt every --eval-every steps and on Ctrl-C; --resume ends with the same vpa.pt and Spearman table


def test_vpa_ctrl_c_then_resume_equals_the_uninterrupted_run(dataset, uninterrupted, tmp_path):
    vpa = ["--no-cuda", "--init", str(uninterrupted / "cpq.pt"), "--dataset-path", dataset, "--total-steps", "3000",
           "--batch-size", "32", "--eval-every", "500", "--eval-episodes", "1", "--diagnostic-pairs", "4",
           "--mc-horizon", "20", "--save-path"]
    whole, cut, state, last_line, _ = interrupt_and_resume("vpa.py", vpa, tmp_path, "v")
    resume = cut / "v_resume.pt"
    assert 500 <= state["step"] < 3000 and last_line == (
        f"vpa.py: interrupted at step {state['step']}: resumable checkpoint {resume}; continue with --resume {resume}")
    assert differing(cut / "v.pt", whole / "v.pt") <= {"args.save_path", "args.resume"}
    assert (cut / "v_spearman.csv").read_text() == (whole / "v_spearman.csv").read_text()
