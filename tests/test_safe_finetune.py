"""The safe-finetuning mechanisms of sac_lag_apid.py (issue: warm starts broke the limit): each against its equation
on a hand-made input, and the bounds they promise."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ACT_DIM, OBS_DIM, ROOT

import sac_lag_apid as sl


def tiny_agent(**overrides):
    args = sl.Args(hidden_sizes=(16, 16), **{"actor_lr": 1e-3, "critic_lr": 1e-3, "cost_critic_lr": 1e-3,
                                             "alpha": 0.1, **overrides})
    torch.manual_seed(0)
    return sl.SACLag(OBS_DIM, ACT_DIM, args)


# --- aPID: --lagrangian-init and --bounded-gain-adaptation ----------------------------------------------------
@pytest.mark.parametrize("adaptive", [True, False])
def test_apid_starts_at_lagrangian_init(adaptive):
    c = sl.AdaptivePIDLagrangian(20.0, kp=0.1, ki=0.01, kd=0.05, delay=3, adaptive=adaptive, lam_init=2.0)
    assert c.lam == 2.0
    # J = 40: e = 20, I = 2 + 0.01·20 = 2.2, p = 2, c̄ = 4, D = 4 → λ = 0.1·2 + 2.2 + 0.05·4 = 2.6
    assert c.update(40.0) == pytest.approx(2.6)
    # J = 0 from there: the integral winds down from where it started, not from 0
    c2 = sl.AdaptivePIDLagrangian(20.0, kp=0.0, ki=0.01, kd=0.0, adaptive=False, lam_init=2.0)
    assert c2.update(0.0) == pytest.approx(2.0 - 0.2)


def test_make_lagrangian_passes_init_to_apid_and_pid():
    for kind in ("apid", "pid"):
        assert sl.make_lagrangian(sl.Args(lagrangian=kind, lagrangian_init=1.5)).lam == 1.5


def test_bounded_adaptation_by_hand():
    # one update at J = 0 (far under d = 20): H = [0, 0], c̃ = 0.1. Paper: factor 1 + 0.05·(0.1 − 20)/0.1 < 0 → the
    # gains hit the floor K⁰/10 at once. Bounded: factor 1 + 0.05·(0.1 − 20)/max(0.1, 20) = 0.95025.
    paper = sl.AdaptivePIDLagrangian(20.0, kp=0.1, ki=0.01, kd=0.05, bounded=False)
    bounded = sl.AdaptivePIDLagrangian(20.0, kp=0.1, ki=0.01, kd=0.05, bounded=True)
    paper.update(0.0)
    bounded.update(0.0)
    assert (paper.kp, paper.ki) == pytest.approx((0.01, 0.001))
    assert (bounded.kp, bounded.ki) == pytest.approx((0.1 * 0.95025, 0.01 * 0.95025))
    # above the limit c̃ ≥ d, so max(c̃, d) = c̃: both forms agree
    a = sl.AdaptivePIDLagrangian(20.0, kp=0.1, ki=0.01, kd=0.05, delay=1, bounded=False)
    b = sl.AdaptivePIDLagrangian(20.0, kp=0.1, ki=0.01, kd=0.05, delay=1, bounded=True)
    for J in (300.0, 250.0):
        assert a.update(J) == b.update(J) and (a.kp, a.ki, a.kd) == (b.kp, b.ki, b.kd)


@pytest.mark.parametrize("costs", [[0.0] * 30, [60.0] * 30, [0.0, 80.0] * 15, list(np.linspace(0, 100, 30))])
def test_bounded_adaptation_moves_gains_by_at_most_the_rate(costs):
    rates = (0.05, 0.05, 0.05)
    c = sl.AdaptivePIDLagrangian(20.0, kp=0.1, ki=0.01, kd=0.05, adapt_rates=rates, bounded=True)
    for J in costs:
        kp, ki = c.kp, c.ki
        c.update(J)
        # |factor − 1| ≤ a when it is not clipped; the clip to [K⁰/10, 10K⁰] can only shorten the step
        assert 1 - rates[0] - 1e-12 <= c.kp / kp <= 1 + rates[0] + 1e-12
        assert 1 - rates[1] - 1e-12 <= c.ki / ki <= 1 + rates[1] + 1e-12


# --- actor with a behaviour-cloning anchor (--bc-weight) -------------------------------------------------------
def test_bc_actor_loss_by_hand():
    agent = tiny_agent(bc_weight=0.4)
    obs, data_act = torch.randn(8, OBS_DIM), torch.rand(8, ACT_DIM) * 2 - 1
    lam = 0.7
    torch.manual_seed(5)
    loss, log_prob, qc = agent.actor_loss(obs, data_act, lam)
    torch.manual_seed(5)
    act, logp = agent.actor(obs)
    q = agent.critic(obs, act).min(0).values
    value = q - lam * agent.cost_critic(obs, act)[0]
    expected = (0.1 * logp - value / value.abs().mean() + 0.4 * ((act - data_act) ** 2).sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(log_prob, logp) and torch.allclose(qc, agent.cost_critic(obs, act)[0])


def test_bc_term_pulls_the_actor_to_the_data_actions():
    agent = tiny_agent(bc_weight=10.0, alpha=1e-6)
    obs = torch.randn(64, OBS_DIM)
    data_act = torch.full((64, ACT_DIM), 0.5)
    gap = lambda: (agent.actor(obs, deterministic=True)[0] - data_act).abs().mean().item()
    before = gap()
    for _ in range(200):
        loss, *_ = agent.actor_loss(obs, data_act, 0.0)
        agent.actor_opt.zero_grad()
        loss.backward()
        agent.actor_opt.step()
    assert gap() < before / 3


def anchored_loss_by_hand(agent, anchor, w_data, w_anchor):
    """The anchored actor loss on a fixed batch (λ = 0.7, α = 0.1), from the agent and by hand with weights w_data on
    the batch's actions and w_anchor on the anchor's mean action; both draw the same ã (seed 5)."""
    obs, data_act = torch.randn(8, OBS_DIM), torch.rand(8, ACT_DIM) * 2 - 1
    torch.manual_seed(5)
    loss, *_ = agent.actor_loss(obs, data_act, 0.7, anchor)
    torch.manual_seed(5)
    act, logp = agent.actor(obs)
    value = agent.critic(obs, act).min(0).values - 0.7 * agent.cost_critic(obs, act)[0]
    target = torch.tanh(anchor.mu(anchor.trunk(obs)))
    bc = w_data * ((act - data_act) ** 2).sum(-1) + w_anchor * ((act - target) ** 2).sum(-1)
    return loss, (0.1 * logp - value / value.abs().mean() + bc).mean(), (obs, data_act)


def test_anchor_splits_the_weight_between_replay_and_deployed_policy_by_hand():
    """Gated: w₀ (--bc-weight) on the replay's action, the rest of the grown weight w − w₀ on the anchor's (the
    deployed policy's) mean action tanh μ(s); the anchor is a fixed target."""
    agent = tiny_agent(bc_weight=0.4)
    assert agent.anchor_weight == 0.4  # w starts at w₀
    agent.anchor_weight = 1.6  # after two failed tests
    anchor = sl.Actor(OBS_DIM, ACT_DIM, (16, 16))
    loss, expected, (obs, data_act) = anchored_loss_by_hand(agent, anchor, 0.4, 1.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in anchor.parameters())  # the anchor is a fixed target
    agent.anchor_weight = 0.4  # at the base weight it is the replay anchor alone, whatever the anchor policy says
    replay_agent = tiny_agent(bc_weight=0.4)  # the same networks (same seed)
    torch.manual_seed(5)
    both = agent.actor_loss(obs, data_act, 0.7, anchor)[0]
    torch.manual_seed(5)
    replay_only = replay_agent.actor_loss(obs, data_act, 0.7)[0]
    assert both.item() == pytest.approx(replay_only.item(), rel=1e-6)


def test_anchor_weight_grows_after_failed_tests_and_shrinks_after_passes():
    """w·BC_GROWTH (2) after a test over the target, w/BC_GROWTH after one at or under it, within [w₀, BC_MAX]."""
    assert (sl.BC_GROWTH, sl.BC_MAX) == (2.0, 100.0)
    w = 0.4
    for test_cost, expected in [(15.0, 0.8), (0.0, 0.4), (5.0, 0.4),  # over the target 10: ×2; at or under: ÷2, ≥ 0.4
                                *((10.5, 0.4 * 2 ** k) for k in range(1, 8)),  # 0.8, 1.6, …, 51.2
                                (30.0, 100.0), (11.0, 100.0),  # 102.4 capped at BC_MAX
                                (10.0, 50.0), (0.0, 25.0)]:
        w = sl.next_anchor_weight(w, test_cost, 10.0, 0.4)
        assert w == pytest.approx(expected)


def test_value_normalisation_makes_the_loss_scale_free():
    """Scaling both critics by k changes nothing in the bc form: the weight means the same on every task."""
    obs, data_act = torch.randn(8, OBS_DIM), torch.rand(8, ACT_DIM) * 2 - 1
    losses = []
    for k in (1.0, 50.0):
        agent = tiny_agent(bc_weight=0.4)
        with torch.no_grad():
            for net in (agent.critic, agent.cost_critic):
                net.weights[-1].mul_(k)
                net.biases[-1].mul_(k)
        torch.manual_seed(2)
        losses.append(agent.actor_loss(obs, data_act, 0.3)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


# --- gated deployment -------------------------------------------------------------------------------------------
def policy(value: float) -> torch.nn.Module:
    """A stand-in actor whose one weight names it."""
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(net.weight, value)
    return net


def who(gate) -> float:
    return gate.deployed.weight.item()


SAFE_EPISODES = (np.array([400.0, 420.0]), np.array([0.0, 5.0]))  # deployed returns (mean 410) and costs


def test_gate_judges_safety_then_return():
    learner = policy(1.0)
    gate = sl.DeploymentGate(policy(0.0), cost_limit=20.0, max_wait=8)
    assert who(gate) == 0.0 and not gate.deployed.weight.requires_grad
    assert gate.test_due()
    gate.update(learner, *SAFE_EPISODES, 500.0, 21.0)  # over the limit: refused, whatever its return
    assert who(gate) == 0.0 and (gate.wait, gate.countdown) == (2, 2)
    assert not gate.test_due() and gate.test_due()  # the next test waits 2 iterations
    gate.update(learner, *SAFE_EPISODES, 409.0, 0.0)  # safe but worse than the deployed mean (410)
    assert who(gate) == 0.0 and gate.wait == 1  # a safe test resets the wait
    assert gate.test_due()
    gate.update(learner, *SAFE_EPISODES, 410.0, 20.0)  # at the limit and as good: deployed
    assert who(gate) == 1.0 and (gate.tests, gate.deployments, gate.rollbacks) == (3, 1, 0)
    learner.weight.data.fill_(2.0)  # the deployed policy is a copy: the learner's updates do not reach it
    assert who(gate) == 1.0


def test_gate_rolls_back_to_the_policy_deployed_before():
    gate = sl.DeploymentGate(policy(0.0), cost_limit=20.0, max_wait=8)
    gate.update(policy(1.0), *SAFE_EPISODES, 450.0, 0.0)
    assert who(gate) == 1.0
    gate.update(policy(2.0), np.array([600.0, 400.0]), np.array([30.0, 0.0]))  # an episode over the limit
    assert who(gate) == 0.0 and gate.rollbacks == 1
    assert gate.countdown == 1 and gate.test_due()  # a rollback does not delay the learner's next test


def test_gate_unsafe_deployed_returns_set_no_bar():
    """An unsafe starting policy (its returns bought with violations) is replaced by the first safe test, in the
    iteration it breaks the limit; the comparison counts only the deployed policy's safe episodes."""
    gate = sl.DeploymentGate(policy(0.0), cost_limit=20.0, max_wait=8)
    gate.update(policy(1.0), np.array([600.0, 600.0]), np.array([50.0, 60.0]), 300.0, 10.0)
    assert who(gate) == 1.0 and (gate.rollbacks, gate.deployments) == (1, 1)
    # policy 1 breaks the limit once: rolled back to policy 0; the test of 360 ≥ 350 (the one safe episode; the
    # 600 over the limit does not count) deploys policy 2, with policy 0, not the broken policy 1, behind it
    gate.update(policy(2.0), np.array([600.0, 350.0]), np.array([50.0, 0.0]), 360.0, 0.0)
    assert who(gate) == 2.0 and gate.fallback["weight"].item() == 0.0
    gate.update(policy(3.0), np.array([600.0, 350.0]), np.array([50.0, 0.0]), 340.0, 0.0)
    assert who(gate) == 0.0  # worse than 350: not deployed, and the broken policy 2 rolls back


def test_gate_deploys_only_at_its_pass_cost():
    """A test within the limit but over pass_cost is no violation (no back-off) and no deployment."""
    gate = sl.DeploymentGate(policy(0.0), cost_limit=20.0, max_wait=8, pass_cost=10.0)
    gate.update(policy(1.0), *SAFE_EPISODES, 500.0, 15.0)
    assert who(gate) == 0.0 and gate.wait == 1 and gate.test_due()
    gate.update(policy(1.0), *SAFE_EPISODES, 500.0, 10.0)
    assert who(gate) == 1.0


def test_gate_tightens_its_pass_cost_when_a_deployed_learner_rolls_back():
    """--rollback-tightening β: the rollback of a learner the gate deployed multiplies pass_cost by β; violations of
    the starting policy (nothing deployed yet) or of a fallback do not."""
    gate = sl.DeploymentGate(policy(0.0), cost_limit=20.0, max_wait=8, pass_cost=10.0, tightening=0.5)
    gate.update(policy(1.0), np.array([400.0]), np.array([30.0]))  # the start breaks the limit: no test to blame
    assert gate.rollbacks == 1 and gate.pass_cost == 10.0
    gate.update(policy(1.0), *SAFE_EPISODES, 500.0, 8.0)  # a pass at ≤ 10: deployed
    assert who(gate) == 1.0
    gate.update(policy(2.0), np.array([400.0]), np.array([25.0]))  # the deployed learner breaks d: rolled back
    assert who(gate) == 0.0 and gate.rollbacks == 2 and gate.pass_cost == 5.0
    gate.update(policy(2.0), np.array([400.0]), np.array([25.0]))  # now the fallback breaks it: no second halving
    assert gate.rollbacks == 3 and gate.pass_cost == 5.0
    gate.update(policy(2.0), *SAFE_EPISODES, 500.0, 8.0)  # 8 passed before; now it is over the pass cost
    assert who(gate) == 0.0
    gate.update(policy(2.0), *SAFE_EPISODES, 500.0, 5.0)
    assert who(gate) == 2.0 and gate.state_dict()["pass_cost"] == 5.0


@pytest.mark.parametrize("iterations, max_wait", [(100, 16), (100, 4), (1000, 16)])
def test_gate_bounds_the_tests_of_an_always_unsafe_learner(iterations, max_wait):
    """Tests over the limit come at waits 1, 2, 4, …, max_wait: at most log₂(max_wait) + 1 + K/max_wait of them."""
    gate = sl.DeploymentGate(policy(0.0), cost_limit=20.0, max_wait=max_wait)
    for _ in range(iterations):
        gate.update(policy(1.0), np.array([400.0]), np.array([0.0]), *((600.0, 100.0) if gate.test_due() else ()))
    assert gate.deployments == 0 and who(gate) == 0.0
    assert gate.tests <= math.log2(max_wait) + 1 + iterations / max_wait
    assert gate.tests >= iterations / max_wait  # and it keeps testing: a learner that turns safe gets its chance


def test_cost_margin_moves_the_controller_target():
    """--cost-margin m: the controller's error is J − (1 − m)·d, so an episode cost at the limit pushes λ up."""
    for kind in ("apid", "pid", "dual"):
        controller = sl.make_lagrangian(sl.Args(lagrangian=kind, cost_margin=0.5, cost_limit=20.0))
        assert controller.target == 10.0
        controller.update(10.0)  # at the target: no integral or proportional push
        assert getattr(controller, "integral", controller.lam) == 0.0
        assert getattr(controller, "proportional", 0.0) == 0.0
        assert controller.update(20.0) > 0.0
        assert sl.make_lagrangian(sl.Args(lagrangian=kind, cost_margin=0.0, cost_limit=20.0)).target == 20.0


def cli(*flags, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sac_lag_apid.py"), "--no-cuda",
                           "--hidden-sizes", "32", "32", "--online-episodes", "8", "--episodes-per-iter", "2",
                           "--updates-per-iter", "3", "--eval-every", "4", "--eval-episodes", "1", *flags],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("signal", ["episodes", "tests"])
def test_cli_gated_run_keeps_the_deployed_actor(tmp_path, dataset_file, signal):
    proc = cli("--deploy", "gated", "--bc-weight", "0.4", "--cost-signal", signal, "--offline-ratio", "0.5",
               "--learner-eval", "--dataset-path", dataset_file, "--save-path", str(tmp_path / "s.pt"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gate:" in proc.stdout
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)
    assert {"learner_actor", "gate"} <= ckpt.keys() and ckpt["gate"]["tests"] >= 1
    import csv
    rows = list(csv.DictReader(open(tmp_path / "s_progress.csv")))
    evals = [r for r in rows if r["eval_return"]]
    assert len(evals) == 3 and all(r["learner_eval_return"] for r in evals)  # --learner-eval: at every evaluation
    assert "learner evaluation (diagnostic): 3 episodes" in proc.stdout
    assert int(rows[-1]["deployments"]) == ckpt["gate"]["deployments"]
    # the actor in the checkpoint is the deployed one: the learner differs after 12 updates unless just deployed
    if ckpt["gate"]["deployments"] == 0:
        assert not all(torch.equal(ckpt["actor"][k], ckpt["learner_actor"][k]) for k in ckpt["actor"])


def test_tests_signal_holds_the_latest_test_cost(tmp_path, dataset_file):
    """--cost-signal tests: the controller is updated every iteration, with the latest test's cost also in the
    iterations without a test. Only the first iteration tests here (test_due patched); 8 episodes at 2 per iteration
    are 4 updates, so aPID's history holds 1 + 4 entries (without the hold it would hold 1 + 1). The controller aims
    where the gate deploys: a pass cost moved to 3 (as rollbacks would move it) becomes aPID's target. In a
    subprocess: Bullet cannot start under pytest's captured stdout."""
    script = f"""
import sys, tyro
sys.path.insert(0, {ROOT!r})
import sac_lag_apid as sl
calls = iter(range(100))
sl.DeploymentGate.test_due = lambda self: next(calls) == 0
update = sl.DeploymentGate.update
def update_then_move_the_pass_cost(self, *args):
    update(self, *args)
    self.pass_cost = 3.0
sl.DeploymentGate.update = update_then_move_the_pass_cost
sl.main(tyro.cli(sl.Args))
"""
    proc = subprocess.run([sys.executable, "-c", script, "--no-cuda", "--hidden-sizes", "32", "32",
                           "--online-episodes", "8", "--episodes-per-iter", "2", "--updates-per-iter", "3",
                           "--eval-every", "4", "--eval-episodes", "1", "--pid-delay", "20", "--cost-signal", "tests",
                           "--dataset-path", dataset_file, "--save-path", str(tmp_path / "s.pt")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)
    assert ckpt["gate"]["tests"] == 1 and len(ckpt["lagrange"]["history"]) == 1 + 4
    assert ckpt["gate"]["pass_cost"] == ckpt["lagrange"]["target"] == 3.0


@pytest.mark.parametrize("flags, message", [(["--bc-weight", "-1"], "--bc-weight -1.0: must be >= 0"),
                                            (["--gate-max-wait", "0"], "--gate-max-wait 0: must be >= 1"),
                                            (["--lagrangian-init", "-1"], "--lagrangian-init"),
                                            (["--deploy", "learner"], "--cost-signal tests needs --deploy gated"),
                                            (["--cost-margin", "1"], "--cost-margin"),
                                            (["--rollback-tightening", "0"], "--rollback-tightening"),
                                            (["--actor-lr", "0"], "--actor-lr 0.0: must be > 0"),
                                            (["--env-id", "OfflineFooRun-v0"], "no online defaults")])
def test_cli_refuses_bad_mechanism_flags(tmp_path, flags, message):
    proc = cli(*flags, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_paper_switch_and_the_benchmark_list_agree():
    """--paper sets exactly PAPER_ONLINE, and run_grid.py's spelled-out PAPER flags parse to the same values."""
    import tyro
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import run_grid
    import marvel_full
    assert marvel_full.PAPER_ONLINE == sl.PAPER_ONLINE
    parsed = tyro.cli(sl.Args, args=run_grid.PAPER)
    assert {k: getattr(parsed, k) for k in sl.PAPER_ONLINE} == sl.PAPER_ONLINE
    defaults = sl.Args()
    assert all(getattr(defaults, k) != v for k, v in sl.PAPER_ONLINE.items())  # each one is a real deviation


def test_cli_paper_runs_the_published_online_phase(tmp_path):
    proc = cli("--paper", "--save-path", str(tmp_path / "s.pt"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)
    assert {k: ckpt["args"][k] for k in sl.PAPER_ONLINE} == sl.PAPER_ONLINE and "gate" not in ckpt
