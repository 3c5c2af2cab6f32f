"""FamO2O-Lag: a safe "Train Once, Get a Family" (Wang et al., NeurIPS 2023) baseline in one file.

    python famo2o_lag.py --env-id OfflineCarRun-v0   # offline → family sweep → online → runs/<run>/famo2o.pt

A universal actor π(a|s, β) (the shared `Actor` on s and e(β) = [sin(β/k), cos(β/k)], k = 10000^(i/3), i = 0, 1, 2)
for every balance β ∈ [β_min, β_max], and a balance model π_b(β|s) (the `Actor` with one output b, β = β_min +
(b + 1)/2·(β_max − β_min)). Per step on (s, a, r, c, s', term), β ~ U[β_min, β_max] offline, β ~ π_b(·|s) online:
  1. Critics: y = r + γ(1−term)(min Q'(s', a') − α·log π(a'|s', β)), y_c = c + γ(1−term)·Qc'(s', a'), a' ~ π(·|s', β).
  2. Actor: L_π = mean(α·log π(ã|s,β) − β·(min Q − λQc)(s,ã)/ν + ‖tanh μ(s,β) − a‖²), ν = sg(mean|Q − λQc|).
  3. Balance: L_b = mean(α_b·log π_b(β|s) − (min Q − λQc)(s,ā)/ν_b), ā = tanh μ(s,β); α_b towards entropy −0.5.
  4. λ ← max(0, λ + η·(mean Qc(s, ā) − q_thres)), q_thres = d(1−γ^T)/((1−γ)T); then Polyak-average the targets.
Beside --save-path <stem>.pt: the best offline evaluation (cpq.py's rule) in <stem>_offline.pt, the return/cost
trade-off of fixed β ∈ --family-betas (<stem>_family.csv, .png), sac_lag_apid.py's online loop (<stem>_progress.csv).
FamO2O wraps AWAC/IQL without costs: the SAC-Lag+BC base (BC as in TD3+BC), cost critic and λ are this project's.
"""
import copy
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple

os.environ.setdefault("DSRL_SUPPRESS_IMPORT_ERROR", "1")  # dsrl warns about suites we do not install
import dsrl  # noqa: F401  (registers the Offline*-v0 environments)
import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = "famo2o_lag"  # name of this experiment (part of the run name)
    env_id: str = "OfflineCarRun-v0"  # DSRL task: Offline{Ball,Car,Drone,Ant}{Run,Circle}-v0
    seed: int = 0  # seed of the experiment
    torch_deterministic: bool = True  # set `torch.backends.cudnn.deterministic`
    cuda: bool = True  # use CUDA when it is available
    track: bool = False  # log to Weights and Biases (needs wandb and a login)
    wandb_project_name: str = "o2o-safe-rl"  # wandb project name
    dataset_path: Optional[str] = None  # DSRL-format HDF5 file (default: DSRL cache, then datasets/<env-id>.hdf5)
    save_path: Optional[str] = None  # final checkpoint (default runs/<run-name>/famo2o.pt); the other outputs beside it
    cost_limit: float = 20.0  # episode cost limit d (undiscounted sum of per-step costs)
    eval_episodes: int = 10  # deterministic evaluation episodes, in a separate env
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # target-network Polyak rate
    reward_scale: float = 0.1  # rewards are multiplied by this in training (returns are reported unscaled)
    hidden_sizes: Tuple[int, ...] = (256, 256)  # hidden layers of actor and critics
    alpha: Optional[float] = None  # SAC entropy weight α of the actor, both phases (default: the env's ENV_DEFAULTS)
    # the family: β and the balance model
    beta_min: float = 1.0  # smallest balance β (most behaviour cloning)
    beta_max: float = 5.0  # largest balance β (most improvement of Q − λQc)
    family_betas: Tuple[float, ...] = (1.0, 3.0, 5.0)  # fixed β evaluated after offline training (the family sweep)
    balance_hidden_sizes: Tuple[int, ...] = (64, 64)  # hidden layers of the balance model π_b(β|s)
    balance_lr: float = 1e-4  # balance model learning rate (both phases)
    balance_alpha: float = 0.1  # initial entropy temperature α_b of the balance model (autotuned)
    balance_alpha_lr: float = 3e-4  # learning rate of log α_b
    balance_target_entropy: float = -0.5  # target entropy of π_b (of its squashed output in [−1, 1])
    # offline phase
    offline_steps: int = 100_000  # offline gradient steps
    batch_size: int = 256  # offline minibatch size
    eval_every: int = 5_000  # evaluate (and maybe keep as best) every this many offline steps
    offline_actor_lr: float = 1e-4  # offline actor learning rate
    offline_critic_lr: float = 1e-3  # offline reward and cost critic learning rate
    # online phase (sac_lag_apid.py's schedule; None: the env's ENV_DEFAULTS)
    online_episodes: Optional[int] = None  # online episodes
    episodes_per_iter: int = 5  # stochastic episodes collected per iteration
    updates_per_iter: int = 20  # gradient steps per iteration
    online_batch_size: int = 64  # online minibatch size
    online_eval_every: int = 100  # evaluate every this many online episodes
    actor_lr: Optional[float] = None  # online actor learning rate
    critic_lr: Optional[float] = None  # online reward critic learning rate
    cost_critic_lr: Optional[float] = None  # online cost critic learning rate
    # not in the paper (FamO2O has no costs): the Lagrange multiplier λ
    lambda_lr: float = 1e-3  # η of λ ← max(0, λ + η·(mean Qc(s, ā) − q_thres)), once per gradient step, both phases
    lambda_init: float = 0.0  # λ at the start of offline training


