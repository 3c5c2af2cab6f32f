"""CPQ and the shared blocks it carries (networks, checkpoints, best-checkpoint rule)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from conftest import ACT_DIM, ENV_ID, OBS_DIM, ROOT

import cpq


@pytest.mark.parametrize("d, expected", [(20, 8.660), (10, 4.330), (40, 17.320)])
def test_q_threshold(d, expected):
    assert cpq.episode_q_threshold(d, 0.99, 200) == pytest.approx(expected, abs=1e-3)


def small_agent(seed=0, **overrides):
    torch.manual_seed(seed)
    args = cpq.Args(hidden_sizes=(32, 32), vae_hidden=32, **overrides)
    return cpq.CPQ(OBS_DIM, ACT_DIM, args, q_thres=cpq.episode_q_threshold(20, 0.99, 200))


def batch(b=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, OBS_DIM, generator=g), torch.rand(b, ACT_DIM, generator=g) * 2 - 1,
            torch.rand(b, generator=g), (torch.rand(b, generator=g) < 0.3).float(),
            torch.randn(b, OBS_DIM, generator=g), (torch.rand(b, generator=g) < 0.2).float())


def test_actor_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    actor = cpq.Actor(OBS_DIM, ACT_DIM, (32, 32))
    obs = torch.randn(64, OBS_DIM)
    torch.manual_seed(5)
    action, log_prob = actor(obs)
    h = actor.trunk(obs)
    dist = TransformedDistribution(Normal(actor.mu(h), actor.log_std(h).clamp(-20, 2).exp()), TanhTransform())
    assert action.shape == (64, ACT_DIM) and log_prob.shape == (64,)
    assert action.abs().max() < 1
    # clamp away from ±1 so the reference's atanh is well conditioned
    reference = dist.log_prob(action.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1)
    mask = action.abs().max(-1).values < 0.999
    torch.testing.assert_close(log_prob[mask], reference[mask], rtol=1e-4, atol=1e-4)
    det, none = actor(obs, deterministic=True)
    assert none is None and torch.equal(det, torch.tanh(actor.mu(h)))


def test_q_ensemble_members_are_independent_mlps():
    torch.manual_seed(0)
    q = cpq.QEnsemble(OBS_DIM, ACT_DIM, (16, 16), num_q=3)
    obs, act = torch.randn(5, OBS_DIM), torch.randn(5, ACT_DIM)
    out = q(obs, act)
    assert out.shape == (3, 5)
    for i in range(3):
        x = torch.cat([obs, act], -1)
        for j, (w, b) in enumerate(zip(q.weights, q.biases)):
            x = x @ w[i] + b[i]
            x = F.relu(x) if j < 2 else x
        torch.testing.assert_close(out[i], x[:, 0])


def ood_penalty(agent, obs, act, cost, next_obs, term, next_act, seed=7):
    """(penalty part of L_c, mean Qc(s, a_ood)); the seed fixes the sampled policy actions."""
    torch.manual_seed(seed)
    next_qc = agent.cost_critic_target(next_obs, next_act)[0].detach()
    loss, td, qc_ood = agent.cost_critic_loss(obs, act, cost, term, next_qc)
    return loss - td, qc_ood


@pytest.mark.parametrize("form", ["hinge", "linear"])
def test_ood_penalty_carries_gradient_into_cost_critic(form):
    agent = small_agent(ood_penalty=form)
    obs, act, _, cost, next_obs, term = batch()
    next_act = agent.actor(next_obs)[0].detach()
    penalty, qc_ood = ood_penalty(agent, obs, act, cost, next_obs, term, next_act)
    assert penalty.requires_grad
    agent.cost_critic.zero_grad()
    penalty.backward()
    grads = [p.grad for p in agent.cost_critic.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # and it pushes Qc(s, a_ood) up: one SGD step on the penalty alone raises the OOD cost estimate
    with torch.no_grad():
        for p in agent.cost_critic.parameters():
            p -= 0.01 * p.grad
    _, qc_after = ood_penalty(agent, obs, act, cost, next_obs, term, next_act)
    assert qc_after > qc_ood


def test_hinge_penalty_stops_at_qc_thres_and_linear_does_not():
    obs, act, _, cost, next_obs, term = batch()
    for form, expect_zero in [("hinge", True), ("linear", False)]:
        agent = small_agent(ood_penalty=form)
        with torch.no_grad():
            agent.cost_critic.biases[-1].fill_(agent.qc_thres + 50)  # every Qc(s, a) is far above qc_thres
        next_act = agent.actor(next_obs)[0].detach()
        penalty, _ = ood_penalty(agent, obs, act, cost, next_obs, term, next_act)
        agent.cost_critic.zero_grad()
        penalty.backward()
        grad = sum(p.grad.abs().sum() for p in agent.cost_critic.parameters())
        assert (penalty.item() == 0 and grad == 0) if expect_zero else (penalty.item() < 0 and grad > 0)


def test_ood_samples_are_the_top_quantile_by_vae_kl():
    """top-k selection = the pairs whose KL is at or above the batch's ood_quantile (the definition)."""
    agent = small_agent()
    obs = batch(b=32)[0]
    torch.manual_seed(3)
    obs_ood, act_ood = agent.ood_samples(obs)
    torch.manual_seed(3)
    obs_rep = obs.repeat_interleave(agent.args.num_ood_samples, 0)
    act_pi, _ = agent.actor(obs_rep)
    kl = agent.vae.kl(obs_rep, act_pi)
    mask = kl >= torch.quantile(kl, agent.args.ood_quantile)
    assert len(obs_ood) == mask.sum() == 80  # 25 % of 32·10
    expected = {tuple(x) for x in torch.cat([obs_rep, act_pi], 1)[mask].tolist()}
    assert {tuple(x) for x in torch.cat([obs_ood, act_ood], 1).tolist()} == expected


