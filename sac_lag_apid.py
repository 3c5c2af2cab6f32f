"""SAC-Lagrangian with an adaptive PID Lagrange multiplier (aPID, Marvel §3.2): online safe RL in one file.

    python sac_lag_apid.py --env-id OfflineCarRun-v0 --init runs/.../vpa.pt          # safe finetuning (defaults)
    python sac_lag_apid.py --env-id OfflineCarRun-v0 --init runs/.../vpa.pt --paper  # Marvel's online phase
    python sac_lag_apid.py --env-id OfflineCarRun-v0 --init runs/.../cpq.pt --paper  # Warm Start (+ --lagrangian dual)
    python sac_lag_apid.py --env-id OfflineCarRun-v0 --init scratch --paper          # From Scratch

Each iteration: collect `episodes_per_iter` stochastic episodes, update λ once, then `updates_per_iter` SAC-Lag
steps on minibatches of the replay buffer:
    y   = r + γ(1−term)·( min Q'(s', a') − α·log π(a'|s') ),   a' ~ π(s')
    y_c = c + γ(1−term)·Qc'(s', a')                            (no entropy in the cost target)
    L_π = mean( α·log π(ã|s) − min Q(s, ã) + λ·Qc(s, ã) ),     ã ~ π(s)
λ comes from `--lagrangian`: apid (Marvel's adaptive gains), pid (fixed gains), dual (projected ascent) or fixed.

Safe finetuning (the defaults, not in the paper; `--paper` turns all of it off, docs/algorithms.md explains it):
  - a deployment gate: the episodes are run by the deployed policy μ_dep, the last learner snapshot that passed a
    test episode (cost ≤ the target (1 − m)·d, halved after each rollback of a deployed learner; return at least
    that of μ_dep's safe episodes); a deployed policy that breaks d is rolled back to the one before it;
  - λ aims at that target and sees the learner's latest test cost instead of the deployed policy's episodes;
  - a TD3+BC-style actor with the value in units of its own magnitude, anchored to the replay's actions and to μ_dep:
    L_π = mean( α·log π(ã|s) − (min Q − λQc)(s, ã)/ν + w₀‖ã − a‖² + (w − w₀)‖ã − tanh μ_dep(s)‖² ),
    ν = mean|min Q − λQc|, where w doubles after each failed test and halves after each pass (w ≥ w₀);
  - half of each minibatch from the offline data, 200 updates of 256 per iteration, bounded aPID adaptation.
"""
import copy
import csv
import math
import os
import random
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional, Tuple

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
    exp_name: str = "sac_lag_apid"  # name of this experiment (part of the run name)
    env_id: str = "OfflineCarRun-v0"  # DSRL task: Offline{Ball,Car,Drone,Ant}{Run,Circle}-v0
    seed: int = 0  # seed of the experiment
    torch_deterministic: bool = True  # set `torch.backends.cudnn.deterministic`
    cuda: bool = True  # use CUDA when it is available
    track: bool = False  # log to Weights and Biases (needs wandb and a login)
    wandb_project_name: str = "o2o-safe-rl"  # wandb project name
    init: str = "scratch"  # `scratch`, or a cpq.py / bear_lag.py / vpa.py checkpoint whose networks start the run
    dataset_path: Optional[str] = None  # DSRL-format dataset, read only when --offline-ratio > 0
    save_path: Optional[str] = None  # final checkpoint (default runs/<run-name>/sac_lag.pt)
    cost_limit: float = 20.0  # episode cost limit d
    online_episodes: Optional[int] = None  # online episodes (default: ENV_DEFAULTS)
    eval_every: int = 100  # evaluate every this many online episodes
    eval_episodes: int = 10  # deterministic evaluation episodes, in a separate env
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # target-network Polyak rate
    reward_scale: float = 0.1  # rewards are multiplied by this in training (returns are reported unscaled)
    hidden_sizes: Tuple[int, ...] = (256, 256)  # hidden layers of actor and critics (a checkpoint must match)
    # SAC-Lag
    episodes_per_iter: int = 5  # stochastic episodes collected per iteration
    updates_per_iter: int = 200  # gradient steps per iteration (paper: 20; 0: the starting policy never changes)
    batch_size: int = 256  # minibatch size (paper: 64)
    actor_lr: Optional[float] = None  # actor learning rate (default: ENV_DEFAULTS)
    critic_lr: Optional[float] = None  # reward critic learning rate (default: ENV_DEFAULTS)
    cost_critic_lr: Optional[float] = None  # cost critic learning rate (default: ENV_DEFAULTS)
    alpha: Optional[float] = None  # entropy coefficient α (default: ENV_DEFAULTS; the initial value with --autotune)
    autotune: bool = False  # learn α towards the target entropy −|A|
    alpha_lr: float = 3e-4  # learning rate of log α with --autotune
    # λ controller (aPID: Marvel §3.2)
    lagrangian: Literal["apid", "pid", "dual", "fixed"] = "apid"  # adaptive PID, fixed-gain PID, dual ascent, constant
    lagrangian_init: float = 0.0  # initial λ (the value used throughout with `fixed`)
    kp: float = 0.05  # K_p⁰, proportional gain (λ per unit of episode cost over the target)
    ki: float = 0.01  # K_i⁰, integral gain
    kd: float = 0.01  # K_d⁰, derivative gain
    pid_delay: int = 10  # length of the history H of the lagged derivative and the gain adaptation
    pid_ema: float = 0.9  # ρ, EMA factor of the proportional term and the smoothed cost
    adapt_rates: Tuple[float, float, float] = (0.05, 0.05, 0.05)  # a_p, a_i, a_d: aPID's gain adaptation rates
    dual_lr: float = 0.01  # step size of `dual`: λ ← max(0, λ + lr·(J − target))
    # safe finetuning (not in the paper; README "Differences")
    paper: bool = False  # the published online phase: every flag below at its PAPER_ONLINE value
    deploy: Literal["learner", "gated"] = "gated"  # who runs the episodes: the learner (paper), or the gate's policy
    cost_margin: float = 0.5  # λ's target and the gate's pass cost start at (1 − margin)·d (paper: 0, i.e. d)
    rollback_tightening: float = 0.5  # gated: each rollback of a deployed learner multiplies that target by this
    gate_max_wait: int = 16  # gated: after each failed test the wait to the next doubles (1, 2, 4, … iterations)
    cost_signal: Literal["episodes", "tests"] = "tests"  # λ sees the episodes' mean cost (paper) or the latest test's
    bc_weight: float = 0.4  # w₀ of the anchored actor loss (0: the paper's SAC-Lag actor)
    offline_ratio: float = 0.5  # fraction of each minibatch from the offline dataset (paper: 0)
    bounded_gain_adaptation: bool = True  # aPID adapts gains by (c̃ − d)/max(c̃, d), at most a factor 1 ± a per update
    learner_eval: bool = False  # diagnostic: evaluate the gated learner too (its episodes are counted apart)


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
# --paper: the online phase as published (Marvel's SAC-Lag + aPID)
PAPER_ONLINE = dict(deploy="learner", cost_margin=0.0, rollback_tightening=1.0, cost_signal="episodes", bc_weight=0.0,
                    offline_ratio=0.0, bounded_gain_adaptation=False, updates_per_iter=20, batch_size=64)
