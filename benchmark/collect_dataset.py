"""Collect a DSRL-format offline dataset (HDF5, gzip) from behaviour policies, with DSRL-style grid filtering.

    python benchmark/collect_dataset.py --env-id OfflineCarRun-v0                      # scripted controllers
    python benchmark/collect_dataset.py --env-id OfflineBallCircle-v0 --num-trajectories 800
    python benchmark/collect_dataset.py --env-id OfflineDroneRun-v0                    # trains behaviour agents first
    python benchmark/collect_dataset.py --env-id OfflineHopperVelocityGymnasium-v1     # the same; velocity extra
    python benchmark/collect_dataset.py --env-id OfflineBallRun-v0 --checkpoints a.pt b.pt   # saved actors

Behaviour policies:
  * scripted (CarRun, BallRun): a speed controller with bursts over the task's speed limit and a lateral target.
    Each episode draws a base speed under the limit, a burst speed over it, a total number of burst steps (split
    into bursts at random times), a lateral target and Gaussian action noise. More burst steps mean more cost and
    more reward, so the family sweeps the (episode cost, return) plane. The ball's action is a force in the world
    frame (a velocity controller), the car's a throttle and a steering command.
  * scripted (CarCircle, BallCircle): clockwise running round an ellipse, a narrow one inside the |x| ≤ 6 bounds
    with bursts on a wide one beyond them, at a speed drawn per episode.
  * trained agents (any task; the default where no controller is written, e.g. Drone, Ant and the Safety-Gymnasium
    velocity tasks): DSRL's recipe. SAC-Lag agents are trained online from scratch at several cost limits by this
    project's sac_lag_apid.py, kept in --agents-dir (a later call reuses them), and rolled out with action noise.
  * checkpoints (any task): actors saved by this project's files (format "o2o-safe-rl/1"), each episode with its
    own Gaussian action-noise scale.
Then the kept trajectories are picked round-robin from a (cost × return) grid so they cover the plane evenly
(in the spirit of DSRL's grid filter), with at least --safe-share of them on each side of --reference-limit.
Provenance (command, seed, git commit, counts, ranges) is stored as HDF5 attributes and a scatter plot of
per-trajectory (cost, return) is written next to the file.
"""
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing import get_context
from typing import List, Literal, Optional, Tuple

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
    """actor checkpoints to use as behaviour policies (instead of a scripted controller or trained agents)"""
    behaviour: Literal["auto", "scripted", "agents"] = "auto"
    ("who acts without --checkpoints: `auto` is the scripted controller where the task has one (CarRun, BallRun, "
     "CarCircle, BallCircle) and trained SAC-Lag agents elsewhere; `agents` trains them for any task")
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
    """collector processes (and behaviour agents trained at once)"""
    safe_share: float = 0.4
    ("at least this share of the kept trajectories has episode cost <= --reference-limit, and at least this share "
     "has more, where the collected episodes allow (0: one grid over the whole plane, as for the bundled Run files)")
    reference_limit: float = 20.0
    """the cost limit the data is meant for (DSRL's benchmark limits: 10, 20, 40; velocity tasks 20, 40, 80)"""
    agent_cost_limits: Optional[Tuple[float, ...]] = None
    ("cost limits of the behaviour agents trained when a task has no scripted controller and no --checkpoints are "
     "given (default: 0.1, 0.25, 0.5 and 1 × the task's DSRL max episode cost)")
    agent_episodes: int = 300
    """online episodes each behaviour agent trains for (SAC-Lag from scratch, one update per env step)"""
    agent_updates_per_step: float = 1.0
    """gradient updates per env step when training behaviour agents"""
    agent_hidden_sizes: Tuple[int, ...] = (64, 64)
    """hidden layers of the behaviour agents (small: they only make data, and train ≈3× faster than 256 × 256)"""
    agents_dir: str = "runs/behaviour_agents"
    ("where trained behaviour agents are kept (<agents-dir>/<env-id>/<limit, episodes, sizes, seed>/sac_lag.pt); "
     "an agent already there is reused, so a stopped collection resumes where it stopped")


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


