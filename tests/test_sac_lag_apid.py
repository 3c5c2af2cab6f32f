"""aPID / PID / dual controllers against hand computations, SAC-Lag loss signs, and CLI smoke runs."""
import os
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import ACT_DIM, ENV_ID, OBS_DIM, ROOT

import sac_lag_apid as sl


def reference_apid(costs, d, k0, delay, rho=0.9, rates=(0.05, 0.05, 0.05), adaptive=True):
    """A literal transcription of docs/algorithms.md's aPID (lists, no deque), independent of the implementation."""
    kp, ki, kd = k0
    integral = p = cbar = 0.0
    history = [0.0]
    out = []
    for J in costs:
        e = J - d
        integral = max(0.0, integral + ki * e)
        p = rho * p + (1 - rho) * e
        cbar = rho * cbar + (1 - rho) * J
        D = max(0.0, cbar - history[0])
        lam = max(0.0, kp * p + integral + kd * D)
        history = (history + [cbar])[-delay:]
        if adaptive:
            c = sum(history) / len(history) + 0.1
            s = statistics.pstdev(history)
            kp = kp * max(0.0, 1 + rates[0] * (c - d) / c)
            ki = ki * max(0.0, 1 + rates[1] * (c - d) / c)
            kd = kd * (1 + rates[2] * s / c)
            kp, ki, kd = (min(max(k, k_0 / 10), 10 * k_0) for k, k_0 in zip((kp, ki, kd), k0))
        out.append((lam, kp, ki, kd))
    return out


def run(controller, costs):
    return [(controller.update(J), controller.kp, controller.ki, controller.kd) for J in costs]


def test_apid_first_two_steps_by_hand():
    c = sl.AdaptivePIDLagrangian(20.0, kp=0.1, ki=0.01, kd=0.05, delay=3)
    # step 1, J = 40: e = 20, I = 0.2, p = 2, c̄ = 4, D = 4 − 0 → λ = 0.1·2 + 0.2 + 0.05·4 = 0.6
    # H = [0, 4]: c̃ = 2.1, σ = 2 → K_p = 0.1(1 + 0.05(2.1 − 20)/2.1), K_i likewise, K_d = 0.05(1 + 0.05·2/2.1)
    assert c.update(40.0) == pytest.approx(0.6)
    assert (c.kp, c.ki, c.kd) == pytest.approx((0.0573810, 0.00573810, 0.0523810), rel=1e-5)
    # step 2, J = 40: I = 0.2 + 0.0057381·20, p = 3.8, c̄ = 7.6, D = 7.6 − H[oldest] = 7.6 − 0
    assert c.update(40.0) == pytest.approx(0.0573810 * 3.8 + 0.2 + 0.00573810 * 20 + 0.0523810 * 7.6, rel=1e-5)
    assert c.history[0] == 0.0 and len(c.history) == 3


@pytest.mark.parametrize("name, costs", [
    ("sustained violation", [45.0] * 40),
    ("sustained safety", [5.0] * 40),
    ("oscillation", [0.0, 40.0] * 20),
    ("violation then safety", [60.0] * 15 + [2.0] * 25),
])
def test_apid_matches_reference_sequence(name, costs):
    k0 = (0.05, 0.01, 0.01)
    got = run(sl.AdaptivePIDLagrangian(20.0, *k0, delay=10), costs)
    want = reference_apid(costs, 20.0, k0, delay=10)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-9, abs=1e-12)


def test_apid_behaviour_per_case():
    k0 = (0.05, 0.01, 0.01)
    violating = run(sl.AdaptivePIDLagrangian(20.0, *k0), [45.0] * 60)
    assert violating[5][0] > 0.5 and violating[-1][0] > violating[5][0]  # λ reacts within a few iterations, grows
    assert violating[-1][1] > k0[0]  # once the smoothed cost passes the limit, gains grow
    safe = run(sl.AdaptivePIDLagrangian(20.0, *k0), [5.0] * 40)
    assert all(lam == 0.0 for lam, *_ in safe)  # anti-windup: no negative integral, λ stays at 0
    assert safe[-1][1:3] == pytest.approx((k0[0] / 10, k0[1] / 10))  # K_p, K_i shrunk to the floor
    assert all(step[3] >= k0[2] for step in safe)  # K_d's factor 1 + a·σ/c̃ never shrinks it


