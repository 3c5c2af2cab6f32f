"""The dataset block (reference copy in cpq.py): resolution order (no download), validation errors."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ACT_DIM, ENV_ID, OBS_DIM, ROOT, synthetic_dataset, write_hdf5

import cpq

DSRL_FILE = "SafetyDroneRun-v0-140-1990.hdf5"
DSRL_URL = "http://data.offline-saferl.org/download/" + DSRL_FILE
NO_BUNDLE_ENV = "OfflineDroneRun-v0"  # no datasets/OfflineDroneRun-v0.hdf5 in the repo: exercises later steps


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "dsrl_cache"
    d.mkdir()
    monkeypatch.setenv("DSRL_DATASET_DIR", str(d))
    return d


def test_explicit_path_wins(dataset_file, cache_dir):
    write_hdf5(cache_dir / DSRL_FILE, synthetic_dataset())
    assert cpq.find_dataset(NO_BUNDLE_ENV, DSRL_URL, dataset_file) == dataset_file


def test_explicit_path_missing_is_an_error_even_with_a_cached_file(tmp_path, cache_dir):
    """--dataset-path is taken at its word: a missing file is refused, not replaced by the cache or the bundle."""
    write_hdf5(cache_dir / "SafetyCarRun-v0-40-651.hdf5", synthetic_dataset())
    url = "http://data.offline-saferl.org/download/SafetyCarRun-v0-40-651.hdf5"
    missing = str(tmp_path / "nope.hdf5")
    with pytest.raises(cpq.InputError) as e:
        cpq.find_dataset(ENV_ID, url, missing)
    msg = str(e.value)
    assert msg.startswith(f"no dataset at {missing};") and "\n" not in msg
    assert str(cache_dir) not in msg and "datasets/" not in msg.split(";")[0]


def test_dsrl_cache_before_bundled(cache_dir):
    cached = write_hdf5(cache_dir / "SafetyCarRun-v0-40-651.hdf5", synthetic_dataset())
    url = "http://data.offline-saferl.org/download/SafetyCarRun-v0-40-651.hdf5"
    assert cpq.find_dataset(ENV_ID, url) == cached


def test_bundled_after_cache(cache_dir, capsys):
    url = "http://data.offline-saferl.org/download/SafetyCarRun-v0-40-651.hdf5"
    path = cpq.find_dataset(ENV_ID, url)
    assert path == os.path.join(ROOT, "datasets", f"{ENV_ID}.hdf5")
    assert "not DSRL's" in capsys.readouterr().out


def test_nothing_found_names_every_place_and_both_remedies(cache_dir):
    with pytest.raises(cpq.InputError) as e:
        cpq.find_dataset(NO_BUNDLE_ENV, DSRL_URL)
    msg = str(e.value)
    assert "\n" not in msg
    for part in (str(cache_dir / DSRL_FILE), "datasets/OfflineDroneRun-v0.hdf5", "--dataset-path",
                 "python benchmark/collect_dataset.py --env-id OfflineDroneRun-v0"):
        assert part in msg
    assert not os.listdir(cache_dir)  # nothing is downloaded or written


def test_load_valid_dataset(dataset_file):
    data = cpq.load_dataset(dataset_file, OBS_DIM, ACT_DIM)
    assert set(data) == set(cpq.DSRL_KEYS)
    assert all(v.dtype == np.float32 for v in data.values())
    assert data["observations"].shape == (800, OBS_DIM) and data["timeouts"].sum() == 4


def test_scalar_keys_may_be_column_vectors(tmp_path):
    d = synthetic_dataset()
    d["rewards"] = d["rewards"][:, None]
    data = cpq.load_dataset(write_hdf5(tmp_path / "d.hdf5", d), OBS_DIM, ACT_DIM)
    assert data["rewards"].shape == (800,)


def _broken(key, value=None, drop=False):
    d = synthetic_dataset()
    if drop:
        del d[key]
    else:
        d[key] = value(d[key])
    return d


@pytest.mark.parametrize("data, message", [
    (_broken("costs", drop=True), r"missing keys \['costs'\]"),
    (_broken("observations", lambda v: v[:, :5]), r"'observations' has shape \(800, 5\), expected \(800, 7\)"),
    (_broken("actions", lambda v: np.concatenate([v, v], 1)), r"'actions' has shape \(800, 4\), expected \(800, 2\)"),
    (_broken("rewards", lambda v: v[:-1]), r"'rewards' has shape \(799,\), expected \(800,\)"),
    (_broken("observations", lambda v: v.astype(np.int64)), "'observations' must be floating point"),
    (_broken("terminals", lambda v: np.full(v.shape, 2)), "'terminals' must be boolean"),
    (_broken("rewards", lambda v: np.where(np.arange(len(v)) == 3, np.nan, v)), "'rewards' has 1 non-finite"),
    (_broken("next_observations", lambda v: v * np.inf), "'next_observations' has .* non-finite"),
])
def test_validation_errors(tmp_path, data, message):
    path = write_hdf5(tmp_path / "bad.hdf5", data)
    with pytest.raises(cpq.InputError, match=message) as e:
        cpq.load_dataset(path, OBS_DIM, ACT_DIM)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)


def test_not_hdf5(tmp_path):
    path = tmp_path / "junk.hdf5"
    path.write_text("not hdf5")
    with pytest.raises(cpq.InputError, match="not a readable HDF5 file"):
        cpq.load_dataset(str(path), OBS_DIM, ACT_DIM)


def test_missing_dataset_cli_is_one_line_error(tmp_path):
    """No dataset anywhere: exit != 0, one line naming where it looked and how to make one, no traceback."""
    env = {**os.environ, "DSRL_DATASET_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "cpq.py"), "--env-id", NO_BUNDLE_ENV,
                           "--no-cuda", "--save-path", str(tmp_path / "out" / "cpq.pt")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"cpq.py: error: no dataset at {tmp_path}")
    assert "datasets/OfflineDroneRun-v0.hdf5" in lines[0]
    assert "python benchmark/collect_dataset.py --env-id OfflineDroneRun-v0" in lines[0]


def _dsrl_load(path, env_id=ENV_ID):
    """dsrl's own loader, in a subprocess: Bullet's env builder fflushes sys.stdout by name through ctypes,
    which fails under pytest's output capture."""
    code = ("import os, sys, numpy as np; os.environ['DSRL_SUPPRESS_IMPORT_ERROR'] = '1'; "
            "import dsrl, gymnasium as gym; "
            f"d = gym.make('{env_id}').get_dataset(h5path=sys.argv[1]); np.savez(sys.argv[2], **d)")
    out = path + ".npz"
    proc = subprocess.run([sys.executable, "-c", code, path, out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(np.load(out))


def test_dsrl_loader_accepts_bundled_file(tmp_path):
    import shutil
    path = shutil.copy(os.path.join(ROOT, "datasets", f"{ENV_ID}.hdf5"), tmp_path / "bundled.hdf5")
    data = _dsrl_load(str(path))
    ends = np.flatnonzero(data["timeouts"] | data["terminals"])
    starts = np.r_[0, ends[:-1] + 1]
    costs = np.array([data["costs"][s:e + 1].sum() for s, e in zip(starts, ends)])
    returns = np.array([data["rewards"][s:e + 1].sum() for s, e in zip(starts, ends)])
    assert len(ends) == 651 and costs.min() == 0 and costs.max() <= 40
    assert (costs <= 20).mean() >= 1 / 3 and (costs > 20).mean() >= 1 / 3
    assert returns.max() - returns.min() >= 300
    cpq.load_dataset(os.path.join(ROOT, "datasets", f"{ENV_ID}.hdf5"), OBS_DIM, ACT_DIM)  # and ours


def test_dsrl_loader_accepts_bundled_ballrun_file(tmp_path):
    import shutil
    path = shutil.copy(os.path.join(ROOT, "datasets", "OfflineBallRun-v0.hdf5"), tmp_path / "bundled.hdf5")
    data = _dsrl_load(str(path), "OfflineBallRun-v0")
    assert len(data["rewards"]) == 1000 * 100 and data["timeouts"].sum() == 1000 and not data["terminals"].any()
    costs, returns = data["costs"].reshape(1000, 100).sum(1), data["rewards"].reshape(1000, 100).sum(1)
    assert costs.min() == 0 and costs.max() <= 80 and 0.2 <= (costs <= 20).mean() <= 0.5
    assert np.median(returns[costs <= 20]) == pytest.approx(337.7, abs=0.05)  # the number the README quotes
    cpq.load_dataset(str(path), 7, 2)


@pytest.mark.parametrize("env_id, horizon", [("OfflineCarRun-v0", 200), ("OfflineBallRun-v0", 100),
                                             ("OfflineBallCircle-v0", 200), ("OfflineCarCircle-v0", 300)])
def test_collector_output_loads_in_dsrl(tmp_path, env_id, horizon):
    out = tmp_path / "c.hdf5"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "collect_dataset.py"), "--env-id", env_id,
                           "--num-trajectories", "4", "--oversample", "2", "--workers", "1", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = _dsrl_load(str(out), env_id)
    assert len(data["rewards"]) == 4 * horizon and data["timeouts"].sum() == 4
    with h5py.File(out) as f:
        assert f.attrs["trajectories"] == 4 and "collect_dataset.py" in f.attrs["command"]
    assert (tmp_path / "c.png").stat().st_size > 0


def test_grid_select_covers_cost_bins_evenly():
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    from collect_dataset import grid_select
    rng = np.random.default_rng(0)
    costs = np.r_[np.zeros(900), rng.uniform(0, 40, 100)]  # heavy mass at cost 0
    returns = rng.uniform(0, 500, 1000)
    kept = grid_select(costs, returns, 100, 4, 4, rng)
    assert len(kept) == 100 and len(set(kept)) == 100
    assert (costs[kept] > 10).sum() >= 60  # the sparse costly bins keep all they have (≈ 75)


def _episodes(data, horizon):
    return data["costs"].reshape(-1, horizon).sum(1), data["rewards"].reshape(-1, horizon).sum(1)


@pytest.mark.parametrize("env_id, count, horizon, max_cost, median_safe", [
    ("OfflineBallCircle-v0", 800, 200, 80, 206.18), ("OfflineCarCircle-v0", 520, 300, 100, 153.92)])
def test_dsrl_loader_accepts_bundled_circle_files(tmp_path, env_id, count, horizon, max_cost, median_safe):
    """The two Circle files: DSRL's loader reads them, and they have the shape datasets/README.md states."""
    import shutil
    bundled = os.path.join(ROOT, "datasets", f"{env_id}.hdf5")
    assert os.path.getsize(bundled) <= 10e6
    data = _dsrl_load(str(shutil.copy(bundled, tmp_path / "bundled.hdf5")), env_id)
    assert len(data["rewards"]) == count * horizon and data["timeouts"].sum() == count and not data["terminals"].any()
    costs, returns = _episodes(data, horizon)
    assert costs.min() == 0 and costs.max() <= max_cost
    assert (costs <= 20).mean() >= 1 / 3 and (costs > 20).mean() >= 1 / 3
    assert returns.max() - returns.min() >= 250
    assert np.median(returns[costs <= 20]) == pytest.approx(median_safe, abs=0.005)  # the number the READMEs quote
    cpq.load_dataset(bundled, 8, 2)


def _collect(tmp_path, env_id, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "collect_dataset.py"), "--env-id", env_id,
                           "--workers", "1", *flags], capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("env_id, horizon, obs_dim, act_dim", [("OfflineDroneRun-v0", 200, 17, 4),
                                                                ("OfflineAntRun-v0", 200, 33, 8)])