def ellipse_velocity(x: float, y: float, a: float, b: float, speed: float) -> np.ndarray:
    """Desired planar velocity for running clockwise round the ellipse (x/a)² + (y/b)² = 1: the clockwise tangent of
    the ellipse through (x, y) at `speed`, plus a pull back to the ellipse (inwards when outside, outwards inside)."""
    tangent = np.array([y / b**2, -x / a**2])
    normal = np.array([x / a**2, y / b**2])  # outward
    rho = math.sqrt((x / a) ** 2 + (y / b) ** 2)
    tangent /= np.linalg.norm(tangent) + 1e-9
    normal /= np.linalg.norm(normal) + 1e-9
    return speed * (tangent - 3.0 * (rho - 1.0) * normal)


def circle_plan(rng: np.random.Generator, horizon: int, speeds: Tuple[float, float]):
    """One episode's plan: a narrow ellipse inside the |x| ≤ 6 bounds and a wide one beyond them, with a total of
    wide-running steps split into bursts at random times (like the Run controllers' speed bursts), a speed and an
    action-noise scale. The task pays 0.1·(pos × vel)/(1 + |‖pos‖ − 7|) for clockwise running round the origin and
    costs 1 per step beyond |x| = 6: more wide steps cost more and pay more, as does a higher speed."""
    narrow, wide = rng.uniform(3.0, 5.6), rng.uniform(6.5, 8.5)
    b = rng.uniform(5.0, 9.0)
    bursting = np.zeros(horizon, dtype=bool)
    budget = int(rng.integers(0, int(0.8 * horizon))) if rng.random() < 0.7 else 0  # 30 %: the narrow one only
    while bursting.sum() < budget:
        length = int(rng.integers(10, 41))
        start = int(rng.integers(0, horizon - length))
        bursting[start:start + length] = True
    semi_axes = [(wide if burst else narrow, b) for burst in bursting]
    return semi_axes, rng.uniform(*speeds), rng.uniform(0.0, 0.15)


def ball_circle_controller(rng: np.random.Generator, horizon: int):
    """Velocity tracking of the ellipse field (Ball: a is the force along world x and y)."""
    semi_axes, speed, noise = circle_plan(rng, horizon, (1.0, 7.0))

    def policy(obs, t):
        x, y, vx, vy = 10.0 * obs[0], 10.0 * obs[1], 5.0 * obs[2], 5.0 * obs[3]
        action = ellipse_velocity(x, y, *semi_axes[t], speed) - np.array([vx, vy]) + noise * rng.standard_normal(2)
        return np.clip(action, -1.0, 1.0)

    return policy


def car_circle_controller(rng: np.random.Generator, horizon: int):
    """Steering towards the ellipse field's direction, throttle for the speed (RaceCar: throttle a[0] < 0 drives
    forward; the driving direction is atan2(−sin yaw, −cos yaw) and steering a[1] > 0 turns clockwise)."""
    semi_axes, speed, noise = circle_plan(rng, horizon, (0.8, 3.3))

    def policy(obs, t):
        x, y = 10.0 * obs[0], 10.0 * obs[1]
        desired = ellipse_velocity(x, y, *semi_axes[t], speed)
        error = math.atan2(desired[1], desired[0]) - math.atan2(-obs[4], -obs[5])
        error = (error + math.pi) % (2 * math.pi) - math.pi
        action = np.array([-speed / 3.3, -2.0 * error]) + noise * rng.standard_normal(2)
        return np.clip(action, -1.0, 1.0)

    return policy


SCRIPTED_CONTROLLERS = {"OfflineCarRun-v0": car_run_controller, "OfflineBallRun-v0": ball_run_controller,
                        "OfflineBallCircle-v0": ball_circle_controller, "OfflineCarCircle-v0": car_circle_controller}


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (one line, exit 130)
    torch.set_num_threads(1)
    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    _worker.update(env=env, env_id=env_id, actors=[load_actor(p, obs_dim, act_dim) for p in checkpoints],
                   noise_max=noise_max)


def collect_episode(task: Tuple[int, int]) -> dict:
    seed, index = task
    env, actors = _worker["env"], _worker["actors"]
    rng = np.random.default_rng([seed, index])
    np.random.seed((seed * 1_000_000 + index) % 2**32)  # Bullet's reset noise comes from the global np.random
    env.unwrapped.np_random = gym.utils.seeding.np_random(seed * 1_000_000 + index)[0]  # MuJoCo's, from the env's
    torch.manual_seed(seed * 1_000_000 + index)  # a checkpoint actor's sampling: the same data for any --workers
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


# ----------------------------------------------------------------------------------------------------------
# Behaviour agents for tasks without a scripted controller (DSRL's recipe: online agents trained at several cost
# limits, rolled out with action noise). Each agent is this project's sac_lag_apid.py run as a plain SAC-Lag learner
# from scratch, in its own process on one thread.
SAC_LAG_APID = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sac_lag_apid.py")
EPISODES_PER_ITER = 5