def test_gain_clip_upper_bound():
    k0 = (0.05, 0.01, 0.01)
    out = run(sl.AdaptivePIDLagrangian(20.0, *k0, adapt_rates=(1.0, 1.0, 1.0)), [400.0] * 200)
    assert out[-1][1] == pytest.approx(10 * k0[0]) and out[-1][2] == pytest.approx(10 * k0[1])
    assert max(step[3] for step in out) <= 10 * k0[2] + 1e-12


def test_non_negative_guard():
    """J far below the limit: c̃ = 0.1 < d/21, so the raw factor 1 + a(c̃ − d)/c̃ = −8.95 is negative. The guard
    makes it 0 and the clip lifts the gain to K⁰/10; no gain is ever negative."""
    c = sl.AdaptivePIDLagrangian(20.0, 0.05, 0.01, 0.01)
    c.update(0.0)
    assert (c.kp, c.ki) == pytest.approx((0.005, 0.001))
    out = run(sl.AdaptivePIDLagrangian(20.0, 0.05, 0.01, 0.01), [0.0, 100.0, 0.0, 0.5] * 10)
    assert all(min(step) >= 0 for step in out)


def test_pid_keeps_gains_fixed():
    costs = [45.0, 0.0, 30.0, 10.0] * 5
    out = run(sl.AdaptivePIDLagrangian(20.0, 0.05, 0.01, 0.01, adaptive=False), costs)
    assert {step[1:] for step in out} == {(0.05, 0.01, 0.01)}
    for got, want in zip(out, reference_apid(costs, 20.0, (0.05, 0.01, 0.01), 10, adaptive=False)):
        assert got == pytest.approx(want)


def test_dual_is_projected_ascent():
    c = sl.DualAscentLagrangian(20.0, lr=0.1, lam=0.5)
    assert [c.update(J) for J in (30.0, 10.0, 0.0, 0.0, 25.0)] == pytest.approx([1.5, 0.5, 0.0, 0.0, 0.5])
    assert sl.FixedLagrangian(0.7).update(100.0) == 0.7


def tiny_agent(alpha=0.1):
    torch.manual_seed(0)
    args = sl.Args(hidden_sizes=(32, 32), bc_weight=0.0,  # the paper's SAC-Lag actor (the bc form: test_safe_finetune)
                   actor_lr=1e-3, critic_lr=1e-3, cost_critic_lr=1e-3, alpha=alpha)
    return sl.SACLag(OBS_DIM, ACT_DIM, args)


def test_critic_targets_by_hand():
    agent = tiny_agent(alpha=0.2)
    obs = torch.randn(4, OBS_DIM)
    reward, cost = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    term = torch.tensor([0.0, 1.0, 0.0, 0.0])  # row 1 is terminal: no bootstrap
    torch.manual_seed(3)
    y, y_c = agent.critic_targets(reward, cost, obs, term)
    torch.manual_seed(3)
    with torch.no_grad():
        a, logp = agent.actor(obs)
        q = agent.critic_target(obs, a).min(0).values
        qc = agent.cost_critic_target(obs, a)[0]
    for i in range(4):
        boot = 0.0 if i == 1 else 0.99
        assert y[i].item() == pytest.approx(reward[i].item() + boot * (q[i] - 0.2 * logp[i]).item(), rel=1e-5)
        assert y_c[i].item() == pytest.approx(cost[i].item() + boot * qc[i].item(), rel=1e-5)  # no entropy


def test_cost_target_passes_a_negative_bootstrap_through():
    """y_c = c + γ(1−term)·Qc'(s', a') as the paper has it: a negative Qc' is not clamped at 0."""
    agent = tiny_agent(alpha=0.2)
    with torch.no_grad():
        agent.cost_critic_target.biases[-1].fill_(-50.0)  # every Qc'(s', a') far below zero
    obs, cost, term = torch.randn(4, OBS_DIM), torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.zeros(4)
    torch.manual_seed(3)
    _, y_c = agent.critic_targets(torch.zeros(4), cost, obs, term)
    torch.manual_seed(3)
    with torch.no_grad():
        qc = agent.cost_critic_target(obs, agent.actor(obs)[0])[0]
    assert (qc < 0).all()
    assert torch.allclose(y_c, cost + 0.99 * qc) and (y_c < 0).all()