@pytest.mark.parametrize("escape", [True, False])
def test_actor_escape_gives_a_fully_gated_actor_a_gradient(escape):
    """All policy actions look unsafe (Qc > q_thres): the paper's loss gives the actor no gradient; the escape
    term lowers Qc(s, ã)."""
    agent = small_agent(actor_escape=escape, actor_lr=1e-2)
    with torch.no_grad():
        agent.cost_critic.biases[-1].fill_(agent.q_thres + 50)
    before = [p.detach().clone() for p in agent.actor.parameters()]
    info = agent.update(*batch(b=64))
    assert info["losses/safe_fraction"] == 0
    moved = any(not torch.equal(a, b) for a, b in zip(before, agent.actor.parameters()))
    assert moved == escape


def test_cost_td_matches_per_sample_computation():
    """No (B,) × (B, 1) broadcast: the TD error equals a per-sample loop."""
    agent = small_agent()
    obs, act, _, cost, next_obs, term = batch(b=8)
    next_act = agent.actor(next_obs)[0].detach()
    _, td, _ = agent.cost_critic_loss(obs, act, cost, term, agent.cost_critic_target(next_obs, next_act)[0].detach())
    errors = []
    with torch.no_grad():
        for i in range(8):
            y = cost[i] + 0.99 * (1 - term[i]) * agent.cost_critic_target(next_obs[i:i + 1], next_act[i:i + 1])[0, 0]
            errors.append((agent.cost_critic(obs[i:i + 1], act[i:i + 1])[0, 0] - y) ** 2)
    torch.testing.assert_close(td, torch.stack(errors).mean())


def test_update_is_deterministic_on_cpu():
    results = []
    for _ in range(2):
        agent = small_agent(seed=3)
        torch.manual_seed(11)
        results.append([{k: v.item() for k, v in agent.update(*batch(seed=s)).items()} for s in range(3)])
    assert results[0] == results[1]
    assert all(np.isfinite(v) for step in results[0] for v in step.values())


def test_alpha_rises_while_ood_cost_is_below_threshold():
    agent = small_agent(alpha_lr=0.1)
    before = agent.log_alpha_c.item()
    agent.update(*batch())  # fresh critics: Qc(s, a_ood) ≈ 0 < qc_thres ≈ 13
    assert agent.log_alpha_c.item() > before


