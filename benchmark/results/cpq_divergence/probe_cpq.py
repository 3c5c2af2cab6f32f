"""Probe of the CPQ cost-critic divergence: `python probe_cpq.py sgd` (plain SGD on log α_c) or `adam` (as cpq.py)."""
import sys, os, torch, numpy as np
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT); import cpq
torch.manual_seed(0); np.random.seed(0)
mode = sys.argv[1]
args = cpq.Args()
data = {k: torch.as_tensor(v) for k, v in cpq.load_dataset(os.path.join(ROOT, "datasets", "OfflineCarRun-v0.hdf5"), 7, 2).items()}
data["rewards"] *= 0.1
agent = cpq.CPQ(7, 2, args, cpq.episode_q_threshold(20, 0.99, 200))
if mode == "sgd":
    agent.alpha_opt = torch.optim.SGD([agent.log_alpha_c], lr=1e-4)
g = torch.Generator().manual_seed(0)
for step in range(1, 1501):
    idx = torch.randint(len(data["rewards"]), (512,), generator=g)
    info = agent.update(data["observations"][idx], data["actions"][idx], data["rewards"][idx], data["costs"][idx],
                        data["next_observations"][idx], data["terminals"][idx])
    if step % 250 == 0:
        print(mode, step, {k.split('/')[1]: round(v.item(), 3) for k, v in info.items()}, flush=True)
