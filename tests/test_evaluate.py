"""benchmark/evaluate.py as a subprocess: its numbers are the training files' evaluate(), the GIF, one-line errors."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ACT_DIM, ENV_ID, OBS_DIM, ROOT

SCRIPT = os.path.join(ROOT, "benchmark", "evaluate.py")
SEED, COST_LIMIT = 3, 10.0
# the reference, in its own process like the script (Bullet's env builder and pytest's output capture do not mix):
# cpq.py's evaluate() after the same seeding, once over two episodes and once episode by episode
REFERENCE = f"""
import json, sys, numpy as np, torch
sys.path.insert(0, {ROOT!r})
import cpq
actor = cpq.Actor({OBS_DIM}, {ACT_DIM}, (32, 32))
actor.load_state_dict(torch.load(sys.argv[1], weights_only=True)["actor"])
out = {{}}
for key, calls in (("both", [2]), ("each", [1, 1])):
    np.random.seed({SEED}); torch.manual_seed({SEED})
    env = cpq.make_env({ENV_ID!r}, {SEED})
    out[key] = [cpq.evaluate(actor, env, n, {COST_LIMIT}, torch.device("cpu")) for n in calls]
print(json.dumps(out))
"""


def run(*flags, cwd):
    return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import cpq
    torch.manual_seed(0)
    agent = cpq.CPQ(OBS_DIM, ACT_DIM, cpq.Args(hidden_sizes=(32, 32), vae_hidden=32), q_thres=8.66)
    path = str(tmp_path_factory.mktemp("ckpt") / "cpq.pt")
    cpq.save_checkpoint(path, agent.checkpoint(agent.args, ENV_ID, OBS_DIM, ACT_DIM, 1))
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    proc = subprocess.run([sys.executable, "-c", REFERENCE, checkpoint], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def episode_rows(stdout):
    return [(float(r), float(c)) for r, c in re.findall(r"^\s+\d+\s+(-?[\d.]+)\s+(-?[\d.]+)$", stdout, re.M)]


def test_prints_each_episode_and_the_normalised_means(tmp_path, checkpoint, reference):
    proc = run("--checkpoint", checkpoint, "--episodes", "2", "--seed", str(SEED), "--cost-limit", str(COST_LIMIT),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    both, each = reference["both"][0], reference["each"]
    assert episode_rows(proc.stdout) == [(round(e["return"], 1), round(e["cost"], 1)) for e in each]
    mean = re.search(r"^\s+mean\s+(-?[\d.]+)\s+(-?[\d.]+)$", proc.stdout, re.M)
    assert mean and (float(mean[1]), float(mean[2])) == (round(both["return"], 1), round(both["cost"], 1))
    norm = re.search(r"normalised \(DSRL, d = 10\): return (-?[\d.]+), cost (-?[\d.]+)", proc.stdout)
    assert norm and (norm[1], norm[2]) == (f"{both['normalized_return']:.3f}", f"{both['normalized_cost']:.3f}")


def test_video_is_a_gif_of_the_first_episode(tmp_path, checkpoint, reference):
    from PIL import Image
    video = tmp_path / "episode.gif"
    proc = run("--checkpoint", checkpoint, "--episodes", "1", "--seed", str(SEED), "--video", str(video),
               "--video-frames", "4", "--video-size", "64", "48", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = reference["each"][0]
    # rendering changes nothing: the episode is the reference's first
    assert episode_rows(proc.stdout) == [(round(first["return"], 1), round(first["cost"], 1))]
    with Image.open(video) as gif:
        assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (64, 48)
        colours = np.unique(np.asarray(gif.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 10  # a rendered scene, not a blank frame
    assert not os.path.exists(str(video) + ".tmp")


@pytest.mark.parametrize("case", ["missing", "text", "foreign", "mismatch", "episodes", "folder", "suffix"])
def test_bad_input_is_one_line_before_any_work(tmp_path, checkpoint, case):
    import cpq
    flags = ["--checkpoint", checkpoint]
    if case == "missing":
        flags, expected = ["--checkpoint", str(tmp_path / "none.pt")], "no such file"
    elif case == "text":
        (tmp_path / "notes.txt").write_text("not a checkpoint\n")
        flags, expected = ["--checkpoint", str(tmp_path / "notes.txt")], "cannot read checkpoint"
    elif case == "foreign":
        torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
        flags, expected = ["--checkpoint", str(tmp_path / "foreign.pt")], "not an o2o-safe-rl/1 checkpoint"
    elif case == "mismatch":  # CarRun's observation has 7 entries, not 9
        agent = cpq.CPQ(9, ACT_DIM, cpq.Args(hidden_sizes=(32, 32), vae_hidden=32), q_thres=8.66)
        cpq.save_checkpoint(str(tmp_path / "nine.pt"), agent.checkpoint(agent.args, ENV_ID, 9, ACT_DIM, 1))
        flags, expected = ["--checkpoint", str(tmp_path / "nine.pt")], "checkpoint is for"
    elif case == "episodes":
        flags, expected = flags + ["--episodes", "0"], "--episodes must be >= 1"
    elif case == "folder":
        flags, expected = flags + ["--video", str(tmp_path / "no" / "such" / "dir" / "a.gif")], "cannot write there"
    else:
        flags, expected = flags + ["--video", str(tmp_path / "a.mp4")], "only GIF"
    proc = run(*flags, cwd=tmp_path)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error:") and expected in lines[0], proc.stderr
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "no").exists()
