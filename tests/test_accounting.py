"""Honest accounting of the online phase: every online episode over d is a violation (the learner's test episodes
too), the learner's evaluation is an opt-in diagnostic counted apart, the `offline` baseline never changes its
policy, and the tables report a sample std and a 95 % interval."""
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from conftest import ACT_DIM, ENV_ID, OBS_DIM, ROOT

import sac_lag_apid as sl

sys.path.insert(0, os.path.join(ROOT, "benchmark"))


def stage(tmp_path, monkeypatch, capsys, episode_costs, eval_costs=(), learner_eval=False, **overrides):
    """An OnlineStage whose episodes have the given costs (one list per iteration) and whose evaluation episodes
    have `eval_costs` in turn (one per call of `evaluate`, i.e. per evaluation episode of the learner)."""
    costs, evals = iter(episode_costs), iter(eval_costs)

    def collect(envs, actor, device, deterministic=False):
        c = np.asarray(next(costs)[:len(envs)], dtype=float)
        n = len(envs)
        steps = {"observations": np.zeros((n, OBS_DIM), np.float32), "actions": np.zeros((n, ACT_DIM), np.float32),
                 "rewards": np.ones(n, np.float32), "costs": c.astype(np.float32),
                 "next_observations": np.zeros((n, OBS_DIM), np.float32), "terminals": np.zeros(n, np.float32)}
        return steps, np.full(n, 100.0), c

    def fake_evaluate(actor, env, episodes, cost_limit, device):
        cost = next(evals, 0.0)
        return {"return": 1.0, "cost": cost, "normalized_return": 0.0, "normalized_cost": cost / cost_limit}

    monkeypatch.setattr(sl, "collect_episodes", collect)
    monkeypatch.setattr(sl, "evaluate", fake_evaluate)
    args = sl.online_defaults(sl.Args(**{"hidden_sizes": (16, 16), "online_episodes": 6, "episodes_per_iter": 3,
                                         "updates_per_iter": 1, "batch_size": 4, "eval_every": 3, "eval_episodes": 2,
                                         "offline_ratio": 0.0, **overrides}))
    with capsys.disabled():  # Bullet's import redirects the C-level stderr, which pytest's capture does not allow
        env = sl.make_env(ENV_ID, 0)
    torch.manual_seed(0)
    agent = sl.SACLag(OBS_DIM, ACT_DIM, args)
    return sl.OnlineStage(args, agent, [env] * 3, env, None, SummaryWriter(str(tmp_path)),
                          str(tmp_path / "progress.csv"), 16, learner_eval, torch.device("cpu"))


def test_every_online_episode_over_the_limit_is_counted(tmp_path, monkeypatch, capsys):
    # gated: the first iteration's first episode is the learner's test (cost 30: a violation, counted like any other)
    online = stage(tmp_path, monkeypatch, capsys, [[30.0], [0.0, 21.0], [20.0, 25.0, 19.0]])
    online.iteration()  # test episode 30 (> 20), deployed episodes 0 and 21 (> 20)
    assert online.violations == 2 and online.episodes == 3
    online.iteration()  # the test waits after a failed one: deployed episodes 20 (= d, no violation), 25, 19
    assert online.violations == 3 and online.episodes == 6
    assert online.cumulative_cost == pytest.approx(30 + 0 + 21 + 20 + 25 + 19)
    assert online.learner_eval_episodes == 0, "the learner is not evaluated unless asked"


def test_learner_evaluation_is_counted_apart(tmp_path, monkeypatch, capsys):
    # evaluate() calls: deployed (start), learner × 2 (start), deployed, learner × 2 after iteration 1
    online = stage(tmp_path, monkeypatch, capsys, [[0.0], [0.0, 0.0]], eval_costs=[0.0, 25.0, 5.0, 0.0, 40.0, 30.0],
                   learner_eval=True)
    assert (online.learner_eval_episodes, online.learner_eval_violations) == (2, 1)
    online.iteration()
    assert (online.learner_eval_episodes, online.learner_eval_violations) == (4, 3)
    assert online.violations == 0, "the learner's evaluation episodes are not online episodes"
    summary = online.finish(str(tmp_path / "s.pt"), "sac_lag")
    assert summary["learner_eval_violations"] == 3 and summary["interrupted"]
    rows = open(tmp_path / "progress.csv").read().splitlines()
    assert rows[0].endswith("learner_eval_violations") and rows[-1].endswith(",3")


def test_no_updates_keeps_the_starting_policy(tmp_path, monkeypatch, capsys):
    """`--updates-per-iter 0` (run_grid.py's `offline` method): the policy that starts the run is the one saved."""
    online = stage(tmp_path, monkeypatch, capsys, [[5.0, 5.0, 5.0]] * 2, deploy="learner", cost_signal="episodes",
                   updates_per_iter=0)
    before = {k: v.clone() for k, v in online.agent.actor.state_dict().items()}
    online.iteration()
    online.iteration()
    saved = torch.load(online.finish(str(tmp_path / "s.pt"), "cpq+sac_lag")["checkpoint"], weights_only=True)
    assert all(torch.equal(before[k], saved["actor"][k]) for k in before)


def test_offline_method_flags_parse():
    import run_grid
    import tyro
    parsed = tyro.cli(sl.Args, args=run_grid.METHODS["offline"][1])
    assert (parsed.updates_per_iter, parsed.deploy, run_grid.METHODS["offline"][0]) == (0, "learner", "offline")


def test_table_cells_give_sample_std_and_a_95_percent_interval():
    import plot
    # mean 2, sample std 1, t(0.975, 2) = 4.3027: half-width 4.3027 / √3 = 2.484
    assert plot.mean_std([1.0, 2.0, 3.0], 1) == "2.0 ± 1.0 [-0.5, 4.5]"
    assert plot.mean_std([7.0], 1) == "7.0" and plot.mean_std([], 1) == "—"