def test_collector_trains_behaviour_agents_for_tasks_without_a_controller(tmp_path, env_id, horizon, obs_dim,
                                                                          act_dim):
    """DSRL's recipe with a tiny budget: one SAC-Lag agent (1 episode, a few updates), rolled out with noise; the
    file loads in DSRL and here; a second call reuses the agent and writes the same data."""
    tiny = ["--num-trajectories", "10", "--oversample", "1", "--agent-episodes", "1",
            "--agent-updates-per-step", "0.005", "--agent-cost-limits", "20", "--agents-dir", "agents"]
    first = _collect(tmp_path, env_id, *tiny, "--output", "a.hdf5")
    assert first.returncode == 0, first.stderr[-2000:]
    agents = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "agents") for f in fs if f == "sac_lag.pt"]
    assert len(agents) == 1 and f"limit20_ep1_" in agents[0]
    data = _dsrl_load(str(tmp_path / "a.hdf5"), env_id)
    assert len(data["rewards"]) == 10 * horizon and data["timeouts"].sum() == 10
    cpq.load_dataset(str(tmp_path / "a.hdf5"), obs_dim, act_dim)
    with h5py.File(tmp_path / "a.hdf5") as f:
        assert "SAC-Lag agents trained by this collector at cost limits 20" in f.attrs["behaviour"]
    second = _collect(tmp_path, env_id, *tiny, "--output", "b.hdf5")
    assert second.returncode == 0 and "reusing 1 of 1" in second.stdout, second.stderr[-2000:]
    with h5py.File(tmp_path / "a.hdf5") as a, h5py.File(tmp_path / "b.hdf5") as b:
        for k in ("observations", "actions", "rewards", "costs"):
            np.testing.assert_array_equal(a[k][()], b[k][()])


