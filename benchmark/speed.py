"""Throughput of each phase on this machine: one function per phase, a small table at the end.

    python benchmark/speed.py                 # all phases, CPU (or --cuda)
    python benchmark/speed.py --phases cpq sac_update collect

Each phase is timed `--rounds` times after a warm-up and the median is reported; machines drift, so compare
alternatives in one time window. Synthetic CarRun-shaped tensors (obs 7, act 2) feed the updates.
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OBS_DIM, ACT_DIM = 7, 2


@dataclass
class Args:
    phases: List[str] = field(default_factory=lambda: ["cpq", "sac_update", "sac_update_plain", "collect"])
    """phases to time: cpq, sac_update, sac_update_plain (the reference implementation), vpa, collect"""
    rounds: int = 3
    """timed rounds per phase (median reported)"""
    cuda: bool = False
    """time on the GPU"""


def batch(n, device):
    return [torch.randn(n, OBS_DIM, device=device), torch.rand(n, ACT_DIM, device=device) * 2 - 1,
            torch.rand(n, device=device), (torch.rand(n, device=device) < 0.2).float(),
            torch.randn(n, OBS_DIM, device=device), torch.zeros(n, device=device)]


def timed(fn, n, device):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def phase_cpq(device):
    import cpq
    agent = cpq.CPQ(OBS_DIM, ACT_DIM, cpq.Args(), q_thres=8.66).to(device)
    b = batch(512, device)
    return {"CPQ update, batch 512 (steps/s)": timed(lambda: agent.update(*b), 20, device)}


def phase_sac_update(device):
    import sac_lag_apid as sl
    agent = sl.SACLag(OBS_DIM, ACT_DIM, sl.Args(), lrs=(5e-5, 5e-3, 8e-3), alpha=5e-3).to(device)
    out = {}
    for size in (64, 256):
        b = batch(size, device)
        out[f"SAC-Lag update, batch {size} (updates/s)"] = timed(lambda: agent.update(*b, lam=0.5), 100, device)
    return out


class PlainSACLag:
    """The reference point: a straightforward eager SAC-Lag update as most implementations write it (one
    nn.Sequential per critic, an optimizer per network, each Q evaluated separately). Same maths and sizes as
    sac_lag_apid.SACLag, so the two rates compare like for like in one time window."""

    def __init__(self, device, hidden=256, gamma=0.99, tau=0.005, alpha=5e-3):
        import torch.nn as nn
        import sac_lag_apid as sl
        q = lambda: nn.Sequential(nn.Linear(OBS_DIM + ACT_DIM, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                  nn.ReLU(), nn.Linear(hidden, 1)).to(device)
        self.actor = sl.Actor(OBS_DIM, ACT_DIM, (hidden, hidden)).to(device)
        self.qs, self.qc = [q(), q()], q()
        self.qs_t, self.qc_t = [q(), q()], q()
        self.q_opts = [torch.optim.Adam(n.parameters(), lr=5e-3) for n in self.qs]
        self.qc_opt = torch.optim.Adam(self.qc.parameters(), lr=8e-3)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=5e-5)
        self.gamma, self.tau, self.alpha = gamma, tau, alpha

    def update(self, obs, act, rew, cost, next_obs, term, lam=0.5):
        with torch.no_grad():
            next_act, next_logp = self.actor(next_obs)
            sa2 = torch.cat([next_obs, next_act], -1)
            q_next = torch.min(self.qs_t[0](sa2), self.qs_t[1](sa2)).squeeze(-1) - self.alpha * next_logp
            y = rew + self.gamma * (1 - term) * q_next
            y_c = cost + self.gamma * (1 - term) * self.qc_t(sa2).squeeze(-1)
        sa = torch.cat([obs, act], -1)
        for net, opt, target in ((self.qs[0], self.q_opts[0], y), (self.qs[1], self.q_opts[1], y),
                                 (self.qc, self.qc_opt, y_c)):
            loss = ((net(sa).squeeze(-1) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        pi, logp = self.actor(obs)
        sa_pi = torch.cat([obs, pi], -1)
        q_pi = torch.min(self.qs[0](sa_pi), self.qs[1](sa_pi)).squeeze(-1)
        actor_loss = (self.alpha * logp - q_pi + lam * self.qc(sa_pi).squeeze(-1)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, target in ((self.qs[0], self.qs_t[0]), (self.qs[1], self.qs_t[1]), (self.qc, self.qc_t)):
                for p, p_t in zip(net.parameters(), target.parameters()):
                    p_t.mul_(1 - self.tau).add_(self.tau * p)


def phase_sac_update_plain(device):
    agent = PlainSACLag(device)
    out = {}
    for size in (64, 256):
        b = batch(size, device)
        out[f"plain SAC-Lag update, batch {size} (updates/s)"] = timed(lambda: agent.update(*b), 100, device)
    return out


def phase_vpa(device):
    import vpa
    agent = vpa.VPA(OBS_DIM, ACT_DIM, (256, 256), vpa.Args(init="unused", alpha_vpa=0.01, alpha_c_vpa=0.005, critic_lr=5e-3,
                                                            cost_critic_lr=8e-3)).to(device)
    keys = ("observations", "actions", "rewards", "costs", "next_observations", "terminals")
    b = dict(zip(keys, batch(64, device)))
    return {"VPA step, batch 64 (steps/s)": timed(lambda: agent.update(b), 100, device)}


def phase_collect(device):
    import sac_lag_apid as sl
    envs = [sl.make_env("OfflineCarRun-v0", i) for i in range(5)]
    actor = sl.Actor(OBS_DIM, ACT_DIM, (256, 256)).to(device)
    np.random.seed(0)
    start = time.perf_counter()
    batch_, _, _ = sl.collect_episodes(envs, actor, device)
    collect = len(batch_["rewards"]) / (time.perf_counter() - start)
    env = envs[0]
    env.reset()
    start = time.perf_counter()
    for _ in range(1000):
        env.step(env.action_space.sample())
    bare = 1000 / (time.perf_counter() - start)
    return {"online collection, 5 episodes (env steps/s)": collect, "bare env, random actions (steps/s)": bare}


def main(args: Args):
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    runs = {name: [] for name in args.phases}
    for _ in range(args.rounds):  # phases alternate within each round, so drift hits them alike
        for name in args.phases:
            runs[name].append(globals()[f"phase_{name}"](device))
    rows = {key: statistics.median(r[key] for r in results) for results in runs.values() for key in results[0]}
    print(f"\ndevice: {device}, torch threads: {torch.get_num_threads()}, median of {args.rounds} rounds")
    print(f"| {'phase':<52} | {'rate':>9} |\n|{'-' * 54}|{'-' * 11}|")
    for key, value in rows.items():
        print(f"| {key:<52} | {value:>9.1f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
