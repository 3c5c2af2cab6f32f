"""What the critics say at the start and end of an online run: for 2,000 dataset states (every 50th), the actor's
deterministic action, its mean log π, and min Q, Qc and their action gradients at that action.

    python benchmark/results/carrun_online_s0/critic_probe.py runs/cpq_s0_15k/cpq.pt runs/grid/vpa_seed0/vpa.pt \
        runs/grid/marvel_seed0/sac_lag.pt
"""
import os
import sys

import h5py
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
import sac_lag_apid as sl  # noqa: E402

with h5py.File(os.path.join(ROOT, "datasets", "OfflineCarRun-v0.hdf5")) as f:
    obs = torch.tensor(f["observations"][::50][:2000])
for path in sys.argv[1:]:
    agent = sl.SACLag(7, 2, sl.Args(), (5e-5, 5e-3, 8e-3), 5e-3)
    agent.load(torch.load(path, weights_only=True))
    torch.manual_seed(0)
    with torch.no_grad():
        act, _ = agent.actor(obs, deterministic=True)
        _, log_prob = agent.actor(obs)
    a_q, a_qc = act.clone().requires_grad_(True), act.clone().requires_grad_(True)
    q, qc = agent.critic(obs, a_q).min(0).values, agent.cost_critic(obs, a_qc)[0]
    grad_q, = torch.autograd.grad(q.sum(), a_q)
    grad_qc, = torch.autograd.grad(qc.sum(), a_qc)
    print(f"{path}\n  mean action {act.mean(0).numpy().round(3)}, mean log π {log_prob.mean():.1f}\n"
          f"  min Q: mean {q.mean():.2f}, mean dQ/da {grad_q.mean(0).numpy().round(3)}, "
          f"share of states with dQ/da[0] < 0 (more forward throttle) {(grad_q[:, 0] < 0).float().mean():.2f}\n"
          f"  Qc: mean {qc.mean():.2f}, min {qc.min():.2f}, mean dQc/da {grad_qc.mean(0).numpy().round(3)}")
