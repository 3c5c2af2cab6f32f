"""Collect a DSRL-format offline dataset (HDF5, gzip) from behaviour policies, with DSRL-style grid filtering.

    python benchmark/collect_dataset.py --env-id OfflineCarRun-v0                      # scripted controllers
    python benchmark/collect_dataset.py --env-id OfflineBallRun-v0 --num-trajectories 1000
    python benchmark/collect_dataset.py --env-id OfflineBallRun-v0 --checkpoints a.pt b.pt   # saved actors

Behaviour policies:
  * scripted (OfflineCarRun-v0): a throttle-and-steering controller. Each episode draws a base speed below the
    1.5 m/s limit, a burst throttle above it and a total number of burst steps (split into a few bursts at random
    times), a lateral target (now and then outside the |y| ≤ 2 lane) and Gaussian action noise. More burst steps
    mean more cost and more reward, so the family sweeps the (episode cost, return) plane.
  * scripted (OfflineBallRun-v0): the same family for the ball, whose action is a force in the world frame: a
    velocity controller tracks a base speed below the 2.5 m/s limit with bursts above it, and a damped position
    controller holds a lateral target.
  * checkpoints (any task): actors saved by this project's files (format "o2o-safe-rl/1"), each episode with its
    own Gaussian action-noise scale.
Then the kept trajectories are picked round-robin from a (cost × return) grid so they cover the plane evenly
(in the spirit of DSRL's grid filter). Provenance (command, seed, git commit, counts, ranges) is stored as HDF5 attributes and a
scatter plot of per-trajectory (cost, return) is written next to the file.
"""
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from typing import List, Optional, Tuple

os.environ.setdefault("DSRL_SUPPRESS_IMPORT_ERROR", "1")
import dsrl  # noqa: F401  (registers the Offline*-v0 environments)
import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm



@dataclass
class Args:
    env_id: str = "OfflineCarRun-v0"
    """DSRL environment id"""
    num_trajectories: int = 651
    """trajectories kept after grid filtering (DSRL's CarRun file has 651)"""
    oversample: float = 4.0
    """episodes collected = oversample × num_trajectories, before filtering"""
    checkpoints: Tuple[str, ...] = ()
    """actor checkpoints to use as behaviour policies (required for tasks without a scripted controller)"""
    noise_max: float = 0.3
    """largest Gaussian action-noise std (each episode draws one in [0, noise_max])"""
    cost_max: Optional[float] = None
    """drop trajectories with episode cost above this (default: the env's DSRL max_episode_cost)"""
    cost_bins: int = 20
    """grid bins along episode cost"""
    return_bins: int = 20
    """grid bins along episode return"""
    output: Optional[str] = None
    """HDF5 path (default datasets/<env-id>.hdf5); the scatter plot goes to the same path with .png"""
    seed: int = 0
    """seed (episode i uses seed·10⁶ + i, so the result does not depend on the number of workers)"""
    workers: int = 2
    """collector processes"""


# ----------------------------------------------------------------------------------------------------------
# The shared actor (identical to the algorithm files') so saved checkpoints can drive data collection.
def mlp(sizes, activate_last: bool = False) -> nn.Sequential:
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2 or activate_last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy a = tanh(u), u ~ N(μ(s), σ(s)); actions in [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: Tuple[int, ...]):
        super().__init__()
        self.trunk = mlp([obs_dim, *hidden_sizes], activate_last=True)
        self.mu = nn.Linear(hidden_sizes[-1], act_dim)
        self.log_std = nn.Linear(hidden_sizes[-1], act_dim)

    def forward(self, obs: torch.Tensor, deterministic: bool = False):
        """Returns (action, log π(action|s)); log-prob is None for the deterministic action tanh(μ)."""
        h = self.trunk(obs)
        mu, log_std = self.mu(h), self.log_std(h).clamp(-20.0, 2.0)
        if deterministic:
            return torch.tanh(mu), None
        u = mu + log_std.exp() * torch.randn_like(mu)
        # log π(a|s) = log N(u; μ, σ) − Σ log(1 − tanh²u); the last term in its stable form 2(log2 − u − softplus(−2u))
        log_prob = (-0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), log_prob


