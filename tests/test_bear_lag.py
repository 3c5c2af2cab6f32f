"""BEAR-Lag: MMD, mixed max-over-samples targets, the Qc PID multiplier, checkpoints, --resume, CLI."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ACT_DIM, ENV_ID, OBS_DIM, ROOT

import bear_lag
import cpq


def small_agent(seed=0, **overrides):
    torch.manual_seed(seed)
    args = bear_lag.Args(hidden_sizes=(32, 32), vae_hidden=32, **overrides)
    return bear_lag.BEARLag(OBS_DIM, ACT_DIM, args, q_thres=bear_lag.episode_q_threshold(20, 0.99, 200))


def batch(b=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, OBS_DIM, generator=g), torch.rand(b, ACT_DIM, generator=g) * 2 - 1,
            torch.rand(b, generator=g), (torch.rand(b, generator=g) < 0.3).float(),
            torch.randn(b, OBS_DIM, generator=g), (torch.rand(b, generator=g) < 0.2).float())


def test_gaussian_mmd_matches_hand_computation():
    # σ = 0.5, so k(a, b) = exp(−‖a − b‖²): x = {(0,0), (1,0)}, y = {(0,1)}
    #   mean k(x, x) = (1 + e⁻¹ + e⁻¹ + 1)/4,  mean k(y, y) = 1,  mean k(x, y) = (e⁻¹ + e⁻²)/2
    x, y = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    expected = math.sqrt((2 + 2 * math.exp(-1)) / 4 + 1 - (math.exp(-1) + math.exp(-2)) + 1e-6)  # ≈ 1.08661
    torch.testing.assert_close(bear_lag.gaussian_mmd(x, y, sigma=0.5), torch.tensor([expected]))
    # σ = 50 (the default) divides ‖a − b‖² by 2σ = 100, not by 2σ² = 5000: distance 10 gives k = e⁻¹
    x, y = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[10.0, 0.0]]])
    expected = math.sqrt(1 + 1 - 2 * math.exp(-1) + 1e-6)  # ≈ 1.12438
    torch.testing.assert_close(bear_lag.gaussian_mmd(x, y, sigma=50.0), torch.tensor([expected]))
    same = torch.randn(3, 4, ACT_DIM)
    torch.testing.assert_close(bear_lag.gaussian_mmd(same, same, 50.0), torch.full((3,), 1e-3))  # sqrt(1e-6)


def test_mixed_max_target_hand_case():
    # 2 states × 3 samples, state-major columns; mix = 0.75·min + 0.25·max per sample, then max per state
    q = torch.tensor([[1.0, 5.0, 2.0, 0.0, -1.0, 3.0],
                      [3.0, 4.0, 2.0, 1.0, -2.0, 0.0]])
    # per sample: 1.5, 4.25, 2 | 0.25, −1.75, 0.75
    torch.testing.assert_close(bear_lag.mixed_max_target(q, 3, 0.75), torch.tensor([4.25, 0.75]))
    # one member (the cost critic): the plain max over the samples, pessimistic about cost
    torch.testing.assert_close(bear_lag.mixed_max_target(q[:1], 3, 0.75), torch.tensor([5.0, 3.0]))


def test_samplers_match_the_shared_networks():
    """sample_pretanh draws Actor.forward's distribution; tanh of vae_pretanh_samples is VAE.decode's prior sample."""
    agent = small_agent()
    obs = batch()[0]
    torch.manual_seed(4)
    act, u = bear_lag.sample_pretanh(agent.actor, obs, 1)
    torch.manual_seed(4)
    torch.testing.assert_close(act[:, 0], agent.actor(obs)[0])
    torch.testing.assert_close(torch.tanh(u), act)
    torch.manual_seed(4)
    raw = bear_lag.vae_pretanh_samples(agent.vae, obs, 1)
    torch.manual_seed(4)
    torch.testing.assert_close(torch.tanh(raw[:, 0]), agent.vae.decode(obs))
    assert bear_lag.sample_pretanh(agent.actor, obs, 10)[1].shape == (16, 10, ACT_DIM)


def test_critic_targets_match_per_sample_loop():
    """Target actor and target critics, N samples per s', mix then max, bootstrap cut by term only."""
    agent = small_agent()
    with torch.no_grad():  # make online and target networks differ, so using the wrong one would show
        for p in [*agent.actor.parameters(), *agent.critic.parameters(), *agent.cost_critic.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    _, _, reward, cost, next_obs, term = batch(b=6)
    term[0] = 1.0
    n = agent.args.num_samples
    torch.manual_seed(9)
    y, y_c = agent.critic_targets(reward, cost, next_obs, term)
    torch.manual_seed(9)
    next_act, _ = bear_lag.sample_pretanh(agent.actor_target, next_obs, n)
    with torch.no_grad():
        for b in range(6):
            qs, qcs = [], []
            for i in range(n):
                q = agent.critic_target(next_obs[b:b + 1], next_act[b, i:i + 1])[:, 0]
                qs.append(0.75 * q.min() + 0.25 * q.max())
                qcs.append(agent.cost_critic_target(next_obs[b:b + 1], next_act[b, i:i + 1])[0, 0])
            not_done = 1.0 - term[b]
            torch.testing.assert_close(y[b], reward[b] + 0.99 * not_done * torch.stack(qs).max())
            torch.testing.assert_close(y_c[b], cost[b] + 0.99 * not_done * torch.stack(qcs).max())
    assert y[0] == reward[0] and y_c[0] == cost[0]


def test_pid_multiplier_hand_sequence():
    pid = bear_lag.QcPIDLagrangian(qc_thres=10.0, kp=0.1, ki=0.003, kd=0.001)
    # e = 2, 5, 1, −6, −8, 10;  I = 2, 7, 8, 2, 0 (clipped), 10;  D = 2, 3, 0, 0, 0, 18
    # λ = 0.1·max(0, e) + 0.003·I + 0.001·D
    expected = [0.208, 0.524, 0.124, 0.006, 0.0, 1.048]
    lams = [pid.update(torch.tensor(q)).item() for q in (12.0, 15.0, 11.0, 4.0, 2.0, 20.0)]
    assert lams == pytest.approx(expected, abs=1e-6)
    state = pid.state_dict()
    assert state["lam"] == pytest.approx(1.048, abs=1e-6) and state["integral"] == pytest.approx(10.0)
    assert state["prev_error"] == pytest.approx(10.0) and all(type(v) in (str, float) for v in state.values())
    low = bear_lag.QcPIDLagrangian(qc_thres=10.0, kp=0.1, ki=0.003, kd=0.001)
    assert all(low.update(torch.tensor(q)).item() == 0.0 for q in (3.0, 1.0, 0.0))  # never negative


@pytest.mark.parametrize("epsilon, rises", [(-1.0, True), (10.0, False)])
def test_alpha_rises_while_mmd_exceeds_epsilon(epsilon, rises):
    agent = small_agent(mmd_epsilon=epsilon, alpha_lr=0.1)
    info = agent.update(*batch())
    assert (info["losses/mmd"] > epsilon) == rises
    assert (agent.log_alpha.item() > 0) == rises


def test_update_is_deterministic_on_cpu():
    results = []
    for _ in range(2):
        agent = small_agent(seed=3)
        torch.manual_seed(11)
        results.append([{k: v.item() for k, v in agent.update(*batch(seed=s)).items()} for s in range(3)])
    assert results[0] == results[1]
    assert all(np.isfinite(v) for step in results[0] for v in step.values())


def test_checkpoint_round_trip_and_strict_refusal(tmp_path):
    agent = small_agent()
    agent.update(*batch())
    path = str(tmp_path / "b.pt")
    bear_lag.save_checkpoint(path, agent.checkpoint(agent.args, ENV_ID, OBS_DIM, ACT_DIM, step=5))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "o2o-safe-rl/1" and raw["algo"] == "bear_lag" and raw["step"] == 5
    for key in ("critic", "critic_target", "cost_critic", "cost_critic_target", "vae", "actor_target", "log_alpha"):
        assert key in raw
    assert raw["lagrange"]["kind"] == "qc_pid" and isinstance(raw["lagrange"]["lam"], float)
    ckpt = bear_lag.load_checkpoint(path, ENV_ID, OBS_DIM, ACT_DIM, (32, 32))
    actor = bear_lag.Actor(OBS_DIM, ACT_DIM, (32, 32))
    actor.load_state_dict(ckpt["actor"])  # strict by default
    shapes = {k: v.shape for k, v in cpq.Actor(OBS_DIM, ACT_DIM, (32, 32)).state_dict().items()}
    assert {k: v.shape for k, v in ckpt["actor"].items()} == shapes
    obs = torch.randn(4, OBS_DIM)
    assert torch.equal(actor(obs, deterministic=True)[0], agent.actor(obs, deterministic=True)[0])
    for bad in [("OfflineBallRun-v0", OBS_DIM, ACT_DIM, (32, 32)), (ENV_ID, 8, ACT_DIM, (32, 32)),
                (ENV_ID, OBS_DIM, 3, (32, 32)), (ENV_ID, OBS_DIM, ACT_DIM, (256, 256))]:
        with pytest.raises(bear_lag.InputError, match="checkpoint is for"):
            bear_lag.load_checkpoint(path, *bad)


def test_last_checkpoint_restores_the_whole_training_state(tmp_path):
    """What *_last.pt holds (networks, log α, the PID's state, the optimizers) is all the next update depends on
    besides the random numbers: a fresh agent loaded from it takes the very same step."""
    agent = small_agent(alpha_lr=0.1)
    for s in range(3):
        agent.update(*batch(seed=s))
    path = str(tmp_path / "b_last.pt")
    optimizers = {k: v.state_dict() for k, v in vars(agent).items() if isinstance(v, torch.optim.Optimizer)}
    assert set(optimizers) == {"actor_opt", "critics_opt", "vae_opt", "alpha_opt"}
    bear_lag.save_checkpoint(path, {**agent.checkpoint(agent.args, ENV_ID, OBS_DIM, ACT_DIM, step=3),
                                    "optimizers": optimizers})
    fresh = small_agent(seed=5, alpha_lr=0.1)
    fresh.load(bear_lag.load_checkpoint(path, ENV_ID, OBS_DIM, ACT_DIM, (32, 32)))
    assert agent.lagrangian.integral.item() > 0 or agent.lagrangian.prev_error.item() != 0  # a state to restore
    for k in ("lam", "integral", "prev_error"):
        assert torch.equal(getattr(fresh.lagrangian, k), getattr(agent.lagrangian, k))
    assert torch.equal(fresh.log_alpha, agent.log_alpha) and agent.log_alpha.item() != 0
    steps = []
    for a in (agent, fresh):
        torch.manual_seed(7)
        steps.append({k: v.item() for k, v in a.update(*batch(seed=9)).items()})
    assert steps[0] == steps[1]
    for (name, p), q in zip(agent.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def run(script, *flags, cwd):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--no-cuda", *flags], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_cli_smoke_and_checkpoint_accepted_downstream(dataset_file, tmp_path):
    save = tmp_path / "out" / "b.pt"
    code, err = finish(run("bear_lag.py", "--total-steps", "4", "--eval-every", "2", "--eval-episodes", "1",
                           "--batch-size", "32", "--hidden-sizes", "32", "32", "--vae-hidden", "32",
                           "--dataset-path", dataset_file, "--save-path", str(save), cwd=tmp_path))
    assert code == 0, err[-2000:]
    best, last = torch.load(save, weights_only=True), torch.load(tmp_path / "out" / "b_last.pt", weights_only=True)
    assert last["step"] == 4 and best["step"] in (2, 4) and best["algo"] == "bear_lag"
    assert list((tmp_path / "out").glob("events.out.tfevents.*")) and not (tmp_path / "runs").exists()  # TB beside
    # the next stages take it as their --init (run side by side)
    sac = run("sac_lag_apid.py", "--init", str(save), "--hidden-sizes", "32", "32", "--online-episodes", "2",
              "--episodes-per-iter", "2", "--updates-per-iter", "2", "--eval-every", "2", "--eval-episodes", "1",
              "--save-path", str(tmp_path / "s.pt"), cwd=tmp_path)
    vpa = run("vpa.py", "--init", str(save), "--total-steps", "3", "--batch-size", "8", "--eval-every", "3",
              "--eval-episodes", "1", "--no-diagnostic", "--dataset-path", dataset_file,
              "--save-path", str(tmp_path / "v.pt"), cwd=tmp_path)
    for name, proc in (("sac_lag_apid.py", sac), ("vpa.py", vpa)):
        code, err = finish(proc)
        assert code == 0, f"{name}: {err[-2000:]}"
    assert torch.load(tmp_path / "s.pt", weights_only=True)["algo"] == "bear_lag+sac_lag"
    assert torch.load(tmp_path / "v.pt", weights_only=True)["algo"] == "bear_lag+vpa"
    # *_last.pt: the latest evaluation with the optimizers; --resume goes on from it in place, up to the new budget
    assert set(last["optimizers"]) == {"actor_opt", "critics_opt", "vae_opt", "alpha_opt"}
    assert last["best"]["step"] == best["step"] and last["eval"]["step"] == 4
    code, err = finish(run("bear_lag.py", "--total-steps", "6", "--eval-every", "2", "--eval-episodes", "1",
                           "--batch-size", "32", "--hidden-sizes", "32", "32", "--vae-hidden", "32",
                           "--dataset-path", dataset_file, "--resume", str(save.parent / "b_last.pt"), cwd=tmp_path))
    assert code == 0, err[-2000:]
    resumed = torch.load(save.parent / "b_last.pt", weights_only=True)
    assert resumed["step"] == 6 and resumed["eval"]["step"] == 6 and not (tmp_path / "runs").exists()
    # two more updates on the loaded optimizers (Adam counts its steps), not six from fresh ones
    steps = {name: {float(s["step"]) for s in state["state"].values()} for name, state in resumed["optimizers"].items()}
    assert steps == {"actor_opt": {6.0}, "critics_opt": {6.0}, "vae_opt": {6.0}, "alpha_opt": {6.0}}
    better = bear_lag.is_better(resumed["eval"], last["best"])  # the best so far carries over
    assert resumed["best"] == (resumed["eval"] if better else last["best"])
    assert torch.load(save, weights_only=True)["step"] == resumed["best"]["step"]


@pytest.mark.parametrize("flags, needle", [(["--total-steps", "0"], "--total-steps"),
                                           (["--dataset-path", "no/such.hdf5"], "no dataset at no/such.hdf5")])
def test_cli_rejects_bad_input(flags, needle, tmp_path):
    code, err = finish(run("bear_lag.py", *flags, cwd=tmp_path))
    assert code != 0 and "Traceback" not in err and needle in err
    assert err.strip().splitlines()[-1].startswith("bear_lag.py: error:")


def test_resume_refuses_what_it_cannot_continue(dataset_file, tmp_path):
    """--resume takes a bear_lag.py *_last.pt (not a best checkpoint) and goes on in its folder."""
    agent = small_agent()
    best = tmp_path / "b.pt"
    bear_lag.save_checkpoint(str(best), agent.checkpoint(agent.args, ENV_ID, OBS_DIM, ACT_DIM, step=2))
    common = ["--hidden-sizes", "32", "32", "--vae-hidden", "32", "--dataset-path", dataset_file]
    for flags, message in [(["--resume", str(best)], f"--resume {best}: not a bear_lag.py *_last.pt checkpoint"),
                           (["--resume", str(tmp_path / "b_last.pt"), "--save-path", str(tmp_path / "c.pt")],
                            f"--save-path {tmp_path / 'c.pt'}: a resumed run goes on beside --resume, at {best}")]:
        code, err = finish(run("bear_lag.py", *common, *flags, cwd=tmp_path))
        assert code != 0 and err.strip() == f"bear_lag.py: error: {message}", err[-2000:]
