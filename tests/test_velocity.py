"""The Safety-Gymnasium velocity tasks (requirements-velocity.txt): patch script, seeding, marvel_full.py end to end.

The env tests skip when safety_gymnasium is not installed; the patch script's own tests need only the standard
library and a fake package.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, synthetic_dataset, write_hdf5

import sac_lag_apid

PATCH = os.path.join(ROOT, "benchmark", "patch_safety_gymnasium.py")
VELOCITY = ["OfflineHalfCheetahVelocityGymnasium-v1", "OfflineHopperVelocityGymnasium-v1",
            "OfflineSwimmerVelocityGymnasium-v1"]
HALF_CHEETAH = VELOCITY[0]
needs_safety_gymnasium = pytest.mark.skipif(importlib.util.find_spec("safety_gymnasium") is None,
                                            reason="safety_gymnasium not installed (requirements-velocity.txt)")
ORIGINAL = '''from dataclasses import dataclass
import numpy as np
COLOR = {'apple': np.array([0.835, 0.169, 0.169, 1])}


@dataclass
class Apples:
    name: str = 'apples'
    color: np.array = COLOR['apple']  # a comment stays
    size: float = 0.3
'''


def run_patch(pythonpath=None, *python_flags):
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else dict(os.environ)
    return subprocess.run([sys.executable, *python_flags, PATCH], capture_output=True, text=True, env=env, timeout=60)


def test_patch_rewrites_only_the_ndarray_defaults_once(tmp_path):
    package = tmp_path / "safety_gymnasium"
    (package / "assets" / "geoms").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the patch script must not import the package')\n")
    apples = package / "assets" / "geoms" / "apples.py"
    apples.write_text(ORIGINAL)
    first = run_patch(str(tmp_path))  # PYTHONPATH first: this fake package, not an installed one
    assert first.returncode == 0, first.stderr
    assert "patched safety_gymnasium/assets/geoms/apples.py:9" in first.stdout and "1 line(s) changed" in first.stdout
    patched = apples.read_text()
    assert patched.splitlines()[8] == ("    color: np.array = __import__('dataclasses').field("
                                       "default_factory=lambda: COLOR['apple'])  # a comment stays")
    assert [a for a, b in zip(ORIGINAL.splitlines(), patched.splitlines()) if a != b] == [ORIGINAL.splitlines()[8]]
    namespace = {}
    exec(compile(patched, str(apples), "exec"), namespace)  # Python 3.11 accepts it; each instance its own array
    a, b = namespace["Apples"](), namespace["Apples"]()
    assert np.array_equal(a.color, namespace["COLOR"]["apple"])
    second = run_patch(str(tmp_path))
    assert second.returncode == 0 and "0 line(s) changed (already patched)" in second.stdout
    assert apples.read_text() == patched


def test_patch_without_the_package_is_one_line():
    proc = run_patch(None, "-I", "-S")  # no site-packages: safety_gymnasium cannot be found
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("patch_safety_gymnasium.py: error: safety_gymnasium is not installed")


def test_env_defaults_hold_the_official_velocity_settings():
    d = sac_lag_apid.ENV_DEFAULTS
    assert d[HALF_CHEETAH] == d["OfflineHopperVelocityGymnasium-v1"] == dict(
        actor_lr=1e-3, critic_lr=1e-2, cost_critic_lr=1e-2, alpha=5e-3, online_episodes=5000)
    assert d["OfflineSwimmerVelocityGymnasium-v1"] == dict(
        actor_lr=1e-5, critic_lr=5e-4, cost_critic_lr=8e-4, alpha=1e-4, online_episodes=2000)


@needs_safety_gymnasium
def test_installed_package_is_patched():
    proc = run_patch()
    assert proc.returncode == 0 and "0 line(s) changed (already patched)" in proc.stdout, proc.stdout + proc.stderr


@needs_safety_gymnasium
@pytest.mark.parametrize("env_id, obs_dim, act_dim", [(VELOCITY[0], 17, 6), (VELOCITY[1], 11, 3),
                                                       (VELOCITY[2], 8, 2)])
def test_make_env_is_reproducible_without_touching_numpy(env_id, obs_dim, act_dim):
    import cpq  # imports dsrl, which registers the velocity tasks when safety_gymnasium imports

    def episode_start(seed, steps=20):
        env = cpq.make_env(env_id, seed)
        assert env.observation_space.shape == (obs_dim,) and env.action_space.shape == (act_dim,)
        assert env.spec.max_episode_steps == 1000
        obs, _ = env.reset()  # no seed: the first reset must not draw from OS entropy
        out = [obs]
        for _ in range(steps):
            obs, reward, terminated, _, info = env.step(env.action_space.sample())
            out.append(np.r_[obs, reward, info["cost"]])
            if terminated:  # Hopper can fall
                break
        return np.concatenate(out)

    state = np.random.get_state()
    a, b, c = episode_start(3), episode_start(3), episode_start(4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    after = np.random.get_state()
    assert np.array_equal(state[1], after[1]) and state[2:] == after[2:]  # numpy's global state untouched


def tensors(tree, prefix=""):
    """The tensors of a checkpoint, by path (everything a run computes; paths and times are left out)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from tensors(v, f"{prefix}{k}.")
    elif torch.is_tensor(tree):
        yield prefix, tree


@needs_safety_gymnasium
def test_marvel_full_runs_on_half_cheetah_and_reproduces(tmp_path):
    data = write_hdf5(tmp_path / "hc.hdf5", synthetic_dataset(obs_dim=17, act_dim=6, horizon=1000, num_episodes=2))
    tiny = ["--env-id", HALF_CHEETAH, "--no-cuda", "--hidden-sizes", "32", "32", "--vae-hidden", "32",
            "--offline-steps", "4", "--offline-eval-every", "2", "--vpa-steps", "3", "--online-episodes", "2",
            "--episodes-per-iter", "2", "--updates-per-iter", "2", "--eval-episodes", "1", "--eval-every", "2",
            "--dataset-path", data, "--seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "marvel_full.py"), *tiny, "--save-dir",
                              str(tmp_path / f"run{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path, env=env) for i in (1, 2)]  # both at once: half the wall time
    for proc in runs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
    summary = json.load(open(tmp_path / "run1" / "summary.json"))
    assert summary["stages"] == ["safe_iql", "vpa", "online"] and summary["online_episodes"] == 2
    final = torch.load(tmp_path / "run1" / "sac_lag.pt", weights_only=True)
    assert (final["env_id"], final["obs_dim"], final["act_dim"], final["step"]) == (HALF_CHEETAH, 17, 6, 2000)
    for name in ("safe_iql.pt", "vpa.pt", "sac_lag.pt"):
        a, b = (dict(tensors(torch.load(tmp_path / f"run{i}" / name, weights_only=True))) for i in (1, 2))
        assert a and a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