def test_checkpoint_round_trip_and_strict_refusal(tmp_path):
    agent = small_agent()
    path = str(tmp_path / "c.pt")
    cpq.save_checkpoint(path, agent.checkpoint(agent.args, ENV_ID, OBS_DIM, ACT_DIM, step=7))
    assert not os.path.exists(path + ".tmp")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "o2o-safe-rl/1" and raw["step"] == 7 and raw["algo"] == "cpq"
    ckpt = cpq.load_checkpoint(path, ENV_ID, OBS_DIM, ACT_DIM, (32, 32))
    actor = cpq.Actor(OBS_DIM, ACT_DIM, (32, 32))
    actor.load_state_dict(ckpt["actor"])  # strict by default
    obs = torch.randn(4, OBS_DIM)
    assert torch.equal(actor(obs, deterministic=True)[0], agent.actor(obs, deterministic=True)[0])
    for bad in [("OfflineBallRun-v0", OBS_DIM, ACT_DIM, (32, 32)), (ENV_ID, 8, ACT_DIM, (32, 32)),
                (ENV_ID, OBS_DIM, 3, (32, 32)), (ENV_ID, OBS_DIM, ACT_DIM, (256, 256))]:
        with pytest.raises(cpq.InputError, match="checkpoint is for"):
            cpq.load_checkpoint(path, *bad)
    torch.save({"format": "o2o-safe-rl/1", "actor": {}}, tmp_path / "partial.pt")  # right format, keys missing
    with pytest.raises(cpq.InputError, match="checkpoint is for"):
        cpq.load_checkpoint(str(tmp_path / "partial.pt"), ENV_ID, OBS_DIM, ACT_DIM, (32, 32))
    lacking = torch.load(path, weights_only=True)
    del lacking["cost_critic"]
    torch.save(lacking, tmp_path / "lacking.pt")  # right env and sizes, a network missing
    with pytest.raises(cpq.InputError, match=r"lacks \['cost_critic'\]"):
        cpq.load_checkpoint(str(tmp_path / "lacking.pt"), ENV_ID, OBS_DIM, ACT_DIM, (32, 32))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(cpq.InputError, match="cannot read checkpoint"):
        cpq.load_checkpoint(str(junk), ENV_ID, OBS_DIM, ACT_DIM, (32, 32))


def test_best_checkpoint_rule():
    safe_low = {"normalized_cost": 0.5, "return": 100.0, "cost": 10.0}
    safe_high = {"normalized_cost": 0.9, "return": 300.0, "cost": 18.0}
    unsafe_high = {"normalized_cost": 2.0, "return": 900.0, "cost": 40.0}
    unsafe_less = {"normalized_cost": 1.5, "return": 50.0, "cost": 30.0}
    assert cpq.is_better(unsafe_high, None)
    assert cpq.is_better(safe_low, unsafe_high) and not cpq.is_better(unsafe_high, safe_low)
    assert cpq.is_better(safe_high, safe_low) and not cpq.is_better(safe_low, safe_high)
    assert cpq.is_better(unsafe_less, unsafe_high) and not cpq.is_better(unsafe_high, unsafe_less)


def test_cli_smoke(dataset_file, tmp_path):
    save = tmp_path / "out" / "cpq.pt"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "cpq.py"), "--dataset-path", dataset_file,
                           "--total-steps", "4", "--batch-size", "32", "--eval-every", "2", "--eval-episodes", "1",
                           "--hidden-sizes", "32", "32", "--vae-hidden", "32", "--no-cuda",
                           "--save-path", str(save)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(save, weights_only=True)
    last = torch.load(tmp_path / "out" / "cpq_last.pt", weights_only=True)
    assert last["step"] == 4 and ckpt["step"] in (2, 4) and ckpt["eval"]["normalized_cost"] >= 0
    assert list((tmp_path / "out").glob("events.out.tfevents.*")) and not (tmp_path / "runs").exists()  # TB beside


def test_cli_rejects_bad_budget(dataset_file, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "cpq.py"), "--dataset-path", dataset_file,
                           "--total-steps", "0", "--no-cuda"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--total-steps" in proc.stderr