# Per-env defaults of the official Marvel configuration, for the Args fields left at None.
ENV_DEFAULTS = {
    "OfflineBallCircle-v0": dict(actor_lr=5e-5, critic_lr=5e-3, cost_critic_lr=5e-3, alpha=1e-3, online_episodes=500),
    "OfflineBallRun-v0": dict(actor_lr=1e-5, critic_lr=5e-3, cost_critic_lr=5e-3, alpha=1e-3, online_episodes=500),
    "OfflineCarCircle-v0": dict(actor_lr=5e-4, critic_lr=5e-3, cost_critic_lr=8e-3, alpha=1e-3, online_episodes=500),
    "OfflineCarRun-v0": dict(actor_lr=5e-5, critic_lr=5e-3, cost_critic_lr=8e-3, alpha=5e-3, online_episodes=500),
    "OfflineDroneCircle-v0": dict(actor_lr=5e-6, critic_lr=8e-4, cost_critic_lr=2e-3, alpha=5e-3,
                                  online_episodes=1000),
    "OfflineDroneRun-v0": dict(actor_lr=2e-6, critic_lr=8e-3, cost_critic_lr=5e-3, alpha=1e-3, online_episodes=5000),
    "OfflineAntCircle-v0": dict(actor_lr=5e-5, critic_lr=5e-4, cost_critic_lr=8e-4, alpha=5e-5, online_episodes=5000),
    "OfflineAntRun-v0": dict(actor_lr=5e-5, critic_lr=2e-3, cost_critic_lr=5e-3, alpha=1e-4, online_episodes=5000),
    "OfflineHalfCheetahVelocityGymnasium-v1": dict(actor_lr=1e-3, critic_lr=1e-2, cost_critic_lr=1e-2, alpha=5e-3,
                                                   online_episodes=5000),
    "OfflineHopperVelocityGymnasium-v1": dict(actor_lr=1e-3, critic_lr=1e-2, cost_critic_lr=1e-2, alpha=5e-3,
                                              online_episodes=5000),
    "OfflineSwimmerVelocityGymnasium-v1": dict(actor_lr=1e-5, critic_lr=5e-4, cost_critic_lr=8e-4, alpha=1e-4,
                                               online_episodes=2000),
}


# --- Data: a DSRL-format HDF5 file, checked against the env --------------------------------------------------
DSRL_KEYS = ("observations", "next_observations", "actions", "rewards", "costs", "terminals", "timeouts")


class InputError(Exception):
    """Bad input (dataset, checkpoint, flag): reported as one line and a non-zero exit, no traceback."""


def find_dataset(env_id: str, dataset_url: str, dataset_path: Optional[str] = None) -> str:
    """--dataset-path, else DSRL's cache file ($DSRL_DATASET_DIR, default ~/.dsrl/datasets), else the bundled
    datasets/<env-id>.hdf5."""
    cached = os.path.join(os.environ.get("DSRL_DATASET_DIR", os.path.expanduser("~/.dsrl/datasets")),
                          os.path.basename(dataset_url))
    bundled = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets", f"{env_id}.hdf5")
    for path in [dataset_path] if dataset_path is not None else [cached, bundled]:
        if os.path.isfile(path):
            if path == bundled:
                print(f"dataset: {bundled} (this project's locally collected data, not DSRL's)")
            return path
    raise InputError(f"no dataset at {dataset_path or cached + ' or ' + bundled}; pass --dataset-path or make one: "
                     f"python benchmark/collect_dataset.py --env-id {env_id}")


def load_dataset(path: str, obs_dim: int, act_dim: int) -> dict:
    """Read the seven DSRL keys and check shapes against the env, dtypes and finiteness."""
    try:
        with h5py.File(path, "r") as f:
            data = {k: f[k][()] for k in DSRL_KEYS if k in f}
    except OSError as e:
        raise InputError(f"{path}: not a readable HDF5 file ({e})") from None
    if len(data) < len(DSRL_KEYS):
        raise InputError(f"{path}: missing keys {[k for k in DSRL_KEYS if k not in data]}")
    n = len(data["observations"])
    widths = {"observations": obs_dim, "next_observations": obs_dim, "actions": act_dim}
    for k, v in data.items():
        if k not in widths and v.ndim == 2 and v.shape[1] == 1:
            v = data[k] = v[:, 0]  # DSRL tolerates (N, 1) for scalar keys
        expected = (n, widths[k]) if k in widths else (n,)
        if n == 0 or v.shape != expected:
            raise InputError(f"{path}: '{k}' has shape {v.shape}, expected {expected} for this env")
        if k in ("terminals", "timeouts"):
            if not (v.dtype == np.bool_ or np.isin(v, (0, 1)).all()):
                raise InputError(f"{path}: '{k}' must be boolean (0/1), got dtype {v.dtype}")
        elif not np.issubdtype(v.dtype, np.floating):
            raise InputError(f"{path}: '{k}' must be floating point, got dtype {v.dtype}")
        elif not np.isfinite(v).all():
            raise InputError(f"{path}: '{k}' has {int((~np.isfinite(v)).sum())} non-finite values")
    return {k: v.astype(np.float32) for k, v in data.items()}


