"""marvel_full.py: every flag documented, each pipeline variant runs end to end, bad input is one line."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ACT_DIM, ENV_ID, OBS_DIM, ROOT

import marvel_full

TINY = ["--no-cuda", "--hidden-sizes", "32", "32", "--vae-hidden", "32", "--eval-episodes", "1",
        "--offline-steps", "4", "--offline-eval-every", "2", "--vpa-steps", "3",
        "--online-episodes", "2", "--episodes-per-iter", "2", "--updates-per-iter", "2", "--eval-every", "2"]


def run(*flags, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "marvel_full.py"), *flags], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_help_lists_every_flag_with_its_docstring(tmp_path):
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.replace("│", " ").split())
    for field in dataclasses.fields(marvel_full.Args):
        assert re.search(rf"--{field.name.replace('_', '-')}(?![\w-])", text), field.name
    args_source = open(os.path.join(ROOT, "marvel_full.py")).read().split("class Args")[1].split("\n\n\n")[0]
    helps = re.findall(r"^    \w+: .*?  # (.*)$", args_source, re.M)  # the inline comment after each field
    assert len(helps) == len(dataclasses.fields(marvel_full.Args))
    for doc in helps:
        assert " ".join(doc.split())[:40] in text, doc


@pytest.mark.parametrize("flags, stages, algo, kind", [
    ([], ["safe_iql", "vpa", "online"], "safe_iql+vpa+sac_lag", "apid"),              # the default
    (["--offline-algo", "cpq"], ["cpq", "vpa", "online"], "cpq+vpa+sac_lag", "apid"),  # Marvel (+ --paper)
    (["--no-vpa"], ["safe_iql", "online"], "safe_iql+sac_lag", "apid"),                # Warm Start / aPID-only
    (["--lagrangian", "dual"], ["safe_iql", "vpa", "online"], "safe_iql+vpa+sac_lag", "dual"),  # VPA-only
    (["--lagrangian", "pid"], ["safe_iql", "vpa", "online"], "safe_iql+vpa+sac_lag", "pid"),    # VPA+PID
    (["--no-pretrain"], ["online"], "sac_lag", "apid"),                                # From Scratch
    (["--offline-cost-limit", "40"], ["safe_iql", "vpa", "online"], "safe_iql+vpa+sac_lag", "apid"),  # 40 → 20
])
def test_pipeline_variants(tmp_path, dataset_file, flags, stages, algo, kind):
    save_dir = tmp_path / "out"
    proc = run(*TINY, "--dataset-path", dataset_file, "--save-dir", str(save_dir), *flags, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.load(open(save_dir / "summary.json"))
    assert summary["stages"] == stages and summary["online_episodes"] == 2 and summary["wall_time_s"] > 0
    expected_rows = {"safe_iql": "offline", "cpq": "offline", "vpa": "after VPA", "online": "final"}
    assert list(summary["eval"]) == [expected_rows[s] for s in stages]
    files = {"safe_iql": "safe_iql.pt", "cpq": "cpq.pt", "vpa": "vpa.pt", "online": "sac_lag.pt"}
    listed = [f for f in os.listdir(save_dir) if not f.startswith("events.out.tfevents.")]  # TensorBoard's, beside
    assert sorted(listed) == sorted([files[s] for s in stages] + ["sac_lag_progress.csv", "summary.json"])
    final = torch.load(save_dir / "sac_lag.pt", weights_only=True)
    assert final["algo"] == algo and final["lagrange"]["kind"] == kind and final["step"] == 400
    if "vpa" in stages:  # VPA moved the critics and kept the actor
        offline, aligned = (torch.load(save_dir / files[f], weights_only=True) for f in (stages[0], "vpa"))
        assert all(torch.equal(offline["actor"][k], aligned["actor"][k]) for k in offline["actor"])
        assert not torch.equal(offline["critic"]["weights.0"], aligned["critic"]["weights.0"])
    for name in summary["eval"]:  # a row of the summary table: its name, then numbers
        assert re.search(rf"^{name}\s+-?\d", proc.stdout, re.M), name
    if stages[0] in ("safe_iql", "cpq"):  # stage 1 trains for the offline limit, the online stage for --cost-limit
        offline_limit = 40.0 if "--offline-cost-limit" in flags else 20.0
        assert torch.load(save_dir / files[stages[0]], weights_only=True)["cost_limit"] == offline_limit
        assert final["cost_limit"] == 20.0
        offline_row = summary["eval"]["offline"]  # normalised at the online limit like every row
        assert offline_row["normalized_cost"] == pytest.approx(offline_row["cost"] / 20.0)
    if "vpa" in stages:
        assert torch.load(save_dir / "vpa.pt", weights_only=True)["cost_limit"] == 20.0


def test_offline_checkpoint_is_reused_and_checked(tmp_path, dataset_file):
    import cpq
    torch.manual_seed(0)
    agent = cpq.CPQ(OBS_DIM, ACT_DIM, cpq.Args(hidden_sizes=(32, 32), vae_hidden=32), q_thres=8.66)
    cpq.save_checkpoint(str(tmp_path / "cpq.pt"), agent.checkpoint(agent.args, ENV_ID, OBS_DIM, ACT_DIM, 1))
    proc = run(*TINY, "--dataset-path", dataset_file, "--save-dir", str(tmp_path / "out"),
               "--offline-checkpoint", str(tmp_path / "cpq.pt"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["stages"] == ["loaded", "vpa", "online"] and "offline" not in summary["wall_seconds"]
    assert not os.path.exists(tmp_path / "out" / "cpq.pt") and not os.path.exists(tmp_path / "out" / "safe_iql.pt")
    for bad_flags, message in [
        (["--offline-checkpoint", str(tmp_path / "cpq.pt"), "--hidden-sizes", "64", "64"], "checkpoint is for"),
        (["--offline-checkpoint", str(tmp_path / "cpq.pt"), "--no-pretrain"], "contradict"),
        (["--alpha-vpa", "0.01", "--alpha-c-vpa", "0.02"], "alpha-c-vpa"),
        (["--offline-steps", "0"], ">= 1"),
        (["--offline-actor-lr", "0"], "--offline-actor-lr 0.0: must be > 0"),
        (["--offline-cost-limit", "-1"], "must be >= 0"),
        (["--env-id", "OfflineNoSuchTask-v0"], "no online defaults"),
        (["--dataset-path", str(tmp_path / "missing.hdf5")], "missing.hdf5"),
    ]:
        proc = run(*TINY, "--save-dir", str(tmp_path / "bad"), *bad_flags, cwd=tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and message in proc.stderr, bad_flags
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("start", ["scratch", "checkpoint"])
def test_online_stage_reproduces_sac_lag_apid(tmp_path, start):
    """marvel_full.py's online stage is sac_lag_apid.py: same seed and start ⇒ the same episodes and weights."""
    flags = ["--no-cuda", "--hidden-sizes", "32", "32", "--eval-episodes", "1", "--online-episodes", "4",
             "--episodes-per-iter", "2", "--updates-per-iter", "3", "--eval-every", "2", "--seed", "3"]
    if start == "scratch":
        marvel_flags, standalone_flags = ["--no-pretrain"], ["--init", "scratch"]
    else:
        import cpq
        torch.manual_seed(0)
        agent = cpq.CPQ(OBS_DIM, ACT_DIM, cpq.Args(hidden_sizes=(32, 32), vae_hidden=32), q_thres=8.66)
        init = str(tmp_path / "cpq.pt")
        # no stored evaluation: marvel_full.py evaluates it first, and its reseeded online stage must not care
        cpq.save_checkpoint(init, agent.checkpoint(agent.args, ENV_ID, OBS_DIM, ACT_DIM, 1))
        marvel_flags, standalone_flags = ["--offline-checkpoint", init, "--no-vpa"], ["--init", init]
    proc = run(*flags, *marvel_flags, "--save-dir", str(tmp_path / "m"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sac_lag_apid.py"), *flags, *standalone_flags,
                           "--save-path", str(tmp_path / "s" / "sac_lag.pt")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (open(tmp_path / "m" / "sac_lag_progress.csv").read()
            == open(tmp_path / "s" / "sac_lag_progress.csv").read())
    a, b = (torch.load(tmp_path / d / "sac_lag.pt", weights_only=True) for d in ("m", "s"))
    assert a["algo"] == b["algo"] and a["lagrange"] == b["lagrange"]
    for net in ("actor", "critic", "cost_critic"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net


@pytest.mark.parametrize("algo, nets", [("cpq", ("vae",)), ("safe_iql", ("value", "cost_value"))])
def test_offline_stage_reproduces_the_standalone_file(tmp_path, dataset_file, algo, nets):
    """marvel_full.py's stage 1 is cpq.py / safe_iql.py: same seed, data and budget ⇒ the same checkpoint, bit for
    bit (so a marvel_full.py run with the defaults also is a default safe_iql.py run)."""
    shared = ["--no-cuda", "--hidden-sizes", "32", "32", "--eval-episodes", "1", "--seed", "5",
              "--dataset-path", dataset_file, *(["--vae-hidden", "32"] if algo == "cpq" else [])]
    proc = run(*shared, "--offline-algo", algo, "--offline-steps", "6", "--offline-eval-every", "3", "--vpa-steps",
               "1", "--online-episodes", "1", "--episodes-per-iter", "1", "--updates-per-iter", "1", "--eval-every",
               "1", "--save-dir", str(tmp_path / "m"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{algo}.py"), *shared, "--total-steps", "6",
                           "--eval-every", "3", "--save-path", str(tmp_path / "s" / f"{algo}.pt")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / f"{algo}.pt", weights_only=True) for d in ("m", "s"))
    assert a["algo"] == b["algo"] == algo and a["step"] == b["step"] and a["eval"] == b["eval"]
    for net in ("actor", "critic", "critic_target", "cost_critic", "cost_critic_target", *nets):
        assert a[net].keys() == b[net].keys() and all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net


def test_resume_reruns_from_the_last_finished_stage(tmp_path, dataset_file):
    """--resume SAVE_DIR reuses safe_iql.pt and vpa.pt and reruns stage 3, which is reseeded: the same result as the
    uninterrupted run; a finished run is not resumed."""
    save_dir = tmp_path / "out"
    proc = run(*TINY, "--dataset-path", dataset_file, "--save-dir", str(save_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run(*TINY, "--dataset-path", dataset_file, "--resume", str(save_dir), cwd=tmp_path)
    assert proc.returncode != 0 and "nothing to resume" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    finished = torch.load(save_dir / "sac_lag.pt", weights_only=True)
    os.remove(save_dir / "sac_lag.pt")  # as if stage 3 had been interrupted
    stamp = os.path.getmtime(save_dir / "vpa.pt")
    proc = run(*TINY, "--dataset-path", dataset_file, "--resume", str(save_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.getmtime(save_dir / "vpa.pt") == stamp, "a finished stage is not rerun"
    resumed = torch.load(save_dir / "sac_lag.pt", weights_only=True)
    for net in ("actor", "critic", "cost_critic"):
        assert all(torch.equal(finished[net][k], resumed[net][k]) for k in finished[net]), net
