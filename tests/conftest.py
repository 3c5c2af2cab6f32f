"""Shared fixtures: a small synthetic DSRL-format dataset written against the real env's spaces."""
import os
import sys

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the algorithm files live at the top level
os.environ.setdefault("DSRL_SUPPRESS_IMPORT_ERROR", "1")

ENV_ID = "OfflineCarRun-v0"
OBS_DIM, ACT_DIM, HORIZON = 7, 2, 200


def synthetic_dataset(num_episodes=4, horizon=HORIZON, seed=0, obs_dim=OBS_DIM, act_dim=ACT_DIM):
    """Episodes of random CarRun-shaped transitions: each ends in a timeout, costs are 0/1."""
    rng = np.random.default_rng(seed)
    n = num_episodes * horizon
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    next_obs = np.roll(obs, -1, axis=0)
    timeouts = np.zeros(n, dtype=bool)
    timeouts[horizon - 1::horizon] = True
    return {
        "observations": obs, "next_observations": next_obs,
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.uniform(0, 3, size=n).astype(np.float32),
        "costs": (rng.random(n) < 0.1).astype(np.float32),
        "terminals": np.zeros(n, dtype=bool), "timeouts": timeouts,
    }


def write_hdf5(path, data):
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
    return str(path)


@pytest.fixture
def dataset_file(tmp_path):
    return write_hdf5(tmp_path / "synthetic.hdf5", synthetic_dataset())