# --- Environment and evaluation -----------------------------------------------------------------------------
def make_env(env_id: str, seed: int) -> gym.Env:
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        raise InputError(f"--env-id {env_id}: {e}") from None
    env.action_space.seed(seed)  # Bullet ignores reset(seed=...); its reset noise comes from np.random
    env.unwrapped.np_random = gym.utils.seeding.np_random(seed)[0]  # MuJoCo's reset noise; no reset, no np.random
    return env


@torch.no_grad()
def evaluate(actor: nn.Module, env: gym.Env, episodes: int, cost_limit: float, device: torch.device) -> dict:
    """Deterministic episodes; raw and DSRL-normalised return and cost (means over episodes)."""
    returns, costs = [], []
    for _ in range(episodes):
        obs, _ = env.reset()
        done, ep_ret, ep_cost = False, 0.0, 0.0
        while not done:
            action, _ = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None], deterministic=True)
            obs, reward, terminated, truncated, info = env.step(action[0].cpu().numpy())
            ep_ret, ep_cost, done = ep_ret + reward, ep_cost + info["cost"], terminated or truncated
        returns.append(ep_ret)
        costs.append(ep_cost)
    env.unwrapped.set_target_cost(cost_limit)
    norm_ret, norm_cost = env.unwrapped.get_normalized_score(np.mean(returns), np.mean(costs))
    return {"return": float(np.mean(returns)), "cost": float(np.mean(costs)),
            "normalized_return": float(norm_ret), "normalized_cost": float(norm_cost)}


# --- Networks, identical in every file (so checkpoints move between files with strict loading) --------------
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


class QEnsemble(nn.Module):
    """`num_q` independent Q(s, a) MLPs with stacked weights, evaluated by one batched matmul per layer.
    forward(obs (B, O), act (B, A)) -> (num_q, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: Tuple[int, ...], num_q: int):
        super().__init__()
        sizes = [obs_dim + act_dim, *hidden_sizes, 1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation, per member
            self.weights.append(nn.Parameter(torch.empty(num_q, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_q, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], -1).expand(len(self.weights[0]), -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = F.relu(x)
        return x.squeeze(-1)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


# --- Checkpoints: a dict of tensors and plain values, loadable with torch.load(path, weights_only=True) ------
CHECKPOINT_FORMAT = "o2o-safe-rl/1"


def to_cpu(value):
    """Tensors, also inside dicts and lists, on the CPU: a checkpoint written on a GPU opens anywhere."""
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value.detach().cpu() if torch.is_tensor(value) else value


def prepare_output_dir(path: str) -> str:
    """Create the folder of `path` and prove it writable before any work; returns it (TensorBoard logs go there)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise InputError(f"{path}: cannot write there ({e.strerror or e})") from None
    return folder


def save_checkpoint(path: str, checkpoint: dict) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, **to_cpu(checkpoint)}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written checkpoint


# --- Flags: every bad one is refused in one line naming it, before any work --------------------------------
def refuse(flag: str, value, must: str) -> None:
    value = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    raise InputError(f"--{flag.replace('_', '-')} {value}: must be {must}")


def check_common_args(args) -> None:
    """The flags every file has: cost limit, discount, Polyak rate, hidden sizes, evaluation episodes."""
    for flag, holds, must in (("cost_limit", args.cost_limit >= 0, ">= 0 (an episode's cost is a sum of costs >= 0)"),
                              ("gamma", 0 < args.gamma < 1, "in (0, 1)"), ("tau", 0 < args.tau <= 1, "in (0, 1]"),
                              ("hidden_sizes", min(args.hidden_sizes, default=0) >= 1, "one or more sizes >= 1"),
                              ("eval_episodes", args.eval_episodes >= 1, ">= 1")):
        if not holds:
            refuse(flag, getattr(args, flag), must)


# --- Online data: episodes side by side (one batched actor call per step) into a device-resident ring buffer ---
REPLAY_KEYS = ("observations", "actions", "rewards", "costs", "next_observations", "terminals")


