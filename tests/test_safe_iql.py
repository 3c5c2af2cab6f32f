"""Safe IQL: the expectile loss, the feasibility weights, the in-sample update, the CLI and its checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ACT_DIM, OBS_DIM, ROOT

import safe_iql


def test_expectile_loss_on_a_hand_case():
    diff = torch.tensor([2.0, -1.0])  # target − prediction
    # τ = 0.7: 0.7·4 for the positive residual, 0.3·1 for the negative one, mean over two
    assert safe_iql.expectile_loss(diff, 0.7).item() == pytest.approx((0.7 * 4 + 0.3 * 1) / 2)
    assert safe_iql.expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (4 + 1) / 2)  # half the MSE


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.9])
def test_expectile_loss_minimiser_is_the_expectile(tau):
    """argmin_v mean L_τ(x − v) solves Σ|τ − 1[x < v]|·(x − v) = 0; at τ = 0.5 it is the mean."""
    x = torch.tensor([0.0, 1.0, 4.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(2000):
        opt.zero_grad()
        safe_iql.expectile_loss(x - v, tau).backward()
        opt.step()
    weights = torch.where(x < v.detach(), 1 - tau, tau)
    assert (weights * (x - v.detach())).sum().item() == pytest.approx(0.0, abs=1e-4)
    if tau == 0.5:
        assert v.item() == pytest.approx(x.mean().item(), abs=1e-4)
    assert (v.item() > x.mean().item()) == (tau > 0.5) or tau == 0.5


def test_feasibility_weights_on_a_hand_case():
    """Two feasible states (one with a cost-unsafe action) and two infeasible ones; q_thres = 1."""
    adv = torch.tensor([1.0, -1.0, 5.0, 5.0])
    adv_c = torch.tensor([0.0, 0.0, 1.0, -1.0])
    v_c = torch.tensor([0.5, 0.5, 2.0, 2.0])
    qc = torch.tensor([0.5, 3.0, 3.0, 1.0])
    w = safe_iql.feasibility_weights(adv, adv_c, v_c, qc, q_thres=1.0, beta=1.0, max_weight=100.0)
    s, s_c = adv.std().item(), adv_c.std().item()
    expected = torch.tensor([torch.exp(torch.tensor(1.0 / s)).item(),     # feasible, safe action: exp(β·A/σ_A)
                             0.0,                                       # feasible, Qc > q_thres: weight 0
                             torch.exp(torch.tensor(-1.0 / s_c)).item(),  # infeasible: exp(−β·Ac/σ_Ac), reward ignored
                             torch.exp(torch.tensor(1.0 / s_c)).item()])  # the lower-cost action weighs more
    torch.testing.assert_close(w, expected)
    clipped = safe_iql.feasibility_weights(adv * 100, adv_c, v_c, qc, 1.0, beta=50.0, max_weight=10.0)
    assert clipped.max().item() == pytest.approx(10.0)


def test_actor_likelihood_is_the_gaussian_of_atanh_a():
    torch.manual_seed(0)
    actor = safe_iql.Actor(OBS_DIM, ACT_DIM, (16, 16))
    obs, act = torch.randn(8, OBS_DIM), torch.rand(8, ACT_DIM) * 1.9 - 0.95
    h = actor.trunk(obs)
    normal = torch.distributions.Normal(actor.mu(h), actor.log_std(h).clamp(-20, 2).exp())
    torch.testing.assert_close(safe_iql.log_prob_of(actor, obs, act), normal.log_prob(torch.atanh(act)).sum(-1))


def small_agent(seed=0, **overrides):
    torch.manual_seed(seed)
    args = safe_iql.Args(hidden_sizes=(32, 32), total_steps=10, **overrides)
    return safe_iql.SafeIQL(OBS_DIM, ACT_DIM, args, q_thres=safe_iql.episode_q_threshold(20, 0.99, 200))


def batch(b=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, OBS_DIM, generator=g), torch.rand(b, ACT_DIM, generator=g) * 2 - 1,
            torch.rand(b, generator=g), (torch.rand(b, generator=g) < 0.3).float(),
            torch.randn(b, OBS_DIM, generator=g), (torch.rand(b, generator=g) < 0.2).float())


def test_critic_targets_are_in_sample():
    """The critics' TD targets read V(s') and Vc(s') only: the actor is never queried outside the data."""
    agent = small_agent()
    obs, act, reward, cost, next_obs, term = batch()
    calls = []
    agent.actor.register_forward_hook(lambda *a: calls.append(1))
    agent.update(obs, act, reward, cost, next_obs, term, step=1)
    assert not calls, "the update never samples from the actor (its loss uses trunk/mu/log_std on data actions)"


def test_update_moves_critics_towards_in_sample_targets_and_is_deterministic():
    a, b = small_agent(), small_agent()
    data = batch()
    for step in range(1, 4):
        info_a, info_b = a.update(*data, step=step), b.update(*data, step=step)
    assert all(torch.equal(info_a[k], info_b[k]) for k in info_a)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert a.actor_opt.param_groups[0]["lr"] == pytest.approx(a.actor_lr * 0.5 * (1 + torch.cos(
        torch.tensor(torch.pi * 2 / 10)).item()))  # cosine schedule, step 3 of 10


def test_cli_smoke_and_checkpoint_contract(dataset_file, tmp_path):
    save = tmp_path / "out" / "safe_iql.pt"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "safe_iql.py"), "--dataset-path", dataset_file,
                           "--total-steps", "4", "--batch-size", "32", "--eval-every", "2", "--eval-episodes", "1",
                           "--hidden-sizes", "32", "32", "--no-cuda", "--save-path", str(save)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = safe_iql.load_checkpoint(str(save), "OfflineCarRun-v0", OBS_DIM, ACT_DIM, (32, 32))
    assert ckpt["algo"] == "safe_iql" and ckpt["step"] in (2, 4) and "value" in ckpt and "cost_value" in ckpt
    last = torch.load(tmp_path / "out" / "safe_iql_last.pt", weights_only=True)
    assert last["step"] == 4 and set(last["optimizers"]) == {"actor_opt", "critic_opt", "value_opt"}
    # the contract: vpa.py takes it as its --init
    vpa = subprocess.run([sys.executable, os.path.join(ROOT, "vpa.py"), "--init", str(save), "--dataset-path",
                          dataset_file, "--total-steps", "2", "--batch-size", "16", "--eval-episodes", "1",
                          "--no-diagnostic", "--no-cuda", "--save-path",
                          str(tmp_path / "vpa.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert vpa.returncode == 0, vpa.stderr[-2000:]
    assert torch.load(tmp_path / "vpa.pt", weights_only=True)["algo"] == "safe_iql+vpa"