@pytest.mark.parametrize("flags, message", [
    (["--safe-share", "0.7"], "--safe-share"), (["--agent-cost-limits", "-5"], "--agent-cost-limits"),
    (["--agent-episodes", "0"], "--agent-episodes"), (["--output", "/proc/nope/x.hdf5"], "/proc/nope")])
def test_collector_bad_flags_are_one_line_errors(tmp_path, flags, message):
    proc = _collect(tmp_path, "OfflineDroneRun-v0", *flags)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not os.listdir(tmp_path), "nothing is trained or written before the flags are checked"


def test_safe_share_puts_a_share_on_each_side_of_the_limit():
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    from collect_dataset import Args, select_trajectories
    rng = np.random.default_rng(0)
    costs = rng.uniform(0, 80, 2000)  # the plain grid keeps about a quarter at cost <= 20
    returns = costs * 5 + rng.uniform(0, 100, 2000)
    plain = select_trajectories(costs, returns, 400, Args(safe_share=0.0, cost_max=80), rng)
    shared = select_trajectories(costs, returns, 400, Args(safe_share=0.4, cost_max=80), rng)
    assert (costs[plain] <= 20).mean() < 0.35
    assert len(shared) == 400 and len(set(shared)) == 400
    assert (costs[shared] <= 20).sum() == 160 and (costs[shared] > 20).sum() == 240
    few_safe = np.r_[rng.uniform(0, 20, 50), rng.uniform(20.5, 80, 1950)]  # fewer safe episodes than the share
    kept = select_trajectories(few_safe, returns, 400, Args(safe_share=0.4, cost_max=80), rng)
    assert len(kept) == 400 and (few_safe[kept] <= 20).sum() == 50