@torch.no_grad()
def collect_episodes(envs, actor: nn.Module, device: torch.device, deterministic: bool = False):
    """One episode in each env. Returns (transitions dict of float32 arrays, episode returns, episode costs)."""
    obs = np.stack([env.reset()[0] for env in envs]).astype(np.float32)
    running = np.ones(len(envs), dtype=bool)
    returns, costs = np.zeros(len(envs)), np.zeros(len(envs))
    steps = {k: [] for k in REPLAY_KEYS}
    while running.any():
        live = np.flatnonzero(running)
        actions, _ = actor(torch.as_tensor(obs[live], device=device), deterministic=deterministic)
        actions = actions.cpu().numpy()
        for i, action in zip(live, actions):
            next_obs, reward, terminated, truncated, info = envs[i].step(action)
            for k, v in zip(REPLAY_KEYS, (obs[i], action, reward, info["cost"], next_obs, terminated)):
                steps[k].append(v)
            returns[i] += reward
            costs[i] += info["cost"]
            obs[i] = next_obs
            running[i] = not (terminated or truncated)
    return {k: np.asarray(v, dtype=np.float32) for k, v in steps.items()}, returns, costs


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        widths = {"observations": obs_dim, "next_observations": obs_dim, "actions": act_dim}
        self.data = {k: torch.zeros((capacity, widths[k]) if k in widths else (capacity,), device=device)
                     for k in REPLAY_KEYS}
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, batch: dict) -> None:
        n = len(batch["rewards"])
        idx = torch.arange(self.pos, self.pos + n) % self.capacity
        for k, v in batch.items():
            self.data[k][idx] = torch.as_tensor(v).to(self.data[k].device)
        self.pos, self.size = (self.pos + n) % self.capacity, min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> list:
        idx = torch.randint(self.size, (batch_size,), device=generator.device, generator=generator)
        return [self.data[k][idx] for k in REPLAY_KEYS]


# --- The family: β encoding, the balance model π_b(β|s), and the policy that acts (universal actor + its β) -----
BETA_DIM = 6  # [sin(β/k), cos(β/k)] for k = 10000^(i/3), i = 0, 1, 2


