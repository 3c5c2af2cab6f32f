"""FamO2O-Lag: β encoding and balance map by hand, actor/balance loss values and gradient directions, λ's dual
ascent, checkpoint round-trip, and CLI runs (the family sweep's files, per-env defaults, one-line input errors, what
Ctrl-C keeps in each phase)."""
import csv
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ACT_DIM, OBS_DIM, ROOT

import famo2o_lag as fl


def tiny_agent(seed=0, hidden=(32, 32), **kw):
    torch.manual_seed(seed)
    args = fl.Args(hidden_sizes=hidden, balance_hidden_sizes=(16,), alpha=0.2, **kw)
    return fl.FamO2OLag(OBS_DIM, ACT_DIM, args, q_thres=8.66)


def test_beta_encoding_by_hand():
    enc = fl.beta_encoding(torch.tensor([0.0, 2.0, 5.0]))
    assert enc.shape == (3, 6) and fl.BETA_DIM == 6
    assert enc[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    k2, k3 = 10000 ** (1 / 3), 10000 ** (2 / 3)  # 21.544, 464.16
    for row, beta in ((1, 2.0), (2, 5.0)):
        want = [math.sin(beta), math.cos(beta), math.sin(beta / k2), math.cos(beta / k2), math.sin(beta / k3),
                math.cos(beta / k3)]
        assert enc[row].tolist() == pytest.approx(want, abs=1e-6)
    obs = torch.randn(3, OBS_DIM)
    assert torch.equal(fl.condition(obs, torch.tensor([0.0, 2.0, 5.0])), torch.cat([obs, enc], -1))


def test_balance_map_stays_in_range_and_hits_its_ends():
    u = torch.linspace(-100, 100, 2001)
    beta = fl.beta_from_unit(torch.tanh(u), 1.0, 5.0)
    assert beta.min().item() == 1.0 and beta.max().item() == 5.0  # tanh saturates: the ends are reached exactly
    assert (beta[1:] >= beta[:-1]).all()  # monotone in u
    assert fl.beta_from_unit(torch.tensor([0.0]), 1.0, 5.0).item() == 3.0  # u = 0 → the middle
    torch.manual_seed(0)
    model = fl.BalanceModel(OBS_DIM, (16,), 1.0, 5.0)
    obs = torch.randn(500, OBS_DIM) * 10
    beta, log_prob = model(obs)
    assert beta.shape == (500,) and log_prob.shape == (500,) and torch.isfinite(log_prob).all()
    assert beta.min() >= 1.0 and beta.max() <= 5.0
    with torch.no_grad():
        model.policy.mu.weight.zero_()
        for bias, end in ((60.0, 5.0), (-60.0, 1.0)):
            model.policy.mu.bias.fill_(bias)
            assert torch.all(model(obs, deterministic=True)[0] == end)


def test_actor_loss_by_hand():
    agent = tiny_agent()
    agent.lam.fill_(0.7)
    obs, data_act = torch.randn(8, OBS_DIM), torch.rand(8, ACT_DIM) * 2 - 1
    beta = torch.linspace(1, 5, 8)
    torch.manual_seed(1)
    loss, log_prob, bc = agent.actor_loss(obs, data_act, beta)
    torch.manual_seed(1)
    with torch.no_grad():
        x = torch.cat([obs, fl.beta_encoding(beta)], -1)
        act, lp = agent.actor(x)
        mean_act = agent.actor(x, deterministic=True)[0]
        value = agent.critic(obs, act).min(0).values - 0.7 * agent.cost_critic(obs, act)[0]
        nu = value.abs().mean()
        want = (0.2 * lp - beta * value / nu + ((mean_act - data_act) ** 2).sum(-1)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(log_prob, lp) and torch.allclose(bc, ((mean_act - data_act) ** 2).sum(-1))


def test_actor_loss_gradient_directions():
    """ν is a constant (stop-grad), so raising Q at the sampled action lowers L by β/ν per unit, and raising Qc
    raises it by λβ/ν: dL/d(bias of Q's last layer) = −mean(β)/ν, dL/d(bias of Qc's last layer) = +λ·mean(β)/ν."""
    agent = tiny_agent()
    agent.lam.fill_(0.5)
    obs, data_act, beta = torch.randn(16, OBS_DIM), torch.rand(16, ACT_DIM) * 2 - 1, torch.rand(16) * 4 + 1
    torch.manual_seed(2)
    loss, _, _ = agent.actor_loss(obs, data_act, beta)
    loss.backward()
    torch.manual_seed(2)
    with torch.no_grad():
        act, _ = agent.actor(torch.cat([obs, fl.beta_encoding(beta)], -1))
        nu = (agent.critic(obs, act).min(0).values - 0.5 * agent.cost_critic(obs, act)[0]).abs().mean()
    q_grad = agent.critic.biases[-1].grad.sum().item()  # summed over the ensemble: the min picks one per sample
    assert q_grad < 0 and q_grad == pytest.approx(-(beta.mean() / nu).item(), rel=1e-4)
    assert agent.cost_critic.biases[-1].grad.sum().item() == pytest.approx((0.5 * beta.mean() / nu).item(), rel=1e-4)
    # the BC term pulls the deterministic action towards the data action
    agent2 = tiny_agent()
    with torch.no_grad():
        for q in (agent2.critic, agent2.cost_critic):
            for w in q.weights:
                w.zero_()  # Q ≡ Qc ≡ 0: only entropy and BC remain
    agent2.alpha = 0.0
    target = torch.full((16, ACT_DIM), 0.5)
    before = agent2.actor_loss(obs, target, beta)[2].mean().item()
    for _ in range(20):
        loss, _, _ = agent2.actor_loss(obs, target, beta)
        agent2.actor_opt.zero_grad()
        loss.backward()
        agent2.actor_opt.step()
    assert agent2.actor_loss(obs, target, beta)[2].mean().item() < before


def monotone_agent(lam):
    """A hand-made agent: ā(s, β) = tanh(5·sin(β/k₂)) on both action dims (increasing in β on [1, 5]),
    Q(s, a) = Qc(s, a) = a₀ + a₁. So Q − λQc = (1 − λ)(a₀ + a₁): increasing in β for λ < 1, decreasing for λ > 1."""
    agent = tiny_agent(hidden=(8,))
    agent.critic = fl.QEnsemble(OBS_DIM, ACT_DIM, (), num_q=2)
    agent.cost_critic = fl.QEnsemble(OBS_DIM, ACT_DIM, (), num_q=1)
    with torch.no_grad():
        for q in (agent.critic, agent.cost_critic):
            q.weights[0].zero_()
            q.weights[0][:, OBS_DIM:, :] = 1.0
            q.biases[0].zero_()
        first = agent.actor.trunk[0]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, OBS_DIM + 2] = 5.0  # feature sin(β/k₂), increasing on [1, 5]
        agent.actor.mu.weight.zero_()
        agent.actor.mu.weight[:, 0] = 1.0
        agent.actor.mu.bias.zero_()
        agent.balance_log_alpha.fill_(-30.0)  # no entropy bonus: isolate the value term
    agent.lam.fill_(lam)
    return agent


@pytest.mark.parametrize("lam, better_end", [(0.0, 5.0), (2.0, 1.0)])
def test_balance_gradient_points_to_the_better_beta(lam, better_end):
    agent = monotone_agent(lam)
    obs = torch.randn(32, OBS_DIM)
    with torch.no_grad():
        value = {b: agent.lagrangian_value(obs, agent.actor(fl.condition(obs, torch.full((32,), b)), True)[0])[0]
                 for b in (1.0, 5.0)}
    worse_end = 6.0 - better_end
    assert (value[better_end] > value[worse_end]).all()  # the hand-made setup does what it claims
    loss, log_prob, beta, qc = agent.balance_loss(obs)
    assert beta.shape == (32,) and torch.allclose(qc, agent.cost_critic(obs, agent.actor(
        fl.condition(obs, beta), True)[0])[0])
    loss.backward()
    grad = agent.balance.policy.mu.bias.grad.item()  # β increases with this bias
    assert grad < 0 if better_end == 5.0 else grad > 0
    # a few steps move the balance model's β towards the better end
    start = agent.balance(obs, deterministic=True)[0].mean().item()
    for _ in range(30):
        loss, *_ = agent.balance_loss(obs)
        agent.balance_opt.zero_grad()
        loss.backward()
        agent.balance_opt.step()
    end = agent.balance(obs, deterministic=True)[0].mean().item()
    assert abs(end - better_end) < abs(start - better_end)


def test_update_is_finite_restores_grads_and_moves_lambda():
    agent = tiny_agent(lambda_lr=0.5)
    batch = [torch.randn(32, OBS_DIM), torch.rand(32, ACT_DIM) * 2 - 1, torch.rand(32), torch.rand(32).round(),
             torch.randn(32, OBS_DIM), torch.zeros(32)]
    agent.q_thres = -100.0  # Qc is always over this budget: λ must rise by η·(mean Qc − q_thres) > 0
    info = agent.update(*batch, beta=torch.rand(32) * 4 + 1)
    assert all(torch.isfinite(v) for k, v in info.items())
    assert info["lagrange/lambda"].item() == pytest.approx(0.5 * (info["losses/qc_pi"].item() + 100.0), rel=1e-5)
    assert 1.0 <= info["famo2o/beta_mean"].item() <= 5.0
    for net in (agent.actor, agent.critic, agent.cost_critic, agent.balance):
        assert all(p.requires_grad for p in net.parameters())
    agent.q_thres = 1e6  # far under budget: λ is projected to 0, never negative
    info = agent.update(*batch)  # β from the balance model (the online path)
    assert agent.lam.item() == 0.0 and info["lagrange/lambda"].item() == 0.0


def test_update_freezes_actor_and_critics_for_the_balance_step():
    """The balance loss must move only π_b: during its backward the universal actor and the critics are frozen."""
    agent = tiny_agent()
    seen, balance_loss = [], agent.balance_loss

    def spy(obs):
        seen.append([any(p.requires_grad for p in net.parameters())
                     for net in (agent.actor, agent.critic, agent.cost_critic, agent.balance)])
        return balance_loss(obs)

    agent.balance_loss = spy
    batch = [torch.randn(16, OBS_DIM), torch.rand(16, ACT_DIM) * 2 - 1, torch.rand(16), torch.zeros(16),
             torch.randn(16, OBS_DIM), torch.zeros(16)]
    agent.update(*batch)
    assert seen == [[False, False, False, True]]


def test_checkpoint_round_trip(tmp_path):
    agent = tiny_agent(seed=0)
    agent.lam.fill_(1.25)
    path = str(tmp_path / "f.pt")
    fl.save_checkpoint(path, agent.checkpoint(agent.args, "OfflineCarRun-v0", OBS_DIM, ACT_DIM, 7))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "o2o-safe-rl/1" and ckpt["algo"] == "famo2o_lag" and ckpt["step"] == 7
    assert ckpt["beta_range"] == [1.0, 5.0] and ckpt["lagrange"] == {"kind": "critic_dual", "lam": 1.25,
                                                                      "lr": 1e-3, "q_thres": 8.66}
    assert ckpt["obs_dim"] == OBS_DIM and ckpt["hidden_sizes"] == [32, 32] and ckpt["args"]["family_betas"] == [1, 3, 5]
    assert ckpt["actor"]["trunk.0.weight"].shape[1] == OBS_DIM + 6  # the actor sees e(β) too
    other = tiny_agent(seed=1)
    other.load(ckpt)
    obs = torch.randn(5, OBS_DIM)
    beta = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    x = fl.condition(obs, beta)
    assert torch.equal(agent.actor(x, True)[0], other.actor(x, True)[0])
    assert torch.equal(agent.balance(obs, True)[0], other.balance(obs, True)[0])
    act = torch.rand(5, ACT_DIM)
    for name in ("critic", "critic_target", "cost_critic", "cost_critic_target"):
        assert torch.equal(getattr(agent, name)(obs, act), getattr(other, name)(obs, act))
    assert other.lam.item() == 1.25
    with pytest.raises(RuntimeError, match="size mismatch"):  # strict: never drops or reshapes weights
        tiny_agent(hidden=(16, 16)).load(ckpt)


def cli(*flags, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "famo2o_lag.py"), "--no-cuda", *flags],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_smoke_and_family_sweep(tmp_path, dataset_file):
    proc = cli("--dataset-path", dataset_file, "--hidden-sizes", "32", "32", "--offline-steps", "30",
               "--eval-every", "15", "--eval-episodes", "1", "--online-episodes", "2", "--episodes-per-iter", "1",
               "--updates-per-iter", "2", "--family-betas", "1", "5", "--critic-lr", "1e-3",
               "--save-path", str(tmp_path / "f.pt"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "β = 1" in proc.stdout and "β = 5" in proc.stdout and "over the limit" in proc.stdout
    family = list(csv.DictReader(open(tmp_path / "f_family.csv")))
    assert [float(r["beta"]) for r in family] == [1.0, 5.0]
    assert all(float(r["cost"]) >= 0 and math.isfinite(float(r["return"])) for r in family)
    assert (tmp_path / "f_family.png").stat().st_size > 0
    offline = torch.load(tmp_path / "f_offline.pt", weights_only=True)
    assert offline["algo"] == "famo2o_lag" and offline["step"] in (15, 30)
    assert [r["beta"] for r in offline["family"]] == [1.0, 5.0] and "balance" in offline
    final = torch.load(tmp_path / "f.pt", weights_only=True)
    assert final["step"] == 400 and final["lagrange"]["kind"] == "critic_dual" and final["lagrange"]["lam"] >= 0
    # the flags left at None take CarRun's ENV_DEFAULTS (5e-5, 5e-3, 8e-3, 5e-3, 500); given flags stay
    assert {k: final["args"][k] for k in ("actor_lr", "critic_lr", "cost_critic_lr", "alpha", "online_episodes")} \
        == {"actor_lr": 5e-5, "critic_lr": 1e-3, "cost_critic_lr": 8e-3, "alpha": 5e-3, "online_episodes": 2}
    rows = list(csv.DictReader(open(tmp_path / "f_progress.csv")))
    assert len(rows) == 1 + 2 + 1  # start evaluation, 2 iterations, final evaluation
    assert all(1.0 <= float(r["beta_mean"]) <= 5.0 for r in rows if r["beta_mean"])


@pytest.mark.parametrize("flags, message", [
    (("--beta-min", "5", "--beta-max", "1"), "--beta-min 5.0: must be in [0, --beta-max 1.0)"),
    (("--family-betas", "0.5", "3"), "--family-betas 0.5 3.0: must be in [--beta-min, --beta-max] = [1.0, 5.0]"),
    (("--env-id", "NoSuchEnv-v0"), "NoSuchEnv-v0"),
    (("--offline-steps", "0"), "--offline-steps 0: must be >= 1"),
])
def test_bad_input_is_one_line_error(tmp_path, flags, message):
    proc = cli(*flags, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("famo2o_lag.py: error:") and message in lines[0]


def test_bad_dataset_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.hdf5"
    bad.write_text("not hdf5")
    proc = cli("--dataset-path", str(bad), cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "not a readable HDF5" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("famo2o_lag.py: error:")


def interrupt_when(ready, tmp_path, *flags):
    """Run famo2o_lag.py, press Ctrl-C once `ready()` holds; returns (exit code, last stderr line)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "famo2o_lag.py"), "--no-cuda", "--hidden-sizes",
                             "16", "16", "--batch-size", "32", "--eval-episodes", "1", "--family-betas", "1", "5",
                             "--save-path", str(tmp_path / "f.pt"), *flags],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err[-2000:]
    return proc.returncode, err.strip().splitlines()[-1]


def test_ctrl_c_offline_keeps_the_best_offline_checkpoint(tmp_path, dataset_file):
    offline = tmp_path / "f_offline.pt"
    code, line = interrupt_when(offline.exists, tmp_path, "--dataset-path", dataset_file, "--offline-steps", "100000",
                                "--eval-every", "20")
    assert code == 130 and line == (f"famo2o_lag.py: interrupted in the offline phase; kept {offline} (the best "
                                    f"offline evaluation so far)")
    ckpt = torch.load(offline, weights_only=True)
    assert ckpt["algo"] == "famo2o_lag" and ckpt["eval"]["step"] % 20 == 0 and "family" not in ckpt
    assert not (tmp_path / "f_family.csv").exists() and not (tmp_path / "f.pt").exists()


def test_ctrl_c_online_keeps_the_offline_model_and_the_policy_so_far(tmp_path, dataset_file):
    progress = tmp_path / "f_progress.csv"
    code, line = interrupt_when(lambda: progress.exists() and len(progress.read_text().splitlines()) >= 4, tmp_path,
                                "--dataset-path", dataset_file, "--offline-steps", "20", "--eval-every", "20",
                                "--online-episodes", "1000", "--episodes-per-iter", "1", "--updates-per-iter", "2",
                                "--online-eval-every", "1000")
    stem = tmp_path / "f"
    assert code == 130 and line == (f"famo2o_lag.py: interrupted in the online phase; kept {stem}_offline.pt (the "
                                    f"offline model and its family sweep), {stem}_progress.csv and "
                                    f"{stem}_interrupted.pt (the policy so far, not evaluated)")
    assert "family" in torch.load(f"{stem}_offline.pt", weights_only=True)
    ckpt = torch.load(f"{stem}_interrupted.pt", weights_only=True)
    assert ckpt["algo"] == "famo2o_lag" and 0 < ckpt["step"] < 1000 * 200 and "balance" in ckpt
    assert not (tmp_path / "f.pt").exists()