# ----------------------------------------------------------------------------------------------------------
# Behaviour policies. Each takes (obs, t) and returns an action in [-1, 1]^A.
def car_run_controller(rng: np.random.Generator, horizon: int):
    """Throttle below the speed limit with bursts above it, steering to a lateral target (RaceCar: throttle
    a[0] < 0 drives forward at ≈3.3·|a[0]| m/s; steering a[1] > 0 turns towards +y)."""
    base = rng.uniform(0.12, 0.40)  # 0.4–1.3 m/s: under the 1.5 m/s limit
    burst = rng.uniform(0.55, 0.80)  # 1.8–2.65 m/s: over it
    bursting = np.zeros(horizon, dtype=bool)
    budget = int(rng.integers(0, 46))  # total burst steps; each one over the limit costs 1
    while bursting.sum() < budget:
        length = int(rng.integers(4, 16))
        start = int(rng.integers(0, horizon - length))
        bursting[start:start + length] = True
    y_target = rng.uniform(-1.0, 1.0)  # inside the |y| <= 2 lane; noise still drifts some episodes out
    noise = rng.uniform(0.0, 0.12)

    def policy(obs, t):
        y = 10.0 * obs[1]  # the observation carries 0.1·(x, y), (vx, vy), sin/cos of yaw, 0.1·yaw rate
        heading = np.arctan2(obs[4], -obs[5])  # 0 when driving along +x (yaw = π), > 0 towards +y
        steer = 2.0 * (np.clip(0.3 * (y_target - y), -0.5, 0.5) - heading)
        action = np.array([-(burst if bursting[t] else base), steer]) + noise * rng.standard_normal(2)
        return np.clip(action, -1.0, 1.0)

    return policy


def ball_run_controller(rng: np.random.Generator, horizon: int):
    """Speed tracking below the 2.5 m/s limit with bursts above it, and a lateral target (Ball: a is the pushing
    force along world x and y; ≈0.29 m/s of speed per step at |a| = 1, no friction to speak of)."""
    base = rng.uniform(1.0, 2.3)  # m/s, under the limit
    burst = rng.uniform(2.8, 4.5)  # over it
    bursting = np.zeros(horizon, dtype=bool)
    budget = int(rng.integers(0, 61))  # total burst steps (plus the steps spent braking back under the limit)
    while bursting.sum() < budget:
        length = int(rng.integers(4, 16))
        start = int(rng.integers(0, horizon - length))
        bursting[start:start + length] = True
    y_target = rng.uniform(-1.5, 1.5)  # inside the |y| <= 2 lane
    noise = rng.uniform(0.0, 0.15)

    def policy(obs, t):
        y, vx, vy = 10.0 * obs[1], 5.0 * obs[2], 5.0 * obs[3]  # the observation carries 0.1·(x, y), 0.2·(vx, vy), …
        speed = burst if bursting[t] else base
        action = np.array([speed - vx, 0.5 * (y_target - y) - vy]) + noise * rng.standard_normal(2)
        return np.clip(action, -1.0, 1.0)

    return policy


SCRIPTED_CONTROLLERS = {"OfflineCarRun-v0": car_run_controller, "OfflineBallRun-v0": ball_run_controller}


def checkpoint_policy(actor: Actor, rng: np.random.Generator, noise_max: float):
    noise = rng.uniform(0.0, noise_max)

    @torch.no_grad()
    def policy(obs, t):
        action, _ = actor(torch.as_tensor(obs, dtype=torch.float32)[None])
        return np.clip(action[0].numpy() + noise * rng.standard_normal(action.shape[1]), -1.0, 1.0)

    return policy