def beta_encoding(beta: torch.Tensor) -> torch.Tensor:
    """e(β) = [sin(β/k₀), cos(β/k₀), sin(β/k₁), cos(β/k₁), sin(β/k₂), cos(β/k₂)], k_i = 10000^(i/3) = 1, 21.5,
    464 (transformer-style): (B,) -> (B, 6). The divisors are built on β's device: no host copy per call."""
    divisors = 10000.0 ** (torch.arange(BETA_DIM // 2, device=beta.device) / (BETA_DIM // 2))
    x = beta[:, None] / divisors
    return torch.stack([x.sin(), x.cos()], -1).flatten(1)


def condition(obs: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The universal actor's input: concat(s, e(β))."""
    return torch.cat([obs, beta_encoding(beta)], -1)


def beta_from_unit(b: torch.Tensor, beta_min: float, beta_max: float) -> torch.Tensor:
    """b = tanh(u) ∈ [−1, 1]  ->  β = β_min + (b + 1)/2·(β_max − β_min) ∈ [β_min, β_max]."""
    return beta_min + (b + 1) / 2 * (beta_max - beta_min)


class BalanceModel(nn.Module):
    """π_b(β|s): the shared squashed-Gaussian Actor with one output, mapped into [β_min, β_max].
    forward(obs) -> (β (B,), log π_b of the squashed variable b (B,); None when deterministic)."""

    def __init__(self, obs_dim: int, hidden_sizes: Tuple[int, ...], beta_min: float, beta_max: float):
        super().__init__()
        self.policy = Actor(obs_dim, 1, hidden_sizes)
        self.beta_min, self.beta_max = beta_min, beta_max

    def forward(self, obs: torch.Tensor, deterministic: bool = False):
        b, log_prob = self.policy(obs, deterministic)
        return beta_from_unit(b[:, 0], self.beta_min, self.beta_max), log_prob


class FamilyPolicy(nn.Module):
    """a ~ π(·|s, β) with β from the balance model (fixed_beta None) or a fixed β: the (obs, deterministic) ->
    (action, log π) interface that evaluate() and collect_episodes() call."""

    def __init__(self, actor: Actor, balance: BalanceModel, fixed_beta: Optional[float] = None):
        super().__init__()
        self.actor, self.balance, self.fixed_beta = actor, balance, fixed_beta

    def forward(self, obs: torch.Tensor, deterministic: bool = False):
        if self.fixed_beta is None:
            beta = self.balance(obs, deterministic)[0]
        else:
            beta = torch.full((len(obs),), self.fixed_beta, device=obs.device)
        return self.actor(condition(obs, beta), deterministic)


# --- FamO2O-Lag: SAC-Lag+BC universal actor, twin reward critic, cost critic, balance model, dual-ascent λ -----
def episode_q_threshold(cost_limit: float, gamma: float, horizon: int) -> float:
    """Per-step Q budget of an episode budget d spread evenly over T steps: d·(1−γ^T)/((1−γ)·T)."""
    return cost_limit * (1 - gamma ** horizon) / ((1 - gamma) * horizon)


def is_better(result: dict, best: Optional[dict]) -> bool:
    """Threshold-aware selection: among safe evaluations (normalised cost ≤ 1) the highest return; a safe one
    beats any unsafe one; among unsafe ones the lowest cost."""
    if best is None:
        return True
    safe, best_safe = result["normalized_cost"] <= 1, best["normalized_cost"] <= 1
    if safe != best_safe:
        return safe
    return result["return"] > best["return"] if safe else result["cost"] < best["cost"]


class FamO2OLag(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, q_thres: float):
        super().__init__()
        self.args, self.alpha, self.q_thres = args, args.alpha, q_thres
        self.actor = Actor(obs_dim + BETA_DIM, act_dim, args.hidden_sizes)
        self.critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.cost_critic_target.load_state_dict(self.cost_critic.state_dict())
        self.balance = BalanceModel(obs_dim, args.balance_hidden_sizes, args.beta_min, args.beta_max)
        self.balance_log_alpha = nn.Parameter(torch.tensor(math.log(args.balance_alpha)))
        self.target_entropy = args.balance_target_entropy
        self.register_buffer("lam", torch.tensor(float(args.lambda_init)))  # a device tensor: no sync per step
        self.set_optimizers(args.offline_actor_lr, args.offline_critic_lr, args.offline_critic_lr)

    def set_optimizers(self, actor_lr: float, critic_lr: float, cost_critic_lr: float) -> None:
        """Fresh Adam optimizers (called again online: offline moments and lrs are not carried over)."""
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=actor_lr)
        # both critics in one optimizer (two lrs): their losses are independent, so one backward serves both
        self.critics_opt = torch.optim.Adam([{"params": self.critic.parameters(), "lr": critic_lr},
                                             {"params": self.cost_critic.parameters(), "lr": cost_critic_lr}])
        self.balance_opt = torch.optim.Adam(self.balance.parameters(), lr=self.args.balance_lr)
        self.balance_alpha_opt = torch.optim.Adam([self.balance_log_alpha], lr=self.args.balance_alpha_lr)

    def lagrangian_value(self, obs, act):
        """(min Q(s,a) − λ·Qc(s,a), Qc(s,a)) with the online critics."""
        qc = self.cost_critic(obs, act)[0]
        return self.critic(obs, act).min(0).values - self.lam * qc, qc

    def actor_loss(self, obs, data_act, beta):
        """L_π = mean(α log π(ã|s,β) − β·(Q − λQc)(s,ã)/ν + ‖tanh μ(s,β) − a‖²), ν = sg(mean|Q − λQc|):
        β trades the normalised Lagrangian value against behaviour cloning, per sample."""
        x = condition(obs, beta)
        act, log_prob = self.actor(x)
        mean_act, _ = self.actor(x, deterministic=True)
        value, _ = self.lagrangian_value(obs, act)
        nu = value.abs().mean().detach().clamp_min(1e-6)
        bc = ((mean_act - data_act) ** 2).sum(-1)
        return (self.alpha * log_prob - beta * value / nu + bc).mean(), log_prob, bc

    def balance_loss(self, obs):
        """L_b = mean(α_b log π_b(β|s) − (Q − λQc)(s, ā)/ν_b), ā = tanh μ(s, β), β ~ π_b(·|s) reparameterised:
        the gradient flows through ā and β into π_b, towards the balance whose action the critics value most."""
        beta, log_prob = self.balance(obs)
        act, _ = self.actor(condition(obs, beta), deterministic=True)
        value, qc = self.lagrangian_value(obs, act)
        nu = value.abs().mean().detach().clamp_min(1e-6)
        return (self.balance_log_alpha.exp().detach() * log_prob - value / nu).mean(), log_prob, beta, qc

    def update(self, obs, act, reward, cost, next_obs, term, beta: Optional[torch.Tensor] = None) -> dict:
        """One step on every part. `beta` per sample (offline: uniform); None: a sample of the balance model."""
        with torch.no_grad():
            if beta is None:
                beta = self.balance(obs)[0]
            # y = r + γ(1−term)(min Q'(s',a') − α log π(a'|s',β)), y_c = c + γ(1−term)·Qc'(s',a'), a' ~ π(·|s',β)
            next_act, next_log_prob = self.actor(condition(next_obs, beta))
            soft_value = self.critic_target(next_obs, next_act).min(0).values - self.alpha * next_log_prob
            y = reward + self.args.gamma * (1 - term) * soft_value
            y_c = cost + self.args.gamma * (1 - term) * self.cost_critic_target(next_obs, next_act)[0]
        critic_loss = F.mse_loss(self.critic(obs, act), y.expand(2, -1), reduction="none").mean(1).sum()
        cost_critic_loss = F.mse_loss(self.cost_critic(obs, act)[0], y_c)
        self.critics_opt.zero_grad(set_to_none=True)
        (critic_loss + cost_critic_loss).backward()
        self.critics_opt.step()
        self.critic.requires_grad_(False)  # the actor and balance steps need gradients w.r.t. actions only
        self.cost_critic.requires_grad_(False)
        actor_loss, log_prob, bc = self.actor_loss(obs, act, beta)
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.actor.requires_grad_(False)  # π_b moves β; the universal actor stays as it is
        balance_loss, balance_log_prob, balance_beta, qc = self.balance_loss(obs)
        self.balance_opt.zero_grad(set_to_none=True)
        balance_loss.backward()
        self.balance_opt.step()
        for net in (self.actor, self.critic, self.cost_critic):
            net.requires_grad_(True)
        # α_b ← minimise −α_b(log π_b + H̄): raises α_b while π_b's entropy is below the target
        alpha_loss = -(self.balance_log_alpha.exp() * (balance_log_prob.detach() + self.target_entropy)).mean()
        self.balance_alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.balance_alpha_opt.step()
        # λ ← max(0, λ + η·(mean Qc(s, ā) − q_thres)): dual ascent on the critic's cost of the acting policy
        self.lam.copy_((self.lam + self.args.lambda_lr * (qc.detach().mean() - self.q_thres)).clamp_min(0.0))
        soft_update(self.critic_target, self.critic, self.args.tau)
        soft_update(self.cost_critic_target, self.cost_critic, self.args.tau)
        return {"losses/critic": critic_loss.detach(), "losses/cost_critic": cost_critic_loss.detach(),
                "losses/actor": actor_loss.detach(), "losses/bc": bc.detach().mean(),
                "losses/entropy": -log_prob.detach().mean(), "losses/balance": balance_loss.detach(),
                "losses/qc_pi": qc.detach().mean(), "lagrange/lambda": self.lam.clone(),
                "famo2o/balance_alpha": self.balance_log_alpha.detach().exp(),
                "famo2o/balance_entropy": -balance_log_prob.detach().mean(),
                "famo2o/beta_mean": balance_beta.detach().mean(), "famo2o/beta_std": balance_beta.detach().std()}

    def checkpoint(self, args: Args, env_id: str, obs_dim: int, act_dim: int, step: int) -> dict:
        return {"algo": "famo2o_lag", "env_id": env_id, "obs_dim": obs_dim, "act_dim": act_dim,
                "hidden_sizes": list(args.hidden_sizes), "reward_scale": args.reward_scale,
                "cost_limit": args.cost_limit, "step": step,
                "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "cost_critic": self.cost_critic.state_dict(),
                "cost_critic_target": self.cost_critic_target.state_dict(), "balance": self.balance.state_dict(),
                "beta_range": [args.beta_min, args.beta_max], "balance_log_alpha": self.balance_log_alpha.detach(),
                "lagrange": {"kind": "critic_dual", "lam": float(self.lam), "lr": args.lambda_lr,
                             "q_thres": self.q_thres},
                "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()}}

    def load(self, ckpt: dict) -> None:
        """Every network strictly, plus λ and α_b (optimizer state is never loaded)."""
        for name in ("actor", "critic", "critic_target", "cost_critic", "cost_critic_target", "balance"):
            getattr(self, name).load_state_dict(ckpt[name])
        self.lam.fill_(ckpt["lagrange"]["lam"])
        self.balance_log_alpha.data.copy_(ckpt["balance_log_alpha"])


def family_sweep(args: Args, agent: FamO2OLag, env: gym.Env, stem: str, device: torch.device, balance_eval: dict):
    """Deterministic evaluation of π(·|s, β) at each fixed β of --family-betas: a return/cost trade-off from one
    offline run, in <stem>_family.csv and <stem>_family.png (with `balance_eval`, β from the balance model)."""
    rows = [{"beta": beta, **evaluate(FamilyPolicy(agent.actor, agent.balance, beta), env, args.eval_episodes,
                                      args.cost_limit, device)} for beta in args.family_betas]
    with open(stem + "_family.csv", "w") as f:
        f.write("beta,return,cost,normalized_return,normalized_cost\n")
        f.writelines(f"{r['beta']}," + ",".join(f"{v:.4f}" for v in list(r.values())[1:]) + "\n" for r in rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["cost"] for r in rows], [r["return"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"β={r['beta']:g}", (r["cost"], r["return"]), textcoords="offset points", xytext=(5, 5))
    ax.plot(balance_eval["cost"], balance_eval["return"], "*", markersize=12, label="β from the balance model")
    ax.axvline(args.cost_limit, color="red", linestyle="--", label=f"cost limit {args.cost_limit:g}")
    ax.set(xlabel="episode cost", ylabel="episode return", title=f"FamO2O-Lag family after offline, {args.env_id}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + "_family.png", dpi=120)
    plt.close(fig)
    return rows


def check_args(args: Args) -> None:
    check_common_args(args)
    counts = ("offline_steps", "batch_size", "eval_every", "episodes_per_iter", "updates_per_iter",
              "online_batch_size", "online_eval_every")
    rates = ("alpha", "balance_alpha", "balance_lr", "balance_alpha_lr", "offline_actor_lr", "offline_critic_lr",
             "actor_lr", "critic_lr", "cost_critic_lr", "reward_scale")
    for flag, holds, must in [*((f, getattr(args, f) >= 1, ">= 1") for f in counts),
                              *((f, getattr(args, f) > 0, "> 0") for f in rates),
                              *((f, getattr(args, f) >= 0, ">= 0") for f in ("online_episodes", "lambda_init")),
                              ("lambda_lr", args.lambda_lr >= 0, ">= 0 (0: λ stays at --lambda-init)"),
                              ("balance_hidden_sizes", min(args.balance_hidden_sizes, default=0) >= 1,
                               "one or more sizes >= 1"),
                              ("beta_min", 0 <= args.beta_min < args.beta_max, f"in [0, --beta-max {args.beta_max})"),
                              ("family_betas", all(args.beta_min <= b <= args.beta_max for b in args.family_betas),
                               f"in [--beta-min, --beta-max] = [{args.beta_min}, {args.beta_max}]")]:
        if not holds:
            refuse(flag, getattr(args, flag), must)


def main(args: Args) -> dict:
    if args.env_id not in ENV_DEFAULTS:
        raise InputError(f"--env-id {args.env_id}: no online defaults; choose one of {sorted(ENV_DEFAULTS)}")
    args = replace(args, **{k: v for k, v in ENV_DEFAULTS[args.env_id].items() if getattr(args, k) is None})
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)  # also Bullet's reset noise
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    env = make_env(args.env_id, args.seed + 10_000)  # evaluation env, apart from the online ones
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    save_path = args.save_path or os.path.join("runs", run_name, "famo2o.pt")
    stem = save_path.removesuffix(".pt")
    run_dir = prepare_output_dir(save_path)
    path = find_dataset(args.env_id, env.unwrapped.dataset_url, args.dataset_path)
    data = {k: torch.as_tensor(v, device=device) for k, v in load_dataset(path, obs_dim, act_dim).items()}
    data["rewards"] = data["rewards"] * args.reward_scale
    q_thres = episode_q_threshold(args.cost_limit, args.gamma, env.spec.max_episode_steps)
    print(f"{args.env_id}: {len(data['rewards'])} transitions from {path}; q_thres={q_thres:.3f} on {device}")

    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)

    agent = FamO2OLag(obs_dim, act_dim, args, q_thres).to(device)
    policy = FamilyPolicy(agent.actor, agent.balance)  # β from the balance model, as deployed

    def evaluation(tag: str, step: int, episodes: Optional[int] = None) -> dict:  # online also a progress CSV row
        result = evaluate(policy, env, args.eval_episodes, args.cost_limit, device)
        for k, v in result.items():
            writer.add_scalar(f"{tag}/{k}", v, step)
        if episodes is not None:
            csv.write(f"{episodes},{step},,,,,,,," + ",".join(f"{v:.4f}" for v in result.values()) + "\n")
        return result

    generator = torch.Generator(device=device).manual_seed(args.seed)
    best, phase, kept, env_steps, start = None, "offline", "nothing saved", 0, time.time()
    try:
        # 1. offline: the universal actor on β ~ U[β_min, β_max] per sample, the balance model on its own β, and λ
        progress = tqdm(range(1, args.offline_steps + 1), desc="famo2o offline")
        for step in progress:
            idx = torch.randint(len(data["rewards"]), (args.batch_size,), device=device, generator=generator)
            beta = torch.rand(args.batch_size, device=device, generator=generator)  # every β learns from every s
            beta = args.beta_min + (args.beta_max - args.beta_min) * beta
            info = agent.update(*(data[k][idx] for k in REPLAY_KEYS), beta=beta)
            if step % 100 == 0:  # one host sync per 100 steps
                for tag, value in zip(info, torch.stack(list(info.values())).tolist()):
                    writer.add_scalar(f"offline/{tag}", value, step)
                writer.add_scalar("offline/charts/SPS", step / (time.time() - start), step)
            if step % args.eval_every == 0 or step == args.offline_steps:
                result = evaluation("offline/eval", step)
                progress.set_postfix(ret=f"{result['return']:.1f}", cost=f"{result['cost']:.1f}",
                                     lam=f"{float(agent.lam):.3f}")
                if is_better(result, best and best["eval"]):
                    # deep copy: the state dicts hold the live parameters, which keep training
                    best = copy.deepcopy({**agent.checkpoint(args, args.env_id, obs_dim, act_dim, step),
                                          "eval": {**result, "step": step}})
                    save_checkpoint(stem + "_offline.pt", best)
                    kept = f"kept {stem}_offline.pt (the best offline evaluation so far)"
        agent.load(best)

        phase = "family sweep"  # 2. fixed β ∈ --family-betas on the kept offline model, saved with it
        family = family_sweep(args, agent, env, stem, device, best["eval"])
        save_checkpoint(stem + "_offline.pt", {**best, "family": family})
        kept = f"kept {stem}_offline.pt (the offline model and its family sweep)"

        # 3. online: the same networks and λ, fresh optimizers at the env's online lrs, sac_lag_apid.py's loop
        phase, csv = "online", open(stem + "_progress.csv", "w")
        csv.write("episodes,env_steps,return,cost,lambda,beta_mean,beta_std,violations,cumulative_cost,"
                  "eval_return,eval_cost,eval_normalized_return,eval_normalized_cost\n")
        agent.set_optimizers(args.actor_lr, args.critic_lr, args.cost_critic_lr)
        # reseeded as marvel_full.py's online stage: the same reset noise (np.random) as the other methods' online runs
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        envs = [make_env(args.env_id, args.seed + i) for i in range(args.episodes_per_iter)]
        replay = ReplayBuffer(args.online_episodes * env.spec.max_episode_steps, obs_dim, act_dim, device)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        env_steps = episodes_done = violations = 0
        cumulative_cost, lam, beta_mean, online_start = 0.0, float(agent.lam), float("nan"), time.time()
        first_eval = last_eval = evaluation("eval", 0, episodes=0)
        progress = tqdm(range(math.ceil(args.online_episodes / args.episodes_per_iter)), desc="famo2o online")
        for _ in progress:
            n = min(args.episodes_per_iter, args.online_episodes - episodes_done)
            batch, returns, costs = collect_episodes(envs[:n], policy, device)  # β ~ π_b, a ~ π
            replay.add({**batch, "rewards": batch["rewards"] * args.reward_scale})
            env_steps += len(batch["rewards"])
            episodes_done += n
            violations += int((costs > args.cost_limit).sum())
            cumulative_cost += float(costs.sum())
            for _ in range(args.updates_per_iter):  # β from the balance model, sampled
                info = agent.update(*replay.sample(args.online_batch_size, generator))
            # the balance model's (deterministic) β at the states visited in this iteration
            with torch.no_grad():
                betas = agent.balance(torch.as_tensor(batch["observations"], device=device), deterministic=True)[0]
            writer.add_histogram("famo2o/beta", betas, env_steps)
            info = {**info, "famo2o/beta_mean": betas.mean(), "famo2o/beta_std": betas.std()}
            values = dict(zip(info, torch.stack(list(info.values())).tolist()))  # one sync per iteration
            lam, beta_mean = values["lagrange/lambda"], values["famo2o/beta_mean"]
            scalars = {**values, "charts/episodic_return": returns.mean(), "charts/episodic_cost": costs.mean(),
                       "charts/online_violations": violations, "charts/cumulative_cost": cumulative_cost,
                       "charts/SPS": env_steps / (time.time() - online_start)}
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, env_steps)
            csv.write(f"{episodes_done},{env_steps},{returns.mean():.4f},{costs.mean():.4f},{lam:.6f},"
                      f"{beta_mean:.4f},{values['famo2o/beta_std']:.4f},{violations},{cumulative_cost:.1f},,,,\n")
            csv.flush()  # a stopped run keeps its progress
            crossed = episodes_done // args.online_eval_every > (episodes_done - n) // args.online_eval_every
            if crossed or episodes_done == args.online_episodes:  # the last iteration evaluates the final policy
                last_eval = evaluation("eval", env_steps, episodes_done)
            progress.set_postfix(ret=f"{returns.mean():.0f}", cost=f"{costs.mean():.1f}", lam=f"{lam:.3f}",
                                 beta=f"{beta_mean:.2f}")
    except KeyboardInterrupt:
        if phase == "online":  # the policy so far, beside the finished offline model
            save_checkpoint(stem + "_interrupted.pt", agent.checkpoint(args, args.env_id, obs_dim, act_dim, env_steps))
            kept += f", {stem}_progress.csv and {stem}_interrupted.pt (the policy so far, not evaluated)"
        print(f"famo2o_lag.py: interrupted in the {phase} phase; {kept}", file=sys.stderr)
        sys.exit(130)
    csv.close()
    save_checkpoint(save_path, {**agent.checkpoint(args, args.env_id, obs_dim, act_dim, env_steps), "eval": last_eval})
    writer.close()

    print(f"\n{'':16}{'return':>9}{'cost':>7}{'norm ret':>10}{'norm cost':>11}")
    for name, r in {f"offline ({best['eval']['step']})": best["eval"], **{f"β = {r['beta']:g}": r for r in family},
                    "online start": first_eval, "final": last_eval}.items():
        print(f"{name:16}{r['return']:>9.1f}{r['cost']:>7.1f}{r['normalized_return']:>10.3f}"
              f"{r['normalized_cost']:>11.3f}")
    print(f"online: {episodes_done} episodes, {violations} over the limit, cumulative cost {cumulative_cost:.0f}, "
          f"final λ {lam:.4f}, last mean β {beta_mean:.2f}; wall time {time.time() - start:.0f}s")
    print(f"checkpoints: {stem}_offline.pt, {save_path}; family sweep {stem}_family.csv; progress {stem}_progress.csv")
    return last_eval


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:
        sys.exit(f"famo2o_lag.py: error: {e}")