class CollectError(Exception):
    """Reported as one line and a non-zero exit."""


def agent_limits(args: Args, max_cost: float) -> Tuple[float, ...]:
    if args.agent_cost_limits is not None:
        return tuple(args.agent_cost_limits)
    return tuple(round(f * max_cost, 1) for f in (0.1, 0.25, 0.5, 1.0))


def agent_path(args: Args, limit: float) -> str:
    """Everything that shapes an agent is in its folder name, so a later call reuses only an identical agent."""
    name = (f"limit{limit:g}_ep{args.agent_episodes}_upd{args.agent_updates_per_step:g}"
            f"_h{'x'.join(map(str, args.agent_hidden_sizes))}_seed{args.seed}")
    return os.path.join(args.agents_dir, args.env_id, name, "sac_lag.pt")


def agent_command(args: Args, limit: float, path: str, horizon: int) -> List[str]:
    """sac_lag_apid.py as an ordinary SAC-Lag learner: the learner collects, online data only, aPID on the episodes'
    mean cost, standard SAC settings (learning rates 3e-4, α learned, batch 256, --agent-updates-per-step)."""
    updates = max(1, round(args.agent_updates_per_step * EPISODES_PER_ITER * horizon))
    return [sys.executable, SAC_LAG_APID, "--env-id", args.env_id, "--init", "scratch", "--no-cuda",
            "--seed", str(args.seed), "--cost-limit", str(limit), "--online-episodes", str(args.agent_episodes),
            "--episodes-per-iter", str(EPISODES_PER_ITER), "--updates-per-iter", str(updates), "--batch-size", "256",
            "--deploy", "learner", "--bc-weight", "0", "--offline-ratio", "0", "--cost-signal", "episodes",
            "--cost-margin", "0",
            "--actor-lr", "3e-4", "--critic-lr", "3e-4", "--cost-critic-lr", "3e-4",
            "--autotune", "--hidden-sizes", *map(str, args.agent_hidden_sizes),
            "--eval-every", str(args.agent_episodes), "--eval-episodes", "5", "--save-path", path]


def episodes_trained(path: str) -> int:
    """Episodes a running agent has finished, from the first field of its progress CSV's last line."""
    try:
        with open(path.removesuffix(".pt") + "_progress.csv") as f:
            return int(f.readlines()[-1].split(",")[0])
    except (OSError, IndexError, ValueError):
        return 0