def load_actor(path: str, obs_dim: int, act_dim: int) -> Actor:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != "o2o-safe-rl/1" or (ckpt["obs_dim"], ckpt["act_dim"]) != (obs_dim, act_dim):
        raise ValueError(f"{path}: not an o2o-safe-rl/1 checkpoint for obs_dim={obs_dim}, act_dim={act_dim}")
    actor = Actor(obs_dim, act_dim, tuple(ckpt["hidden_sizes"]))
    actor.load_state_dict(ckpt["actor"])
    return actor


# ----------------------------------------------------------------------------------------------------------
# Worker: one episode per task, seeded by its index.
_worker = {}


def _init_worker(env_id: str, checkpoints: Tuple[str, ...], noise_max: float):
    torch.set_num_threads(1)
    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    _worker.update(env=env, env_id=env_id, actors=[load_actor(p, obs_dim, act_dim) for p in checkpoints], noise_max=noise_max)


def collect_episode(task: Tuple[int, int]) -> dict:
    seed, index = task
    env, actors = _worker["env"], _worker["actors"]
    rng = np.random.default_rng([seed, index])
    np.random.seed((seed * 1_000_000 + index) % 2**32)  # Bullet's reset noise comes from the global np.random
    horizon = env.spec.max_episode_steps
    if actors:
        policy = checkpoint_policy(actors[index % len(actors)], rng, _worker["noise_max"])
    else:
        policy = SCRIPTED_CONTROLLERS[_worker["env_id"]](rng, horizon)
    obs, _ = env.reset()
    steps = {k: [] for k in ("observations", "next_observations", "actions", "rewards", "costs", "terminals",
                             "timeouts")}
    for t in range(horizon):
        action = policy(obs, t).astype(np.float32)
        next_obs, reward, terminated, truncated, info = env.step(action)
        for k, v in zip(steps, (obs, next_obs, action, reward, info["cost"], terminated, truncated)):
            steps[k].append(v)
        obs = next_obs
        if terminated or truncated:
            break
    steps["timeouts"][-1] = not steps["terminals"][-1]  # an episode ends in a terminal or a timeout
    return steps