# gated: the anchor weight w after a test: w·BC_GROWTH after a failed one, w/BC_GROWTH after a pass, in [w₀, BC_MAX]
BC_GROWTH, BC_MAX = 2.0, 100.0


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
CHECKPOINT_KEYS = ("algo", "reward_scale", "cost_limit", "step", "actor", "critic", "critic_target", "cost_critic",
                   "cost_critic_target")


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


def load_checkpoint(path: str, env_id: str, obs_dim: int, act_dim: int, hidden_sizes: Tuple[int, ...]) -> dict:
    """Load and check that the checkpoint belongs to this env and architecture (refuse, never drop weights)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not an {CHECKPOINT_FORMAT} checkpoint")
    found = (ckpt.get("env_id"), ckpt.get("obs_dim"), ckpt.get("act_dim"), tuple(ckpt.get("hidden_sizes") or ()))
    if found != (env_id, obs_dim, act_dim, tuple(hidden_sizes)):
        raise InputError(f"{path}: checkpoint is for (env, obs_dim, act_dim, hidden_sizes)={found}, "
                         f"this run needs {(env_id, obs_dim, act_dim, tuple(hidden_sizes))}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise InputError(f"{path}: checkpoint lacks {missing}")
    return ckpt


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


# --- λ controllers: update(J) once per iteration, J the iteration's episode cost -----------------------------
class AdaptivePIDLagrangian:
    """aPID (Marvel §3.2); with adaptive=False the fixed-gain PID Lagrangian. With e = J − target:
        I ← max(0, I + K_i·e);  p ← ρp + (1−ρ)e;  c̄ ← ρc̄ + (1−ρ)J;  D = max(0, c̄ − H[oldest])
        λ = max(0, K_p·p + I + K_d·D);  then H.append(c̄) and, with c̃ = mean(H) + 0.1, σ = std(H):
        K_p ← K_p·max(0, 1 + a_p(c̃ − d)/c̃),  K_i ← K_i·max(0, 1 + a_i(c̃ − d)/c̃),  K_d ← K_d·(1 + a_d·σ/c̃),
        each clipped to [K⁰/10, 10·K⁰]: gains grow while costs run above the target and shrink below it.
    `lam_init` starts the integral (so λ starts there); `bounded` divides the K_p, K_i adaptation by max(c̃, d)
    instead of c̃, so that one update moves a gain by a factor within [1 − a, 1 + a]."""

    def __init__(self, target: float, kp: float, ki: float, kd: float, delay: int = 10, ema: float = 0.9,
                 adapt_rates: Tuple[float, float, float] = (0.05, 0.05, 0.05), adaptive: bool = True,
                 lam_init: float = 0.0, bounded: bool = False):
        self.target, self.ema, self.adapt_rates, self.adaptive = target, ema, tuple(adapt_rates), adaptive
        self.bounded = bounded
        self.gains0 = (kp, ki, kd)
        self.kp, self.ki, self.kd = kp, ki, kd
        self.proportional = self.smoothed_cost = 0.0
        self.integral = self.lam = lam_init
        self.history = deque([0.0], maxlen=delay)

    def update(self, episode_cost: float) -> float:
        error = episode_cost - self.target
        self.integral = max(0.0, self.integral + self.ki * error)
        self.proportional = self.ema * self.proportional + (1 - self.ema) * error
        self.smoothed_cost = self.ema * self.smoothed_cost + (1 - self.ema) * episode_cost
        derivative = max(0.0, self.smoothed_cost - self.history[0])
        self.lam = max(0.0, self.kp * self.proportional + self.integral + self.kd * derivative)
        self.history.append(self.smoothed_cost)
        if self.adaptive:
            c = float(np.mean(self.history)) + 0.1
            spread = float(np.std(self.history))
            scale = max(c, self.target) if self.bounded else c
            a_p, a_i, a_d = self.adapt_rates
            gains = (self.kp * max(0.0, 1 + a_p * (c - self.target) / scale),
                     self.ki * max(0.0, 1 + a_i * (c - self.target) / scale),
                     self.kd * (1 + a_d * spread / c))
            self.kp, self.ki, self.kd = (min(max(k, k0 / 10), 10 * k0) for k, k0 in zip(gains, self.gains0))
        return self.lam

    def state_dict(self) -> dict:
        return {"kind": "apid" if self.adaptive else "pid", "lam": self.lam, "kp": self.kp, "ki": self.ki,
                "kd": self.kd, "integral": self.integral, "proportional": self.proportional,
                "smoothed_cost": self.smoothed_cost, "history": list(self.history), "bounded": self.bounded,
                "target": self.target}


class DualAscentLagrangian:
    """λ ← max(0, λ + η·(J − target)): projected gradient ascent on the Lagrangian dual."""

    def __init__(self, target: float, lr: float, lam: float = 0.0):
        self.target, self.lr, self.lam = target, lr, lam

    def update(self, episode_cost: float) -> float:
        self.lam = max(0.0, self.lam + self.lr * (episode_cost - self.target))
        return self.lam

    def state_dict(self) -> dict:
        return {"kind": "dual", "lam": self.lam, "lr": self.lr, "target": self.target}


class FixedLagrangian:
    def __init__(self, lam: float):
        self.lam, self.target = lam, None

    def update(self, episode_cost: float) -> float:
        return self.lam

    def state_dict(self) -> dict:
        return {"kind": "fixed", "lam": self.lam}


def make_lagrangian(args: Args):
    target = (1 - args.cost_margin) * args.cost_limit  # the cost λ steers to (see --cost-margin)
    if args.lagrangian in ("apid", "pid"):
        return AdaptivePIDLagrangian(target, args.kp, args.ki, args.kd, args.pid_delay, args.pid_ema,
                                     args.adapt_rates, adaptive=args.lagrangian == "apid",
                                     lam_init=args.lagrangian_init, bounded=args.bounded_gain_adaptation)
    if args.lagrangian == "dual":
        return DualAscentLagrangian(target, args.dual_lr, args.lagrangian_init)
    return FixedLagrangian(args.lagrangian_init)


# --- Safe finetuning: the deployment gate and its anchor weight ---------------------------------------------
class DeploymentGate:
    """The online episodes are run by `deployed`, the last policy that proved itself (at first the starting policy);
    the learner runs one test episode when one is due. It is deployed when that episode costs at most `pass_cost`
    (at first (1 − m)·d: one episode at the limit is weak evidence of a policy that stays under it) and returns at
    least the mean of the deployed policy's safe episodes of the same iteration. After a test over d the wait to
    the next doubles (1, 2, 4, … iterations, at most `max_wait`), so a learner that stays unsafe for K iterations
    costs about log₂(max_wait) + K/max_wait episodes over d instead of one per episode. A deployed policy whose
    episode breaks d is replaced by `fallback`, the policy deployed before it (rollback); the rollback of a learner
    this gate deployed multiplies `pass_cost` by `tightening`, since its passed test did not certify it."""

    def __init__(self, actor: nn.Module, cost_limit: float, max_wait: int, pass_cost: Optional[float] = None,
                 tightening: float = 1.0):
        self.deployed = copy.deepcopy(actor).requires_grad_(False)
        self.fallback = copy.deepcopy(self.deployed.state_dict())
        self.cost_limit, self.max_wait, self.tightening = cost_limit, max_wait, tightening
        self.pass_cost = cost_limit if pass_cost is None else pass_cost
        self.wait = self.countdown = 1
        self.tests = self.deployments = self.rollbacks = 0
        self.learner_deployed = False  # whether `deployed` came from a passed test (not the start, not a fallback)

    def test_due(self) -> bool:
        self.countdown -= 1
        return self.countdown <= 0

    def update(self, learner: nn.Module, deployed_returns: np.ndarray, deployed_costs: np.ndarray,
               test_return: Optional[float] = None, test_cost: Optional[float] = None) -> None:
        """After an iteration: roll back if a deployed episode broke the limit, then judge the learner's test."""
        safe = deployed_costs <= self.cost_limit
        if not safe.all():
            self.rollbacks += 1
            self.deployed.load_state_dict(self.fallback)
            if self.learner_deployed:
                self.pass_cost *= self.tightening
                self.learner_deployed = False
        if test_cost is None:
            return
        self.tests += 1
        if test_cost > self.cost_limit:
            self.wait = self.countdown = min(2 * self.wait, self.max_wait)
            return
        self.wait = self.countdown = 1  # within the limit: no violation, no back-off
        # returns bought with violations set no bar: only the deployed policy's safe episodes are compared
        as_good = not safe.any() or test_return >= float(np.mean(deployed_returns[safe]))
        if test_cost <= self.pass_cost and as_good:
            self.fallback = copy.deepcopy(self.deployed.state_dict())  # (after a rollback: the policy before it)
            self.deployed.load_state_dict(learner.state_dict())
            self.deployments, self.learner_deployed = self.deployments + 1, True

    def state_dict(self) -> dict:
        return {"wait": self.wait, "countdown": self.countdown, "tests": self.tests, "deployments": self.deployments,
                "rollbacks": self.rollbacks, "pass_cost": self.pass_cost, "learner_deployed": self.learner_deployed}