def train_behaviour_agents(args: Args, limits: Tuple[float, ...], horizon: int) -> List[str]:
    """Train one agent per cost limit (--workers at a time) unless it is already in --agents-dir; returns their
    checkpoints. One bar over all the episodes to train."""
    paths = [agent_path(args, limit) for limit in limits]
    pending = [(limit, path) for limit, path in zip(limits, paths) if not os.path.isfile(path)]
    if len(pending) < len(paths):
        print(f"behaviour agents: reusing {len(paths) - len(pending)} of {len(paths)} from {args.agents_dir}")
    if not pending:
        return paths
    print(f"behaviour agents: training {len(pending)} (cost limits {', '.join(f'{l:g}' for l, _ in pending)}), "
          f"{args.agent_episodes} episodes each, {args.workers} at a time; logs and checkpoints in "
          f"{os.path.join(args.agents_dir, args.env_id)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running, finished = {}, 0  # path -> (process, log file, cost limit)
    bar = tqdm(total=len(pending) * args.agent_episodes, desc="behaviour agents", unit="episode", dynamic_ncols=True)
    try:
        while pending or running:
            while pending and len(running) < args.workers:
                limit, path = pending.pop(0)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                log = open(path.removesuffix(".pt") + "_train.log", "w")
                process = subprocess.Popen(agent_command(args, limit, path, horizon), stdout=log,
                                           stderr=subprocess.STDOUT, env=env)
                running[path] = (process, log, limit)
            time.sleep(1.0)
            for path, (process, log, limit) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[path]
                if process.returncode != 0 or not os.path.isfile(path):
                    with open(log.name, errors="replace") as f:
                        last = ([line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
                                or ["(empty log)"])[-1]
                    raise CollectError(f"the behaviour agent for cost limit {limit:g} failed (exit "
                                       f"{process.returncode}): {last} (log: {log.name})")
                finished += 1
            bar.n = finished * args.agent_episodes + sum(episodes_trained(path) for path in running)
            bar.refresh()
    finally:  # on an error or Ctrl-C: stop the agents still training (finished ones stay for the next call)
        for process, log, _ in running.values():
            process.terminate()
            process.wait()
            log.close()
        bar.close()
    return paths


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


def select_trajectories(costs: np.ndarray, returns: np.ndarray, n: int, args: Args,
                        rng: np.random.Generator) -> np.ndarray:
    """Indices of the kept episodes: cost at most cost_max, then the grid. With --safe-share s, the grid runs on each
    side of --reference-limit separately, and each side gets at least s·n where it has that many (the plain grid
    gives a side a share proportional to its width in cost: 20 of 0–80 is a quarter)."""
    def grid(indices, count):
        if count == 0 or len(indices) == 0:
            return indices[:0]
        return indices[grid_select(costs[indices], returns[indices], count, args.cost_bins, args.return_bins, rng)]

    eligible = np.flatnonzero(costs <= args.cost_max)
    if args.safe_share == 0:
        return grid(eligible, n)
    safe, unsafe = eligible[costs[eligible] <= args.reference_limit], eligible[costs[eligible] > args.reference_limit]
    natural = int((costs[grid(eligible, n)] <= args.reference_limit).sum())
    floor = math.ceil(args.safe_share * n)
    n_safe = min(max(min(max(natural, floor), n - floor), n - len(unsafe)), len(safe))
    return np.sort(np.concatenate([grid(safe, n_safe), grid(unsafe, min(n - n_safe, len(unsafe)))]))


def git_commit() -> str:
    """HEAD, marked when this file differs from it (the data then come from code that no commit holds)."""
    def git(*command):
        return subprocess.run(["git", *command], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    try:
        changed = git("status", "--porcelain", "--", os.path.abspath(__file__))
        return git("rev-parse", "HEAD") + (" + uncommitted changes to collect_dataset.py" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def benchmark_limits(env_id: str) -> Tuple[float, ...]:
    """DSRL's benchmark cost limits: 10, 20 and 40 for the Bullet tasks, 20, 40 and 80 for the velocity ones."""
    return (20.0, 40.0, 80.0) if "Velocity" in env_id else (10.0, 20.0, 40.0)


def scatter_plot(path: str, env_id: str, costs, returns, kept):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    dropped = np.setdiff1d(np.arange(len(costs)), kept)
    ax.scatter(costs[dropped], returns[dropped], s=6, c="lightgray", label=f"collected, dropped ({len(dropped)})")
    ax.scatter(costs[kept], returns[kept], s=8, c="tab:blue", label=f"kept ({len(kept)})")
    for limit, style in zip(benchmark_limits(env_id), (":", "--", "-.")):
        ax.axvline(limit, color="tab:red", linestyle=style, linewidth=1, label=f"cost limit {limit:g}")
    ax.set_xlabel("episode cost")
    ax.set_ylabel("episode return")
    ax.set_title(f"{env_id}: per-trajectory cost and return")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_args(args: Args) -> None:
    """Every flag, before any work starts; each error names its flag."""
    if args.behaviour == "scripted" and args.env_id not in SCRIPTED_CONTROLLERS:
        raise CollectError(f"--behaviour scripted: no scripted controller for {args.env_id} (there is one for "
                           f"{', '.join(SCRIPTED_CONTROLLERS)}); use --behaviour agents")
    for p in args.checkpoints:
        if not os.path.isfile(p):
            raise CollectError(f"--checkpoints {p}: no such file")
    for flag, value in (("--num-trajectories", args.num_trajectories), ("--workers", args.workers),
                        ("--agent-episodes", args.agent_episodes), ("--cost-bins", args.cost_bins),
                        ("--return-bins", args.return_bins)):
        if value < 1:
            raise CollectError(f"{flag} {value}: must be >= 1")
    if args.oversample < 1:
        raise CollectError(f"--oversample {args.oversample}: must be >= 1")
    if not 0 <= args.safe_share <= 0.5:
        raise CollectError(f"--safe-share {args.safe_share}: must be in [0, 0.5] (a share for each side of the limit)")
    if not args.agent_updates_per_step > 0 or not args.noise_max >= 0:
        raise CollectError("--agent-updates-per-step must be > 0 and --noise-max >= 0")
    if args.cost_max is not None and args.cost_max < 0 or args.reference_limit < 0 \
            or min(args.agent_cost_limits or (0,)) < 0:
        raise CollectError("--cost-max, --reference-limit and --agent-cost-limits must be >= 0")


def main(args: Args) -> None:
    check_args(args)
    try:
        env = gym.make(args.env_id)
    except gym.error.Error as e:
        raise CollectError(f"--env-id {args.env_id}: {e}") from None
    args = replace(args, cost_max=args.cost_max if args.cost_max is not None else env.unwrapped.max_episode_cost)
    output = args.output or os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                          "datasets", f"{args.env_id}.hdf5"))
    try:  # the output must be writable before anything is trained or collected
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        open(output + ".part", "w").close()
        os.remove(output + ".part")
    except OSError as e:
        raise CollectError(f"--output {output}: cannot write there ({e.strerror})") from None
    horizon = env.spec.max_episode_steps
    start = time.time()
    checkpoints, behaviour = args.checkpoints, "scripted controller"
    if checkpoints:
        behaviour = "checkpoints: " + ", ".join(checkpoints)
    elif args.behaviour == "agents" or args.env_id not in SCRIPTED_CONTROLLERS:
        limits = agent_limits(args, args.cost_max)
        checkpoints = tuple(train_behaviour_agents(args, limits, horizon))
        behaviour = (f"SAC-Lag agents trained by this collector at cost limits {', '.join(f'{l:g}' for l in limits)}"
                     f" ({args.agent_episodes} episodes, {args.agent_updates_per_step:g} updates per step, hidden "
                     f"{'x'.join(map(str, args.agent_hidden_sizes))}), with action noise")
    num_episodes = math.ceil(args.oversample * args.num_trajectories)
    tasks = [(args.seed, i) for i in range(num_episodes)]
    with get_context("spawn").Pool(args.workers, _init_worker, (args.env_id, checkpoints, args.noise_max)) as pool:
        episodes = list(tqdm(pool.imap(collect_episode, tasks, chunksize=4), total=num_episodes, desc="episodes"))
    costs = np.array([np.sum(e["costs"]) for e in episodes], dtype=np.float64)
    returns = np.array([np.sum(e["rewards"]) for e in episodes], dtype=np.float64)

    kept = select_trajectories(costs, returns, args.num_trajectories, args, np.random.default_rng(args.seed))
    if len(kept) < args.num_trajectories:
        print(f"warning: only {len(kept)} trajectories with cost <= {args.cost_max:g}; raise --oversample for more")
    data = {k: np.concatenate([np.asarray(episodes[i][k]) for i in kept]) for k in episodes[0]}
    dtypes = {"terminals": np.bool_, "timeouts": np.bool_}

    with h5py.File(output + ".part", "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v.astype(dtypes.get(k, np.float32)), compression="gzip", compression_opts=9,
                             shuffle=True)
        f.attrs.update({
            "command": " ".join(sys.argv), "seed": args.seed, "git_commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "env_id": args.env_id,
            "behaviour": behaviour, "episodes_collected": num_episodes, "trajectories": len(kept),
            "transitions": len(data["rewards"]), "cost_max": args.cost_max, "safe_share": args.safe_share,
            "reference_limit": args.reference_limit, "episode_cost_range": [costs[kept].min(), costs[kept].max()],
            "episode_return_range": [returns[kept].min(), returns[kept].max()],
            "note": "collected by this project, not DSRL's data"})
    os.replace(output + ".part", output)
    scatter_plot(output.removesuffix(".hdf5") + ".png", args.env_id, costs, returns, kept)
    c, r = costs[kept], returns[kept]
    print(f"{output}: {len(kept)} trajectories, {len(data['rewards'])} transitions, "
          f"{os.path.getsize(output) / 1e6:.1f} MB, {time.time() - start:.0f}s")
    safe = c <= args.reference_limit
    print(f"episode cost {c.min():.0f}–{c.max():.0f} (≤{args.reference_limit:g}: {np.mean(safe):.0%}), return "
          f"{r.min():.0f}–{r.max():.0f}, best return at cost ≤{args.reference_limit:g}: "
          f"{r[safe].max() if safe.any() else float('nan'):.1f}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except CollectError as e:
        sys.exit(f"collect_dataset.py: error: {e}")
    except KeyboardInterrupt:
        print(f"collect_dataset.py: interrupted; trained behaviour agents are kept (see --agents-dir) and the same "
              f"command continues from them; no dataset was written", file=sys.stderr)
        sys.exit(130)