def grid_select(costs: np.ndarray, returns: np.ndarray, n: int, cost_bins: int, return_bins: int,
                rng: np.random.Generator) -> np.ndarray:
    """Even coverage of the (cost, return) plane with an exact count: round-robin over cost bins, and inside each
    cost bin round-robin over its return cells, one random trajectory at a time. Sparse regions keep everything,
    dense ones are thinned (DSRL's grid filter caps each cell instead)."""
    def bin_of(v, bins):
        return np.minimum(((v - v.min()) / (np.ptp(v) + 1e-9) * bins).astype(int), bins - 1)
    cost_bin, return_bin = bin_of(costs, cost_bins), bin_of(returns, return_bins)
    cells = {}  # cost bin -> list of shuffled queues, one per occupied return cell
    for c, r in sorted(set(zip(cost_bin.tolist(), return_bin.tolist()))):
        cells.setdefault(c, []).append(list(rng.permutation(np.flatnonzero((cost_bin == c) & (return_bin == r)))))
    turn = {c: 0 for c in cells}  # next return cell to draw from, per cost bin
    chosen = []
    while len(chosen) < n and any(any(qs) for qs in cells.values()):
        for c in rng.permutation(list(cells)):
            queues = [q for q in cells[c] if q]
            if queues and len(chosen) < n:
                chosen.append(queues[turn[c] % len(queues)].pop())
                turn[c] += 1
    return np.sort(np.array(chosen, dtype=int))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def scatter_plot(path: str, env_id: str, costs, returns, kept):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    dropped = np.setdiff1d(np.arange(len(costs)), kept)
    ax.scatter(costs[dropped], returns[dropped], s=6, c="lightgray", label=f"collected, dropped ({len(dropped)})")
    ax.scatter(costs[kept], returns[kept], s=8, c="tab:blue", label=f"kept ({len(kept)})")
    for limit, style in ((10, ":"), (20, "--"), (40, "-.")):
        ax.axvline(limit, color="tab:red", linestyle=style, linewidth=1, label=f"cost limit {limit}")
    ax.set_xlabel("episode cost")
    ax.set_ylabel("episode return")
    ax.set_title(f"{env_id}: per-trajectory cost and return")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: Args) -> None:
    if args.env_id not in SCRIPTED_CONTROLLERS and not args.checkpoints:
        sys.exit(f"collect_dataset.py: error: no scripted controller for {args.env_id}; pass --checkpoints")
    for p in args.checkpoints:
        if not os.path.isfile(p):
            sys.exit(f"collect_dataset.py: error: --checkpoints {p}: no such file")
    if args.num_trajectories < 1 or args.oversample < 1 or args.workers < 1:
        sys.exit("collect_dataset.py: error: --num-trajectories and --workers must be >= 1, --oversample >= 1")
    try:
        env = gym.make(args.env_id)
    except gym.error.Error as e:
        sys.exit(f"collect_dataset.py: error: --env-id {args.env_id}: {e}")
    cost_max = args.cost_max if args.cost_max is not None else env.unwrapped.max_episode_cost
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "datasets",
                                         f"{args.env_id}.hdf5")
    num_episodes = math.ceil(args.oversample * args.num_trajectories)
    tasks = [(args.seed, i) for i in range(num_episodes)]
    start = time.time()
    with get_context("spawn").Pool(args.workers, _init_worker, (args.env_id, args.checkpoints, args.noise_max)) as pool:
        episodes = list(tqdm(pool.imap(collect_episode, tasks, chunksize=4), total=num_episodes, desc="episodes"))
    costs = np.array([np.sum(e["costs"]) for e in episodes], dtype=np.float64)
    returns = np.array([np.sum(e["rewards"]) for e in episodes], dtype=np.float64)

    eligible = np.flatnonzero(costs <= cost_max)
    rng = np.random.default_rng(args.seed)
    kept = eligible[grid_select(costs[eligible], returns[eligible], args.num_trajectories, args.cost_bins,
                                args.return_bins, rng)]
    if len(kept) < args.num_trajectories:
        print(f"warning: only {len(kept)} trajectories with cost <= {cost_max}; raise --oversample for more")
    data = {k: np.concatenate([np.asarray(episodes[i][k]) for i in kept]) for k in episodes[0]}
    dtypes = {"terminals": np.bool_, "timeouts": np.bool_}

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with h5py.File(output + ".part", "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v.astype(dtypes.get(k, np.float32)), compression="gzip", shuffle=True)
        f.attrs.update({
            "command": " ".join(sys.argv), "seed": args.seed, "git_commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "env_id": args.env_id,
            "behaviour": "checkpoints: " + ", ".join(args.checkpoints) if args.checkpoints else "scripted controller",
            "episodes_collected": num_episodes, "trajectories": len(kept), "transitions": len(data["rewards"]),
            "cost_max": cost_max, "episode_cost_range": [costs[kept].min(), costs[kept].max()],
            "episode_return_range": [returns[kept].min(), returns[kept].max()],
            "note": "collected by this project, not DSRL's data"})
    os.replace(output + ".part", output)
    scatter_plot(output.removesuffix(".hdf5") + ".png", args.env_id, costs, returns, kept)
    c, r = costs[kept], returns[kept]
    print(f"{output}: {len(kept)} trajectories, {len(data['rewards'])} transitions, {os.path.getsize(output)/1e6:.1f} MB,"
          f" {time.time() - start:.0f}s")
    print(f"episode cost {c.min():.0f}–{c.max():.0f} (≤20: {np.mean(c <= 20):.0%}), return {r.min():.0f}–{r.max():.0f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