def next_anchor_weight(weight: float, test_cost: float, target: float, base: float) -> float:
    """The anchor weight w after a learner test: w·BC_GROWTH if the test cost more than λ's `target`, else
    w/BC_GROWTH, within [base = w₀, BC_MAX]: the learner is held closer to the deployed policy while its tests
    fail and let go as they pass."""
    if test_cost > target:
        return min(weight * BC_GROWTH, BC_MAX)
    return max(weight / BC_GROWTH, base)


# --- Online data: episodes side by side (one batched actor call per step), a device-resident ring buffer ----
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


# --- SAC-Lagrangian -----------------------------------------------------------------------------------------
class SACLag(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        self.args = args
        self.actor = Actor(obs_dim, act_dim, args.hidden_sizes)
        self.critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.cost_critic_target.load_state_dict(self.cost_critic.state_dict())
        self.log_alpha = nn.Parameter(torch.tensor(math.log(args.alpha)), requires_grad=args.autotune)
        self.target_entropy = -float(act_dim)
        self.anchor_weight = args.bc_weight  # w: w₀ on the replay's actions, w − w₀ on the deployed policy's
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr)
        # both critics in one optimizer (two lrs): their losses are independent, so one backward serves both
        self.critics_opt = torch.optim.Adam([{"params": self.critic.parameters(), "lr": args.critic_lr},
                                             {"params": self.cost_critic.parameters(), "lr": args.cost_critic_lr}])
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.alpha_lr) if args.autotune else None

    def load(self, ckpt: dict) -> None:
        """Networks from a checkpoint, strictly; optimizer state is not loaded (it would carry offline lrs)."""
        for name in ("actor", "critic", "critic_target", "cost_critic", "cost_critic_target"):
            try:
                getattr(self, name).load_state_dict(ckpt[name])
            except (KeyError, RuntimeError) as e:
                raise InputError(f"checkpoint '{name}' does not fit this architecture ({str(e).splitlines()[0]})")

    def critic_targets(self, reward, cost, next_obs, term):
        """y = r + γ(1−term)(min Q'(s',a') − α log π(a'|s')),  y_c = c + γ(1−term)·Qc'(s',a'),  a' ~ π(s')."""
        with torch.no_grad():
            next_act, next_log_prob = self.actor(next_obs)
            soft_value = self.critic_target(next_obs, next_act).min(0).values - self.log_alpha.exp() * next_log_prob
            y = reward + self.args.gamma * (1 - term) * soft_value
            y_c = cost + self.args.gamma * (1 - term) * self.cost_critic_target(next_obs, next_act)[0]
        return y, y_c

    def actor_loss(self, obs, act, lam: float, anchor: Optional[nn.Module] = None):
        """The paper's L_π = mean(α log π(ã|s) − min Q(s,ã) + λ Qc(s,ã)) with the online critics when w₀ = 0; else
        L_π = mean(α log π(ã|s) − (min Q − λQc)(s,ã)/ν + w₀‖ã − a‖² [+ (w − w₀)‖ã − tanh μ_anchor(s)‖²]),
        ν = mean|min Q − λQc| (no gradient through ν), a the minibatch's actions, the bracket given an `anchor`."""
        new_act, log_prob = self.actor(obs)
        q = self.critic(obs, new_act).min(0).values
        qc = self.cost_critic(obs, new_act)[0]
        if self.args.bc_weight == 0:
            return (self.log_alpha.exp().detach() * log_prob - q + lam * qc).mean(), log_prob, qc
        # the value term in units of its own mean magnitude, so w means the same for every task and reward scale
        value = q - lam * qc
        value = value / value.abs().mean().detach().clamp_min(1e-6)
        if anchor is None:
            bc = self.anchor_weight * (new_act - act).pow(2).sum(-1)
        else:
            with torch.no_grad():
                anchor_act = anchor(obs, deterministic=True)[0]
            w0 = self.args.bc_weight
            bc = w0 * (new_act - act).pow(2).sum(-1) + (self.anchor_weight - w0) * (new_act - anchor_act).pow(2).sum(-1)
        return (self.log_alpha.exp().detach() * log_prob - value + bc).mean(), log_prob, qc

    def update(self, obs, act, reward, cost, next_obs, term, lam: float, anchor: Optional[nn.Module] = None) -> dict:
        y, y_c = self.critic_targets(reward, cost, next_obs, term)
        critic_loss = F.mse_loss(self.critic(obs, act), y.expand(2, -1), reduction="none").mean(1).sum()
        cost_critic_loss = F.mse_loss(self.cost_critic(obs, act)[0], y_c)
        self.critics_opt.zero_grad(set_to_none=True)
        (critic_loss + cost_critic_loss).backward()
        self.critics_opt.step()

        self.critic.requires_grad_(False)  # the actor step needs gradients w.r.t. actions only
        self.cost_critic.requires_grad_(False)
        actor_loss, log_prob, qc = self.actor_loss(obs, act, lam, anchor)
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.critic.requires_grad_(True)
        self.cost_critic.requires_grad_(True)

        if self.alpha_opt is not None:  # α ← minimise −α(log π + H̄)
            alpha_loss = -(self.log_alpha.exp() * (log_prob.detach() + self.target_entropy)).mean()
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_opt.step()
        soft_update(self.critic_target, self.critic, self.args.tau)
        soft_update(self.cost_critic_target, self.cost_critic, self.args.tau)
        return {"losses/critic": critic_loss.detach(), "losses/cost_critic": cost_critic_loss.detach(),
                "losses/actor": actor_loss.detach(), "losses/qc_pi": qc.detach().mean(),
                "losses/alpha": self.log_alpha.detach().exp(), "losses/entropy": -log_prob.detach().mean()}

    def checkpoint(self, env_id: str, obs_dim: int, act_dim: int, step: int, algo: str, lagrangian) -> dict:
        args = self.args
        return {"algo": algo, "env_id": env_id, "obs_dim": obs_dim, "act_dim": act_dim,
                "hidden_sizes": list(args.hidden_sizes), "reward_scale": args.reward_scale,
                "cost_limit": args.cost_limit, "step": step,
                "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "cost_critic": self.cost_critic.state_dict(),
                "cost_critic_target": self.cost_critic_target.state_dict(), "log_alpha": self.log_alpha.detach(),
                "optimizers": {"actor": self.actor_opt.state_dict(), "critics": self.critics_opt.state_dict()},
                "lagrange": lagrangian.state_dict(),
                "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()}}


def check_online_args(args) -> None:
    """The online phase's flags (sac_lag_apid.py and stage 3 of marvel_full.py), per-env defaults filled in."""
    counts = ("online_episodes", "episodes_per_iter", "batch_size", "eval_every", "pid_delay")
    rates = ("actor_lr", "critic_lr", "cost_critic_lr", "alpha", "alpha_lr", "dual_lr", "reward_scale")
    for flag, holds, must in [*((f, getattr(args, f) >= 1, ">= 1") for f in counts),
                              *((f, getattr(args, f) > 0, "> 0") for f in rates),
                              *((f, getattr(args, f) >= 0, ">= 0") for f in ("bc_weight", "lagrangian_init", "kp",
                                                                            "ki", "kd")),
                              ("updates_per_iter", args.updates_per_iter >= 0, ">= 0"),
                              ("offline_ratio", 0 <= args.offline_ratio < 1, "in [0, 1)"),
                              ("cost_margin", 0 <= args.cost_margin < 1, "in [0, 1)"),
                              ("rollback_tightening", 0 < args.rollback_tightening <= 1, "in (0, 1]"),
                              ("pid_ema", 0 <= args.pid_ema < 1, "in [0, 1)"),
                              ("adapt_rates", min(args.adapt_rates) >= 0, "three rates >= 0")]:
        if not holds:
            refuse(flag, getattr(args, flag), must)
    if args.cost_signal == "tests" and args.deploy != "gated":  # only the gate runs test episodes
        raise InputError(f"--deploy {args.deploy}: --cost-signal tests needs --deploy gated; add --cost-signal "
                         f"episodes, or use --paper for the whole published phase")


def online_defaults(args):
    """args with --paper applied and the per-env defaults (ENV_DEFAULTS) in the fields left at None."""
    if args.paper:
        args = replace(args, **PAPER_ONLINE)
    if args.env_id not in ENV_DEFAULTS:
        raise InputError(f"--env-id {args.env_id}: no online defaults; choose one of {sorted(ENV_DEFAULTS)}")
    return replace(args, **{k: v for k, v in ENV_DEFAULTS[args.env_id].items() if getattr(args, k) is None})


# the progress CSV: one row per iteration, and one per evaluation (learner_*: the learner's, with learner_eval)
PROGRESS_FIELDS = ("episodes", "env_steps", "return", "cost", "lambda", "kp", "ki", "kd", "violations",
                   "cumulative_cost", "eval_return", "eval_cost", "eval_normalized_return", "eval_normalized_cost",
                   "deployments", "learner_eval_return", "learner_eval_cost", "learner_eval_violations")


class OnlineStage:
    """The online phase as state and a loop body, shared verbatim by sac_lag_apid.py's main and marvel_full.py's
    stage 3: the learner, the λ controller, the gate, the replay buffer and the progress CSV. `iteration()` collects
    episodes, updates λ once and takes the SAC-Lag steps; `finish()` evaluates and saves the policy.
    Accounting: `violations` counts every online episode over d, the learner's test episodes included; with
    `learner_eval` the learner's evaluation episodes (a diagnostic: a policy that is not deployed, run in the real
    env) are counted apart in `learner_eval_violations` of `learner_eval_episodes`."""

    def __init__(self, args, agent: SACLag, envs: list, eval_env: gym.Env, offline: Optional[dict],
                 writer: SummaryWriter, csv_path: str, gate_max_wait: int, learner_eval: bool, device: torch.device):
        self.args, self.agent, self.envs, self.eval_env, self.offline = args, agent, envs, eval_env, offline
        self.writer, self.csv_path, self.learner_eval, self.device = writer, csv_path, learner_eval, device
        self.obs_dim, self.act_dim = eval_env.observation_space.shape[0], eval_env.action_space.shape[0]
        self.lagrangian = make_lagrangian(args)
        self.replay = ReplayBuffer(args.online_episodes * eval_env.spec.max_episode_steps, self.obs_dim,
                                   self.act_dim, device)
        self.generator = torch.Generator(device=device).manual_seed(args.seed)
        self.num_offline = int(round(args.offline_ratio * args.batch_size)) if offline is not None else 0
        self.csv_file = open(csv_path, "w", newline="")
        self.csv = csv.DictWriter(self.csv_file, PROGRESS_FIELDS)
        self.csv.writeheader()
        # gated deployment: `gate.deployed` runs the episodes and anchors the actor, `agent.actor` learns
        self.gate = DeploymentGate(agent.actor, args.cost_limit, gate_max_wait, (1 - args.cost_margin) *
                                   args.cost_limit, args.rollback_tightening) if args.deploy == "gated" else None
        self.deployed = self.gate.deployed if self.gate else agent.actor
        self.env_steps = self.episodes = self.violations = self.evaluated_at = 0
        self.cumulative_cost = self.held_test_cost = 0.0
        self.learner_eval_episodes = self.learner_eval_violations = 0
        self.first_eval = self.last_eval = self.evaluate()
        self.lam = self.lagrangian.lam  # aPID/PID start at 0 (the offline λ is on another scale)

    def evaluate(self) -> dict:
        """The deployed policy (and, with learner_eval, the gated learner) in the evaluation env."""
        args, gate = self.args, self.gate
        result = evaluate(self.deployed, self.eval_env, args.eval_episodes, args.cost_limit, self.device)
        row = {"episodes": self.episodes, "env_steps": self.env_steps, "deployments": gate.deployments if gate else "",
               **{f"eval_{k}": f"{v:.4f}" for k, v in result.items()}}
        if gate and self.learner_eval:  # one episode at a time, to count the learner's violations
            learner = [evaluate(self.agent.actor, self.eval_env, 1, args.cost_limit, self.device)
                       for _ in range(args.eval_episodes)]
            self.learner_eval_episodes += len(learner)
            self.learner_eval_violations += sum(episode["cost"] > args.cost_limit for episode in learner)
            row.update(learner_eval_return=f"{np.mean([e['return'] for e in learner]):.4f}",
                       learner_eval_cost=f"{np.mean([e['cost'] for e in learner]):.4f}",
                       learner_eval_violations=self.learner_eval_violations)
            for key in ("return", "cost"):
                self.writer.add_scalar(f"eval/learner_{key}", np.mean([e[key] for e in learner]), self.env_steps)
        for k, v in result.items():
            self.writer.add_scalar(f"eval/{k}", v, self.env_steps)
        self.csv.writerow(row)
        self.csv_file.flush()
        self.evaluated_at = self.episodes
        return result

    def minibatch(self) -> list:
        """`batch_size` transitions: from the online replay, the last `num_offline` of them from the dataset."""
        sample = self.replay.sample(self.args.batch_size - self.num_offline, self.generator)
        if self.num_offline > 0:
            idx = torch.randint(len(self.offline["rewards"]), (self.num_offline,), device=self.device,
                                generator=self.generator)
            sample = [torch.cat([s, self.offline[k][idx]]) for s, k in zip(sample, REPLAY_KEYS)]
        return sample

    def iteration(self) -> dict:
        args, agent, gate = self.args, self.agent, self.gate
        n = min(args.episodes_per_iter, args.online_episodes - self.episodes)
        testing = gate is not None and gate.test_due()
        parts = []  # the learner's test episode (in the first env) comes first, then the deployed policy's
        if testing:
            parts.append(collect_episodes(self.envs[:1], agent.actor, self.device))
        if n > testing:
            parts.append(collect_episodes(self.envs[int(testing):n], self.deployed, self.device))
        batch = {k: np.concatenate([part[0][k] for part in parts]) for k in REPLAY_KEYS}
        returns, costs = (np.concatenate([part[i] for part in parts]) for i in (1, 2))
        test_return, test_cost = (float(returns[0]), float(costs[0])) if testing else (None, None)
        if gate:
            gate.update(agent.actor, returns[int(testing):], costs[int(testing):], test_return, test_cost)
            if testing:
                agent.anchor_weight = next_anchor_weight(agent.anchor_weight, test_cost, gate.pass_cost,
                                                         args.bc_weight)
            self.lagrangian.target = gate.pass_cost  # λ aims where the gate deploys, lower after each rollback
        self.replay.add({**batch, "rewards": batch["rewards"] * args.reward_scale})
        self.env_steps += len(batch["rewards"])
        self.episodes += n
        self.violations += int((costs > args.cost_limit).sum())
        self.cumulative_cost += float(costs.sum())
        # one controller update per iteration, on the episodes' mean cost (the paper) or on the learner's latest
        # test (the deployed policy's costs say nothing about the learner's), held until the next test
        if args.cost_signal == "episodes":
            self.lam = self.lagrangian.update(float(costs.mean()))
        else:
            self.held_test_cost = test_cost if testing else self.held_test_cost
            self.lam = self.lagrangian.update(self.held_test_cost)

        info = {}
        for _ in range(args.updates_per_iter):
            info = agent.update(*self.minibatch(), lam=self.lam, anchor=self.deployed if gate else None)
        gains = {k: getattr(self.lagrangian, k, float("nan")) for k in ("kp", "ki", "kd")}
        scalars = {"charts/episodic_return": returns.mean(), "charts/episodic_cost": costs.mean(),
                   "lagrange/lambda": self.lam, **{f"lagrange/{k}": g for k, g in gains.items()},
                   "charts/bc_weight": agent.anchor_weight, "charts/online_violations": self.violations,
                   "charts/cumulative_cost": self.cumulative_cost}
        for tag, value in [*zip(info, torch.stack(list(info.values())).tolist() if info else []), *scalars.items()]:
            self.writer.add_scalar(tag, value, self.env_steps)  # one host sync per iteration
        self.csv.writerow({"episodes": self.episodes, "env_steps": self.env_steps, "return": f"{returns.mean():.4f}",
                           "cost": f"{costs.mean():.4f}", "lambda": f"{self.lam:.6f}",
                           **{k: f"{g:.6g}" for k, g in gains.items()}, "violations": self.violations,
                           "cumulative_cost": f"{self.cumulative_cost:.1f}",
                           "deployments": gate.deployments if gate else ""})
        self.csv_file.flush()  # a stopped run keeps its progress
        if self.episodes // args.eval_every > (self.episodes - n) // args.eval_every:
            self.last_eval = self.evaluate()
        return {"ret": f"{returns.mean():.0f}", "cost": f"{costs.mean():.1f}", "lam": f"{self.lam:.3f}"}

    def finish(self, save_path: str, algo: str) -> dict:
        """Evaluate the final policy (also after an interrupt) and save it: the checkpoint's actor is the deployed
        policy, the learner is kept beside it. An unfinished run goes to *_interrupted.pt."""
        interrupted = self.episodes < self.args.online_episodes
        save_path = save_path.removesuffix(".pt") + "_interrupted.pt" if interrupted else save_path
        if self.evaluated_at != self.episodes:
            self.last_eval = self.evaluate()
        self.csv_file.close()
        ckpt = self.agent.checkpoint(self.args.env_id, self.obs_dim, self.act_dim, self.env_steps, algo,
                                     self.lagrangian)
        if self.gate:
            ckpt = {**ckpt, "actor": self.deployed.state_dict(), "learner_actor": self.agent.actor.state_dict(),
                    "gate": self.gate.state_dict()}
        save_checkpoint(save_path, {**ckpt, "eval": self.last_eval})
        return {"start": self.first_eval, "final": self.last_eval, "online_violations": self.violations,
                "cumulative_cost": self.cumulative_cost, "episodes": self.episodes, "lambda": self.lam,
                "learner_eval_episodes": self.learner_eval_episodes,
                "learner_eval_violations": self.learner_eval_violations, "interrupted": interrupted,
                "checkpoint": save_path}


def main(args: Args) -> dict:
    args = online_defaults(args)
    check_common_args(args)
    check_online_args(args)
    if args.gate_max_wait < 1:
        refuse("gate_max_wait", args.gate_max_wait, ">= 1")
    random.seed(args.seed)
    np.random.seed(args.seed)  # also Bullet's reset noise
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    envs = [make_env(args.env_id, args.seed + i) for i in range(args.episodes_per_iter)]
    eval_env = make_env(args.env_id, args.seed + 10_000)
    obs_dim, act_dim = eval_env.observation_space.shape[0], eval_env.action_space.shape[0]
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    save_path = args.save_path or os.path.join("runs", run_name, "sac_lag.pt")
    run_dir = prepare_output_dir(save_path)
    agent = SACLag(obs_dim, act_dim, args).to(device)
    algo = "sac_lag"
    if args.init != "scratch":
        ckpt = load_checkpoint(args.init, args.env_id, obs_dim, act_dim, args.hidden_sizes)
        if ckpt["reward_scale"] != args.reward_scale:
            raise InputError(f"{args.init}: reward_scale {ckpt['reward_scale']} != --reward-scale {args.reward_scale}")
        agent.load(ckpt)
        algo = f"{ckpt['algo']}+sac_lag"
    offline = None
    if args.offline_ratio > 0:
        path = find_dataset(args.env_id, eval_env.unwrapped.dataset_url, args.dataset_path)
        offline = {k: torch.as_tensor(v, device=device) for k, v in load_dataset(path, obs_dim, act_dim).items()}
        offline["rewards"] = offline["rewards"] * args.reward_scale
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    start = time.time()
    online = OnlineStage(args, agent, envs, eval_env, offline, writer, save_path.removesuffix(".pt") + "_progress.csv",
                         args.gate_max_wait, args.learner_eval, device)
    progress = tqdm(range(math.ceil(args.online_episodes / args.episodes_per_iter)), desc="sac-lag")
    try:
        for _ in progress:
            progress.set_postfix(online.iteration())
            writer.add_scalar("charts/SPS", online.env_steps / (time.time() - start), online.env_steps)
    except KeyboardInterrupt:  # keep the policy so far: evaluated and saved by finish(), as *_interrupted.pt
        progress.close()
    summary = online.finish(save_path, algo)
    writer.close()
    print(f"\n{'':8}{'return':>10}{'cost':>8}{'norm ret':>10}{'norm cost':>10}")
    for name in ("start", "final"):
        r = summary[name]
        print(f"{name:8}{r['return']:>10.1f}{r['cost']:>8.1f}{r['normalized_return']:>10.3f}{r['normalized_cost']:>10.3f}")
    print(f"online: {online.episodes} episodes, {online.violations} over the limit, cumulative cost "
          f"{online.cumulative_cost:.0f}, final λ {online.lam:.4f}, wall time {time.time() - start:.0f}s")
    if online.learner_eval_episodes:
        print(f"learner evaluation (diagnostic): {online.learner_eval_episodes} episodes, "
              f"{online.learner_eval_violations} over the limit")
    if online.gate:
        print(f"gate: {online.gate.tests} tests, {online.gate.deployments} deployments, {online.gate.rollbacks} rollbacks")
    print(f"checkpoint: {summary['checkpoint']}   progress: {online.csv_path}")
    if summary["interrupted"]:
        print(f"sac_lag_apid.py: interrupted after {online.episodes} of {args.online_episodes} episodes: the policy so "
              f"far is in {summary['checkpoint']}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    try:
        if main(tyro.cli(Args))["interrupted"]:
            sys.exit(130)  # the partial run is saved, but it did not finish
    except InputError as e:
        sys.exit(f"sac_lag_apid.py: error: {e}")