def test_actor_loss_signs():
    agent = tiny_agent(alpha=0.2)
    obs = torch.randn(16, OBS_DIM)
    torch.manual_seed(1)
    loss0, logp, qc = agent.actor_loss(obs, None, lam=0.0)
    torch.manual_seed(1)
    loss1, _, _ = agent.actor_loss(obs, None, lam=1.0)
    torch.manual_seed(1)
    a, _ = agent.actor(obs)
    q = agent.critic(obs, a).min(0).values
    assert loss0.item() == pytest.approx((0.2 * logp - q).mean().item(), rel=1e-5)  # +α log π, −Q
    # +λ·Qc (a difference of two sums: float32 rounding)
    assert (loss1 - loss0).item() == pytest.approx(qc.mean().item(), rel=1e-3, abs=1e-6)


def test_large_lambda_lowers_policy_cost_value():
    agent = tiny_agent()
    obs = torch.randn(256, OBS_DIM)
    with torch.no_grad():
        agent.cost_critic.biases[-1].fill_(0.0)
        agent.cost_critic.weights[-1].normal_()  # give Qc a clear slope in the action
    det = lambda: agent.cost_critic(obs, agent.actor(obs, deterministic=True)[0])[0].mean().item()
    before = det()
    for _ in range(30):
        loss, *_ = agent.actor_loss(obs, None, lam=100.0)
        agent.actor_opt.zero_grad()
        loss.backward()
        agent.actor_opt.step()
    assert det() < before


def test_update_leaves_critic_grads_enabled_and_is_finite():
    agent = tiny_agent()
    batch = [torch.randn(32, OBS_DIM), torch.rand(32, ACT_DIM) * 2 - 1, torch.rand(32), torch.rand(32).round(),
             torch.randn(32, OBS_DIM), torch.zeros(32)]
    info = agent.update(*batch, lam=0.5)
    assert all(torch.isfinite(v) for v in info.values())
    assert all(p.requires_grad for p in agent.critic.parameters())


def test_replay_buffer_wraps():
    buf = sl.ReplayBuffer(5, OBS_DIM, ACT_DIM, torch.device("cpu"))
    for start in (0, 3):
        buf.add({k: torch.full((3, OBS_DIM) if "obs" in k else (3, ACT_DIM) if k == "actions" else (3,),
                               float(start + 1)) for k in sl.REPLAY_KEYS})
    assert buf.size == 5 and buf.pos == 1
    assert buf.data["rewards"].tolist() == [4.0, 1.0, 1.0, 4.0, 4.0]


def cli(*flags, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sac_lag_apid.py"), "--no-cuda",
                           "--hidden-sizes", "32", "32", "--online-episodes", "4", "--episodes-per-iter", "2",
                           "--updates-per-iter", "3", "--eval-every", "2", "--eval-episodes", "1", *flags],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("lagrangian", ["apid", "pid", "dual", "fixed"])
def test_cli_from_scratch(tmp_path, lagrangian):
    proc = cli("--lagrangian", lagrangian, "--lagrangian-init", "0.3", "--save-path", str(tmp_path / "s.pt"),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)
    assert ckpt["lagrange"]["kind"] == lagrangian and ckpt["algo"] == "sac_lag" and ckpt["step"] == 800
    rows = open(tmp_path / "s_progress.csv").read().splitlines()
    assert len(rows) == 1 + 3 + 2  # header, 3 evaluations (start, 2, 4 episodes), 2 iterations
    if lagrangian == "fixed":
        assert ckpt["lagrange"]["lam"] == 0.3


def test_cli_from_checkpoint_and_strict_refusal(tmp_path, dataset_file):
    import cpq
    torch.manual_seed(0)
    agent = cpq.CPQ(OBS_DIM, ACT_DIM, cpq.Args(hidden_sizes=(32, 32), vae_hidden=32), q_thres=8.66)
    cpq.save_checkpoint(str(tmp_path / "cpq.pt"), agent.checkpoint(agent.args, ENV_ID, OBS_DIM, ACT_DIM, 1))
    proc = cli("--init", str(tmp_path / "cpq.pt"), "--offline-ratio", "0.5", "--dataset-path", dataset_file,
               "--save-path", str(tmp_path / "s.pt"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.load(tmp_path / "s.pt", weights_only=True)["algo"] == "cpq+sac_lag"
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "sac_lag_apid.py"), "--no-cuda", "--init",
                          str(tmp_path / "cpq.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "checkpoint is for" in bad.stderr
