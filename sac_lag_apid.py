"""SAC-Lagrangian with an adaptive PID Lagrange multiplier (aPID, Marvel §3.2): online safe RL in one file.

    python sac_lag_apid.py --env-id OfflineCarRun-v0 --init runs/.../vpa.pt      # safe finetuning (the defaults)
    python sac_lag_apid.py --env-id OfflineCarRun-v0 --init runs/.../vpa.pt --paper  # Marvel's online phase
    python sac_lag_apid.py --env-id OfflineCarRun-v0 --init runs/.../cpq.pt --paper  # Warm Start (+ --lagrangian dual)
    python sac_lag_apid.py --env-id OfflineCarRun-v0 --init scratch --paper      # From Scratch

Each iteration k: collect `episodes_per_iter` stochastic episodes, update the λ controller once, then take
`updates_per_iter` gradient steps on minibatches from the replay buffer (half of each from the offline data):
    y   = r + γ(1−term)·( min Q'(s', a') − α·log π(a'|s') ),   a' ~ π(s')
    y_c = c + γ(1−term)·Qc'(s', a')                            (no entropy in the cost target)
    L_π = mean( α·log π(ã|s) − (min Q − λQc)(s, ã)/ν + w₀‖ã − a‖² + (w − w₀)‖ã − tanh μ_dep(s)‖² ),  ã ~ π(s),
          ν = mean|min Q − λQc|
λ comes from `--lagrangian`: apid (adaptive gains), pid (fixed gains), dual (projected gradient ascent) or fixed.
Safe finetuning (the defaults; docs/algorithms.md): the episodes are run by the *deployed* policy μ_dep, the last
learner snapshot that passed a test episode (cost at most the controller's target, at first (1 − m)·d = d/2 and
halved after each rollback of a deployed learner; return at least as good); λ sees the learner's test episodes (the
latest one's cost, held until the next); and the anchor weight w, w₀ on the replay's actions a, doubles after each
failed test and halves after each pass.
`--paper` is the published phase: the learner collects, w = 0 (the SAC-Lag actor), online data only, λ from the
iteration's mean episode cost, aimed at d itself, 20 updates of 64.
"""
import copy
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Callable, Literal, Optional, Tuple

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
    # help that spans lines is one implicitly joined string: tyro keeps the line breaks of a multi-line docstring
    exp_name: str = "sac_lag_apid"
    """name of this experiment (part of the run name)"""
    env_id: str = "OfflineCarRun-v0"
    ("DSRL environment id: OfflineBallCircle-v0, OfflineBallRun-v0, OfflineCarCircle-v0, OfflineCarRun-v0, "
     "OfflineDroneCircle-v0, OfflineDroneRun-v0, OfflineAntCircle-v0, OfflineAntRun-v0 (data bundled for "
     "the Ball and Car tasks; the Drone and Ant tasks need benchmark/collect_dataset.py first)")
    seed: int = 0
    """seed of the experiment"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when it is available"""
    track: bool = False
    """log to Weights and Biases (needs wandb installed and a login)"""
    wandb_project_name: str = "o2o-safe-rl"
    """wandb project name"""
    init: str = "scratch"
    """`scratch`, or a checkpoint (cpq.py, bear_lag.py, vpa.py) whose actor and critics start the run"""
    dataset_path: Optional[str] = None
    """DSRL-format dataset, only read when --offline-ratio > 0"""
    save_path: Optional[str] = None
    """final checkpoint (default runs/<run-name>/sac_lag.pt)"""
    resume: Optional[str] = None
    ("a *_resume.pt file (written beside the checkpoint at every evaluation and on Ctrl-C: networks, optimizers, "
     "replay buffer, λ controller, gate, random states) to continue the run from")
    cost_limit: float = 20.0
    """episode cost limit d"""
    online_episodes: Optional[int] = None
    """online episodes (default per env: Ball*/Car* 500, DroneCircle 1000, others 5000)"""
    episodes_per_iter: int = 5
    """stochastic episodes collected per iteration (the λ controller sees their mean cost)"""
    updates_per_iter: int = 200
    """gradient steps per iteration (paper: 20; a standard SAC schedule is one per env step)"""
    batch_size: int = 256
    """minibatch size"""
    eval_every: int = 100
    """evaluate every this many online episodes"""
    eval_episodes: int = 10
    """deterministic evaluation episodes, in a separate env"""
    lagrangian: Literal["apid", "pid", "dual", "fixed"] = "apid"
    """λ rule: adaptive PID, PID with fixed gains, dual ascent, or a constant"""
    lagrangian_init: float = 0.0
    """initial λ (the value used throughout with `fixed`)"""
    kp: float = 0.05
    """K_p⁰, proportional gain (λ per unit of episode cost over the limit)"""
    ki: float = 0.01
    """K_i⁰, integral gain"""
    kd: float = 0.01
    """K_d⁰, derivative gain"""
    pid_delay: int = 10
    """length of the history H used by the lagged derivative and the gain adaptation"""
    pid_ema: float = 0.9
    """ρ, EMA factor of the proportional term and the smoothed cost"""
    adapt_rates: Tuple[float, float, float] = (0.05, 0.05, 0.05)
    """a_p, a_i, a_d: gain adaptation rates of aPID"""
    dual_lr: float = 0.01
    """step size of `dual`: λ ← max(0, λ + lr·(J − d))"""
    paper: bool = False
    ("the paper's online phase: sets every safe-finetuning flag below to its paper value (PAPER_ONLINE: no gate, "
     "SAC-Lag actor, online data only, λ from the episodes' costs, unbounded aPID adaptation, 20 updates of 64, "
     "λ aimed at d)")
    bounded_gain_adaptation: bool = True
    ("aPID: divide the gain adaptation by max(c̃, d) instead of c̃, so one update changes a gain by at most a factor "
     "1 ± a (the paper's c̃ sends the gains to K⁰/10 after a single iteration far under the limit)")
    cost_signal: Literal["episodes", "critic", "tests"] = "tests"
    ("what the λ controller sees once per iteration: the mean cost of its episodes (the paper), or the cost critic's "
     "estimate of the learner's episode cost, mean Qc(s, π(s))·(1−γ)T/(1−γ^T) over a minibatch, or (`tests`, with "
     "--deploy gated) the cost of the learner's latest test episode, held until the next test")
    bc_weight: float = 0.4
    ("w₀ > 0: actor loss α log π − (min Q − λQc)/ν + w₀‖ã − a‖² with ν = mean|min Q − λQc| and a the minibatch's "
     "actions (TD3+BC-style, anchored to the replay's actions; --bc-growth adds more); 0: the paper's SAC-Lag actor")
    bc_target: Literal["replay", "deployed", "both"] = "both"
    ("the anchor's target a in w‖ã − a‖²: the minibatch's actions (`replay`), the deployed policy's mean action "
     "tanh μ_dep(s) (`deployed`: a trust region round the last policy that passed a test), or `both`: --bc-weight on "
     "the replay's actions and what --bc-growth adds on the deployed policy's")
    bc_growth: float = 2.0
    ("gated: g > 1: after each learner test over the controller's target the anchor weight is multiplied by g, "
     "after each one at or under it divided by g, within [--bc-weight, --bc-weight-max] (1: a constant weight)")
    bc_weight_max: float = 100.0
    """upper bound of the anchor weight with --bc-growth"""
    deploy: Literal["learner", "gated"] = "gated"
    ("who collects the online episodes: the learner (the paper), or `gated`: the last policy that passed a test "
     "episode (cost at most (1 − margin)·d, return at least that of the deployed policy's safe episodes)")
    cost_margin: float = 0.5
    ("the λ controller steers the learner's episode cost to (1 − margin)·d rather than to the limit d itself, and the "
     "gate deploys the learner only after a test at or under that cost (a policy whose mean cost sits at the limit "
     "breaks it in about half of its episodes); 0: the paper")
    rollback_tightening: float = 0.5
    ("gated: after each rollback of a learner the gate deployed, the controller's target and the gate's pass cost, "
     "at first (1 − margin)·d, are multiplied by this (a deployed policy that broke the limit is evidence that a "
     "test at that cost does not certify the next one); 1: fixed")
    gate_passes: int = 1
    """gated: consecutive passed tests (one per iteration) before the learner is deployed"""
    gate_passes_unsafe: Optional[int] = None
    ("gated: consecutive passed tests that replace a deployed policy whose own episodes broke the limit in the same "
     "iteration (an unsafe start, or a policy being rolled back); default: --gate-passes")
    gate_max_wait: int = 16
    """gated: after each failed test the wait before the next one doubles (1, 2, 4, … iterations) up to this"""
    actor_lr: Optional[float] = None
    ("actor learning rate (default per env: BallCircle 5e-5, BallRun 1e-5, CarCircle 5e-4, CarRun 5e-5, "
     "DroneCircle 5e-6, DroneRun 2e-6, AntCircle 5e-5, AntRun 5e-5)")
    critic_lr: Optional[float] = None
    ("reward critic learning rate (default per env: BallCircle 5e-3, BallRun 5e-3, CarCircle 5e-3, CarRun 5e-3, "
     "DroneCircle 8e-4, DroneRun 8e-3, AntCircle 5e-4, AntRun 2e-3)")
    cost_critic_lr: Optional[float] = None
    ("cost critic learning rate (default per env: BallCircle 5e-3, BallRun 5e-3, CarCircle 8e-3, CarRun 8e-3, "
     "DroneCircle 2e-3, DroneRun 5e-3, AntCircle 8e-4, AntRun 5e-3)")
    alpha: Optional[float] = None
    ("entropy coefficient α (default per env: BallCircle 1e-3, BallRun 1e-3, CarCircle 1e-3, CarRun 5e-3, "
     "DroneCircle 5e-3, DroneRun 1e-3, AntCircle 5e-5, AntRun 1e-4; the initial value with --autotune)")
    autotune: bool = False
    """learn α towards the target entropy −|A|"""
    alpha_lr: float = 3e-4
    """learning rate of log α with --autotune"""
    cost_value_floor: bool = False
    ("clamp the bootstrapped cost value at 0 in the cost target, y_c = c + γ(1−term)·max(0, Qc'(s', a')): "
     "costs are ≥ 0, so is their discounted sum (off: the paper's target; see README \"Results\")")
    offline_ratio: float = 0.5
    """fraction of each minibatch drawn from the offline dataset (0: online buffer only, as in the paper)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target-network Polyak rate"""
    reward_scale: float = 0.1
    """rewards are multiplied by this in training (returns are reported unscaled)"""
    hidden_sizes: Tuple[int, ...] = (256, 256)
    """hidden layers of actor and critics (a checkpoint must match)"""


# Per-env defaults of the official Marvel configuration: (actor lr, critic lr, cost critic lr, α, online episodes).
ENV_DEFAULTS = {
    "OfflineBallCircle-v0": (5e-5, 5e-3, 5e-3, 1e-3, 500), "OfflineBallRun-v0": (1e-5, 5e-3, 5e-3, 1e-3, 500),
    "OfflineCarCircle-v0": (5e-4, 5e-3, 8e-3, 1e-3, 500), "OfflineCarRun-v0": (5e-5, 5e-3, 8e-3, 5e-3, 500),
    "OfflineDroneCircle-v0": (5e-6, 8e-4, 2e-3, 5e-3, 1000), "OfflineDroneRun-v0": (2e-6, 8e-3, 5e-3, 1e-3, 5000),
    "OfflineAntCircle-v0": (5e-5, 5e-4, 8e-4, 5e-5, 5000), "OfflineAntRun-v0": (5e-5, 2e-3, 5e-3, 1e-4, 5000),
}
# --paper: the online phase as published (Marvel's SAC-Lag + aPID); the defaults are the safe-finetuning configuration
PAPER_ONLINE = {"deploy": "learner", "bc_weight": 0.0, "offline_ratio": 0.0, "cost_signal": "episodes",
                "bounded_gain_adaptation": False, "updates_per_iter": 20, "batch_size": 64,
                "cost_margin": 0.0, "bc_target": "replay", "bc_growth": 1.0, "rollback_tightening": 1.0}


# ----------------------------------------------------------------------------------------------------------
# Dataset: find a DSRL-format HDF5 file, then load and validate it.
DSRL_MIRROR = "https://huggingface.co/datasets/YYY-45/DSRL/resolve/main/"
# what `python benchmark/collect_dataset.py --env-id <task>` takes with its defaults on a 2-core CPU: scripted
# controllers for the Ball and Car tasks (measured); the others first train four SAC-Lag behaviour agents (estimated
# from measured rates, see datasets/README.md)
COLLECT_TIME = {"OfflineBallCircle-v0": "2 min", "OfflineBallRun-v0": "1 min", "OfflineCarCircle-v0": "6 min",
                "OfflineCarRun-v0": "3 min", "OfflineDroneCircle-v0": "35 min", "OfflineDroneRun-v0": "25 min",
                "OfflineAntCircle-v0": "1.5 h", "OfflineAntRun-v0": "25 min"}
DSRL_KEYS = ("observations", "next_observations", "actions", "rewards", "costs", "terminals", "timeouts")


class InputError(Exception):
    """Bad input (dataset, checkpoint, flag): reported as one line and a non-zero exit, no traceback."""


def download_file(url: str, dest: str, timeout: float = 30.0) -> None:
    part = dest + ".part"  # never leave a half-written file under the final name
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
        shutil.copyfileobj(response, f)
    os.replace(part, dest)


def find_dataset(env_id: str, dataset_url: str, dataset_path: Optional[str] = None,
                 download: Callable[[str, str], None] = download_file) -> str:
    """--dataset-path → DSRL cache → bundled datasets/<env-id>.hdf5 → download (DSRL, then HF mirror)."""
    if dataset_path is not None:
        if not os.path.isfile(dataset_path):
            raise InputError(f"--dataset-path {dataset_path}: no such file")
        return dataset_path
    name = os.path.basename(dataset_url)
    cache_dir = os.environ.get("DSRL_DATASET_DIR", os.path.expanduser("~/.dsrl/datasets"))
    cached = os.path.join(cache_dir, name)
    bundled = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets", f"{env_id}.hdf5")
    if os.path.isfile(cached):
        return cached
    if os.path.isfile(bundled):
        print(f"dataset: {bundled} (this project's locally collected data, not DSRL's)")
        return bundled
    tried = [cached, bundled]
    for url in (dataset_url, DSRL_MIRROR + name):
        try:
            os.makedirs(cache_dir, exist_ok=True)
            download(url, cached)
            return cached
        except Exception as e:  # any network/file failure: try the next source, report all at the end
            tried.append(f"{url} ({type(e).__name__})")
    raise InputError(f"no dataset for {env_id}; tried {', '.join(tried)}. Place the file at {cached} (or pass "
                     f"--dataset-path), or make one (about {COLLECT_TIME.get(env_id, 'an hour or more')} on a "
                     f"2-core CPU): python benchmark/collect_dataset.py --env-id {env_id}")


def load_dataset(path: str, obs_dim: int, act_dim: int) -> dict:
    """Read the seven DSRL keys and check shapes against the env, dtypes and finiteness."""
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in DSRL_KEYS if k not in f]
            if missing:
                raise InputError(f"{path}: missing keys {missing}")
            data = {k: f[k][()] for k in DSRL_KEYS}
    except OSError as e:
        raise InputError(f"{path}: not a readable HDF5 file ({e})") from None
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


# ----------------------------------------------------------------------------------------------------------
# Environment and evaluation.
def make_env(env_id: str, seed: int) -> gym.Env:
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        raise InputError(f"--env-id {env_id}: {e}") from None
    env.action_space.seed(seed)  # Bullet ignores reset(seed=...); its reset noise comes from np.random
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


# ----------------------------------------------------------------------------------------------------------
# Networks shared by every file (identical copies, so checkpoints move between files with strict loading).
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


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: a dict of tensors and plain values, loadable with torch.load(path, weights_only=True).
CHECKPOINT_FORMAT = "o2o-safe-rl/1"
CHECKPOINT_KEYS = ("algo", "reward_scale", "cost_limit", "step", "actor", "critic", "critic_target", "cost_critic",
                   "cost_critic_target")


def to_cpu(value):
    """Tensors (also inside dicts and lists) moved to the CPU, so a checkpoint written on a GPU opens anywhere."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def flag_rules(args, counts: Tuple[str, ...] = (), rates: Tuple[str, ...] = (), common: bool = True) -> list:
    """The rules every file shares, as (flag, value, holds, what it must be): the fields named in `counts` are whole
    numbers >= 1, those in `rates` > 0 (None: a per-env default, filled in later), and (`common`) where the file has
    them the cost limit is >= 0, 0 < γ < 1, 0 < τ <= 1 and every hidden layer has a unit."""
    rules = [(name, getattr(args, name), getattr(args, name) >= 1, ">= 1") for name in counts]
    rules += [(name, getattr(args, name), getattr(args, name) is None or getattr(args, name) > 0, "> 0")
              for name in rates]
    shared = (("cost_limit", lambda v: v >= 0, ">= 0 (an episode's cost is a sum of costs >= 0)"),
              ("gamma", lambda v: 0 < v < 1, "in (0, 1)"), ("tau", lambda v: 0 < v <= 1, "in (0, 1]"),
              ("hidden_sizes", lambda v: len(v) > 0 and min(v) >= 1, "one or more sizes >= 1"))
    for name, holds, must in shared if common else ():
        if hasattr(args, name):
            rules.append((name, getattr(args, name), holds(getattr(args, name)), must))
    return rules


def online_flag_rules(args) -> list:
    """The online phase's rules (sac_lag_apid.py and stage 3 of marvel_full.py), on flags with their per-env
    defaults filled in."""
    return flag_rules(args, counts=("online_episodes", "episodes_per_iter", "updates_per_iter", "batch_size",
                                    "eval_every", "eval_episodes", "gate_max_wait", "gate_passes", "pid_delay"),
                      rates=("actor_lr", "critic_lr", "cost_critic_lr", "alpha", "alpha_lr", "dual_lr",
                             "reward_scale"), common=False) + [
        ("offline_ratio", args.offline_ratio, 0 <= args.offline_ratio < 1, "in [0, 1)"),
        ("cost_margin", args.cost_margin, 0 <= args.cost_margin < 1, "in [0, 1)"),
        ("rollback_tightening", args.rollback_tightening, 0 < args.rollback_tightening <= 1, "in (0, 1]"),
        ("pid_ema", args.pid_ema, 0 <= args.pid_ema < 1, "in [0, 1)"),
        *((name, getattr(args, name), getattr(args, name) >= 0, ">= 0")
          for name in ("bc_weight", "lagrangian_init", "kp", "ki", "kd")),
        ("adapt_rates", args.adapt_rates, min(args.adapt_rates) >= 0, "three rates >= 0"),
        ("gate_passes_unsafe", args.gate_passes_unsafe,
         args.gate_passes_unsafe is None or args.gate_passes_unsafe >= 1, ">= 1"),
        ("bc_growth", args.bc_growth, args.bc_growth >= 1, ">= 1 (1: a constant anchor weight)"),
        ("bc_weight_max", args.bc_weight_max, args.bc_weight_max >= args.bc_weight, ">= --bc-weight")]


def refuse_bad_flags(rules: list) -> None:
    """`rules` as flag_rules makes them, in order: the first that does not hold is refused in one line that names its
    flag, before any work starts."""
    for name, value, holds, must in rules:
        if not holds:
            value = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            raise InputError(f"--{name.replace('_', '-')} {value}: must be {must}")


def prepare_output_dir(path: str) -> str:
    """Create the folder that will hold `path` and prove it writable before any work starts (one-line error if not).
    Returns the folder: the run's checkpoints, progress CSV and TensorBoard events all go there."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"{path}: cannot write there ({e.strerror or e})") from None
    return folder


def save_checkpoint(path: str, checkpoint: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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


# ----------------------------------------------------------------------------------------------------------
# Lagrange multiplier controllers: update(J) once per iteration with J = mean episode cost of its episodes.
class AdaptivePIDLagrangian:
    """aPID (Marvel §3.2). With adaptive=False it is the fixed-gain PID Lagrangian.
        e = J − d;  I ← max(0, I + K_i·e);  p ← ρp + (1−ρ)e;  c̄ ← ρc̄ + (1−ρ)J;  D = max(0, c̄ − H[oldest])
        λ = max(0, K_p·p + I + K_d·D);  then H.append(c̄) and, with c̃ = mean(H) + 0.1, σ = std(H):
        K_p ← K_p·max(0, 1 + a_p(c̃ − d)/c̃),  K_i ← K_i·max(0, 1 + a_i(c̃ − d)/c̃),  K_d ← K_d·(1 + a_d·σ/c̃),
        each clipped to [K⁰/10, 10·K⁰]: gains grow while costs run above the limit and shrink below it.
    `lam_init` starts the integral (so λ starts there); `bounded=True` divides the K_p, K_i adaptation by
    max(c̃, d) instead of c̃, so that one update moves a gain by a factor within [1 − a, 1 + a]."""

    def __init__(self, cost_limit: float, kp: float, ki: float, kd: float, delay: int = 10, ema: float = 0.9,
                 adapt_rates: Tuple[float, float, float] = (0.05, 0.05, 0.05), adaptive: bool = True,
                 lam_init: float = 0.0, bounded: bool = False):
        self.cost_limit, self.ema, self.adapt_rates, self.adaptive = cost_limit, ema, tuple(adapt_rates), adaptive
        self.bounded = bounded
        self.gains0 = (kp, ki, kd)
        self.kp, self.ki, self.kd = kp, ki, kd
        self.proportional = self.smoothed_cost = 0.0
        self.integral = self.lam = lam_init
        self.history = deque([0.0], maxlen=delay)

    def update(self, episode_cost: float) -> float:
        error = episode_cost - self.cost_limit
        self.integral = max(0.0, self.integral + self.ki * error)
        self.proportional = self.ema * self.proportional + (1 - self.ema) * error
        self.smoothed_cost = self.ema * self.smoothed_cost + (1 - self.ema) * episode_cost
        derivative = max(0.0, self.smoothed_cost - self.history[0])
        self.lam = max(0.0, self.kp * self.proportional + self.integral + self.kd * derivative)
        self.history.append(self.smoothed_cost)
        if self.adaptive:
            c = float(np.mean(self.history)) + 0.1
            spread = float(np.std(self.history))
            scale = max(c, self.cost_limit) if self.bounded else c
            a_p, a_i, a_d = self.adapt_rates
            gains = (self.kp * max(0.0, 1 + a_p * (c - self.cost_limit) / scale),
                     self.ki * max(0.0, 1 + a_i * (c - self.cost_limit) / scale),
                     self.kd * (1 + a_d * spread / c))
            self.kp, self.ki, self.kd = (min(max(k, k0 / 10), 10 * k0) for k, k0 in zip(gains, self.gains0))
        return self.lam

    def state_dict(self) -> dict:
        return {"kind": "apid" if self.adaptive else "pid", "lam": self.lam, "kp": self.kp, "ki": self.ki,
                "kd": self.kd, "integral": self.integral, "proportional": self.proportional,
                "smoothed_cost": self.smoothed_cost, "history": list(self.history), "bounded": self.bounded,
                "target": self.cost_limit}


class DualAscentLagrangian:
    """λ ← max(0, λ + η·(J − d)): projected gradient ascent on the Lagrangian dual."""

    def __init__(self, cost_limit: float, lr: float, lam: float = 0.0):
        self.cost_limit, self.lr, self.lam = cost_limit, lr, lam

    def update(self, episode_cost: float) -> float:
        self.lam = max(0.0, self.lam + self.lr * (episode_cost - self.cost_limit))
        return self.lam

    def state_dict(self) -> dict:
        return {"kind": "dual", "lam": self.lam, "lr": self.lr, "target": self.cost_limit}


class FixedLagrangian:
    def __init__(self, lam: float):
        self.lam = lam

    def update(self, episode_cost: float) -> float:
        return self.lam

    def state_dict(self) -> dict:
        return {"kind": "fixed", "lam": self.lam}


def next_bc_weight(weight: float, test_cost: float, target: float, args: Args) -> float:
    """--bc-growth g: the anchor weight after a learner test, w·g if the test cost more than the controller's
    `target`, else w/g, kept within [--bc-weight, --bc-weight-max]: the learner is held closer to the deployed
    policy while its tests fail and let go as they pass."""
    if test_cost > target:
        return min(weight * args.bc_growth, args.bc_weight_max)
    return max(weight / args.bc_growth, args.bc_weight)


def make_lagrangian(args: Args):
    target = (1 - args.cost_margin) * args.cost_limit  # the cost the controller steers to (see --cost-margin)
    if args.lagrangian in ("apid", "pid"):
        return AdaptivePIDLagrangian(target, args.kp, args.ki, args.kd, args.pid_delay, args.pid_ema,
                                     args.adapt_rates, adaptive=args.lagrangian == "apid",
                                     lam_init=args.lagrangian_init, bounded=args.bounded_gain_adaptation)
    if args.lagrangian == "dual":
        return DualAscentLagrangian(target, args.dual_lr, args.lagrangian_init)
    return FixedLagrangian(args.lagrangian_init)


class DeploymentGate:
    """Gated deployment (--deploy gated). The online episodes are run by `deployed`, the last policy that proved
    itself (at first the starting policy); the learner gets one test episode when one is due. It is deployed when
    that episode's cost is at most `pass_cost` (the controller's target (1 − m)·d: a single episode at the limit is
    weak evidence of a policy that stays under it) and its return at least the mean of the deployed policy's safe
    episodes of the same iteration, in `passes` consecutive tests. After a test over the limit the wait doubles
    (1, 2, 4, … iterations, at most `max_wait`), so a learner that stays unsafe for K iterations costs about
    log₂(max_wait) + K/max_wait episodes over the limit instead of one per episode. A deployed policy whose own
    episode goes over the limit is replaced by `fallback`, the policy deployed before it (rollback); this does not
    delay the learner's tests, which may replace an unsafe deployed policy in the same iteration. The rollback of a
    learner this gate deployed multiplies `pass_cost` by `tightening`: its passed test did not certify it."""

    def __init__(self, actor: nn.Module, cost_limit: float, max_wait: int, passes: int = 1,
                 pass_cost: Optional[float] = None, passes_unsafe: Optional[int] = None, tightening: float = 1.0):
        self.deployed = copy.deepcopy(actor).requires_grad_(False)
        self.fallback = copy.deepcopy(self.deployed.state_dict())
        self.cost_limit, self.max_wait, self.passes, self.tightening = cost_limit, max_wait, passes, tightening
        self.passes_unsafe = passes if passes_unsafe is None else passes_unsafe
        self.pass_cost = cost_limit if pass_cost is None else pass_cost
        self.wait = self.countdown = 1
        self.tests = self.deployments = self.rollbacks = self.streak = 0
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
            self.streak, self.wait = 0, min(2 * self.wait, self.max_wait)
            self.countdown = self.wait
            return
        self.wait = self.countdown = 1  # within the limit: no violation, no back-off
        # returns bought with violations set no bar: only the deployed policy's safe episodes are compared
        as_good = not safe.any() or test_return >= float(np.mean(deployed_returns[safe]))
        self.streak = self.streak + 1 if test_cost <= self.pass_cost and as_good else 0
        if self.streak < (self.passes if safe.all() else self.passes_unsafe):  # an unsafe policy goes sooner
            return
        self.fallback = copy.deepcopy(self.deployed.state_dict())  # (after a rollback: the policy before it)
        self.deployed.load_state_dict(learner.state_dict())
        self.streak, self.deployments, self.learner_deployed = 0, self.deployments + 1, True

    def state_dict(self) -> dict:
        return {"wait": self.wait, "countdown": self.countdown, "tests": self.tests, "streak": self.streak,
                "deployments": self.deployments, "rollbacks": self.rollbacks, "pass_cost": self.pass_cost,
                "learner_deployed": self.learner_deployed}


# ----------------------------------------------------------------------------------------------------------
# Online data: episodes run side by side (one batched actor call per step), stored in a device-resident ring buffer.
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


# ----------------------------------------------------------------------------------------------------------
# SAC-Lagrangian.
class SACLag(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, lrs: Tuple[float, float, float], alpha: float):
        super().__init__()
        self.args = args
        self.actor = Actor(obs_dim, act_dim, args.hidden_sizes)
        self.critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.cost_critic_target.load_state_dict(self.cost_critic.state_dict())
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)), requires_grad=args.autotune)
        self.target_entropy = -float(act_dim)
        self.bc_weight = args.bc_weight  # the anchor weight w, which --bc-growth moves after each test
        actor_lr, critic_lr, cost_critic_lr = lrs
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=actor_lr)
        # both critics in one optimizer (two lrs): their losses are independent, so one backward serves both
        self.critics_opt = torch.optim.Adam([{"params": self.critic.parameters(), "lr": critic_lr},
                                             {"params": self.cost_critic.parameters(), "lr": cost_critic_lr}])
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.alpha_lr) if args.autotune else None

    def load(self, ckpt: dict) -> None:
        """Networks from a checkpoint, strictly; optimizer state is not loaded (it would carry offline lrs)."""
        for name in ("actor", "critic", "critic_target", "cost_critic", "cost_critic_target"):
            try:
                getattr(self, name).load_state_dict(ckpt[name])
            except (KeyError, RuntimeError) as e:
                raise InputError(f"checkpoint '{name}' does not fit this architecture ({str(e).splitlines()[0]})")

    def critic_targets(self, reward, cost, next_obs, term):
        """y = r + γ(1−term)(min Q'(s',a') − α log π(a'|s')),  y_c = c + γ(1−term)·Qc'(s',a') (Qc' ≥ 0 with
        --cost-value-floor)."""
        with torch.no_grad():
            next_act, next_log_prob = self.actor(next_obs)
            soft_value = self.critic_target(next_obs, next_act).min(0).values - self.log_alpha.exp() * next_log_prob
            y = reward + self.args.gamma * (1 - term) * soft_value
            next_qc = self.cost_critic_target(next_obs, next_act)[0]
            if self.args.cost_value_floor:  # a negative extrapolation of Qc' is impossible: do not bootstrap it
                next_qc = next_qc.clamp_min(0.0)
            y_c = cost + self.args.gamma * (1 - term) * next_qc
        return y, y_c

    def actor_loss(self, obs, act, lam: float, anchor: Optional[nn.Module] = None):
        """L_π = mean(α log π(ã|s) − min Q(s,ã) + λ Qc(s,ã)) with the online critics, or with --bc-weight w > 0
        L_π = mean(α log π(ã|s) − (min Q − λQc)(s,ã)/ν + w‖ã − a‖²), ν = mean|min Q − λQc| (no gradient through ν),
        a the minibatch's action or, given an `anchor` policy (--bc-target deployed), its mean action tanh μ(s)."""
        new_act, log_prob = self.actor(obs)
        q = self.critic(obs, new_act).min(0).values
        qc = self.cost_critic(obs, new_act)[0]
        if self.args.bc_weight == 0:
            return (self.log_alpha.exp().detach() * log_prob - q + lam * qc).mean(), log_prob, qc
        # the value term in units of its own mean magnitude, so w means the same for every task and reward scale
        value = q - lam * qc
        value = value / value.abs().mean().detach().clamp_min(1e-6)
        bc = self.bc_weight * (new_act - act).pow(2).sum(-1)
        if anchor is not None:  # --bc-target deployed: all of w on the anchor; both: the part --bc-growth added
            with torch.no_grad():
                anchor_act = anchor(obs, deterministic=True)[0]
            w_data = 0.0 if self.args.bc_target == "deployed" else self.args.bc_weight
            bc = (w_data * (new_act - act).pow(2).sum(-1)
                  + (self.bc_weight - w_data) * (new_act - anchor_act).pow(2).sum(-1))
        return (self.log_alpha.exp().detach() * log_prob - value + bc).mean(), log_prob, qc

    @torch.no_grad()
    def cost_estimate(self, obs) -> torch.Tensor:
        """mean Qc(s, ã), ã ~ π(s): the cost critic's per-step discounted cost-to-go of the learner."""
        return self.cost_critic(obs, self.actor(obs)[0])[0].mean()

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

    def checkpoint(self, args: Args, env_id: str, obs_dim: int, act_dim: int, step: int, algo: str,
                   lagrangian) -> dict:
        return {"algo": algo, "env_id": env_id, "obs_dim": obs_dim, "act_dim": act_dim,
                "hidden_sizes": list(args.hidden_sizes), "reward_scale": args.reward_scale,
                "cost_limit": args.cost_limit, "step": step,
                "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "cost_critic": self.cost_critic.state_dict(),
                "cost_critic_target": self.cost_critic_target.state_dict(), "log_alpha": self.log_alpha.detach(),
                "optimizers": {"actor": self.actor_opt.state_dict(), "critics": self.critics_opt.state_dict()},
                "lagrange": lagrangian.state_dict(),
                "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()}}


def check_args(args: Args) -> None:
    """Every rule on this file's flags (per-env defaults filled in), before any work: one line naming the first flag
    that breaks its rule; then the combinations the gate needs."""
    refuse_bad_flags(flag_rules(args) + online_flag_rules(args))
    needs_gate = [flag for flag, on in (("--cost-signal tests", args.cost_signal == "tests"),
                                        (f"--bc-target {args.bc_target}", args.bc_target != "replay")) if on]
    if needs_gate and args.deploy != "gated":  # only the gate runs test episodes and keeps a deployed policy
        raise InputError(f"--deploy {args.deploy}: {' and '.join(needs_gate)} need{'s' * (len(needs_gate) == 1)} "
                         f"--deploy gated; add --cost-signal episodes --bc-target replay, or use --paper for the whole "
                         f"published phase")


def main(args: Args) -> dict:
    if args.paper:
        args = replace(args, **PAPER_ONLINE)
    if args.env_id not in ENV_DEFAULTS:
        raise InputError(f"--env-id {args.env_id}: no online defaults; choose one of {sorted(ENV_DEFAULTS)}")
    actor_lr, critic_lr, cost_critic_lr, alpha, episodes = ENV_DEFAULTS[args.env_id]
    lrs = tuple(default if given is None else given for given, default in
                zip((args.actor_lr, args.critic_lr, args.cost_critic_lr), (actor_lr, critic_lr, cost_critic_lr)))
    alpha = args.alpha if args.alpha is not None else alpha
    online_episodes = args.online_episodes if args.online_episodes is not None else episodes
    check_args(replace(args, actor_lr=lrs[0], critic_lr=lrs[1], cost_critic_lr=lrs[2], alpha=alpha,
                       online_episodes=online_episodes))
    random.seed(args.seed)
    np.random.seed(args.seed)  # also Bullet's reset noise
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Bullet's reset keeps the motor targets of the last action (CarRun's wheels and steering), so an episode
    # starts from where the one before it in the same env stopped: each env remembers its last action for --resume
    class RememberAction(gym.Wrapper):
        action = None

        def step(self, action):
            self.action = action
            return self.env.step(action)

    envs = [RememberAction(make_env(args.env_id, args.seed + i)) for i in range(args.episodes_per_iter)]
    eval_env = RememberAction(make_env(args.env_id, args.seed + 10_000))
    obs_dim, act_dim = eval_env.observation_space.shape[0], eval_env.action_space.shape[0]
    resume = None
    if args.resume is not None:  # refused before any work unless it continues this very run
        resume = load_checkpoint(args.resume, args.env_id, obs_dim, act_dim, args.hidden_sizes)
        if "resume" not in resume or not resume["algo"].endswith("sac_lag"):
            raise InputError(f"--resume {args.resume}: not a resumable checkpoint (sac_lag_apid.py writes "
                             f"*_resume.pt)")
        was, state = resume["args"], resume["resume"]
        changed = [f"--{k.replace('_', '-')} (was {was.get(k)})" for k, v in asdict(args).items()
                   if k not in ("exp_name", "track", "wandb_project_name", "cuda", "save_path", "resume")
                   and was.get(k) != (list(v) if isinstance(v, tuple) else v)]
        if args.save_path and os.path.abspath(args.save_path) != state["save_path"]:
            changed.append(f"--save-path (was {state['save_path']})")
        if state["device"] != device.type:  # RNG states do not carry over between devices
            changed.append(f"--cuda/--no-cuda (ran on {state['device']})")
        if changed:
            raise InputError(f"--resume {args.resume}: these flags differ from the interrupted run's: "
                             f"{', '.join(changed)}")
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    save_path = args.save_path or (resume["resume"]["save_path"] if resume else
                                   os.path.join("runs", run_name, "sac_lag.pt"))
    run_dir = prepare_output_dir(save_path)
    resume_path = save_path.removesuffix(".pt") + "_resume.pt"
    agent = SACLag(obs_dim, act_dim, args, lrs, alpha).to(device)
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
    lagrangian = make_lagrangian(args)
    replay = ReplayBuffer(online_episodes * eval_env.spec.max_episode_steps, obs_dim, act_dim, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    num_offline = int(round(args.offline_ratio * args.batch_size))

    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    csv_path = save_path.removesuffix(".pt") + "_progress.csv"
    if resume is None:
        csv = open(csv_path, "w")
        csv.write("episodes,env_steps,return,cost,lambda,kp,ki,kd,violations,cumulative_cost,"
                  "eval_return,eval_cost,eval_normalized_return,eval_normalized_cost,deployments,"
                  "learner_eval_return,learner_eval_cost\n")
    else:  # the rows up to the resumed iteration, not those written after it
        csv = open(csv_path, "r+")
        csv.truncate(resume["resume"]["csv_bytes"])
        csv.seek(0, os.SEEK_END)
    # gated deployment: `gate.deployed` runs the episodes, `agent.actor` learns
    gate = DeploymentGate(agent.actor, args.cost_limit, args.gate_max_wait, args.gate_passes,
                          pass_cost=(1 - args.cost_margin) * args.cost_limit, passes_unsafe=args.gate_passes_unsafe,
                          tightening=args.rollback_tightening) if args.deploy == "gated" else None
    deployed = gate.deployed if gate else agent.actor
    anchor = deployed if args.bc_target != "replay" else None  # the anchor's target policy (--bc-target)
    # the critic's per-step discounted cost-to-go in episode-cost units: Qc·(1−γ)T/(1−γ^T) (inverse of q_thres)
    horizon = eval_env.spec.max_episode_steps
    to_episode_cost = (1 - args.gamma) * horizon / (1 - args.gamma ** horizon)

    def log_eval(episodes_done: int, env_steps: int) -> dict:
        nonlocal evaluated_at
        evaluated_at = episodes_done
        result = evaluate(deployed, eval_env, args.eval_episodes, args.cost_limit, device)
        for k, v in result.items():
            writer.add_scalar(f"eval/{k}", v, env_steps)
        learner = ",,"
        if gate:  # the learner, evaluated the same way, for the record (it does not touch the online counts)
            learner_result = evaluate(agent.actor, eval_env, args.eval_episodes, args.cost_limit, device)
            writer.add_scalar("eval/learner_return", learner_result["return"], env_steps)
            writer.add_scalar("eval/learner_cost", learner_result["cost"], env_steps)
            learner = f"{gate.deployments},{learner_result['return']:.4f},{learner_result['cost']:.4f}"
        csv.write(f"{episodes_done},{env_steps},,,,,,,,," + ",".join(f"{result[k]:.4f}" for k in (
            "return", "cost", "normalized_return", "normalized_cost")) + f",{learner}\n")
        csv.flush()
        return result

    def minibatch() -> list:
        sample = replay.sample(args.batch_size - num_offline, generator)
        if offline is not None:
            idx = torch.randint(len(offline["rewards"]), (num_offline,), device=device, generator=generator)
            sample = [torch.cat([s, offline[k][idx]]) for s, k in zip(sample, REPLAY_KEYS)]
        return sample

    env_steps = episodes_done = violations = evaluated_at = first_iteration = 0
    cumulative_cost, held_test_cost, start = 0.0, 0.0, time.time()
    if resume is None:
        first_eval = last_eval = log_eval(0, 0)
    else:  # the state save_resume wrote, in place of the fresh one
        state = resume["resume"]
        agent.load(resume)
        agent.log_alpha.data.copy_(resume["log_alpha"])
        agent.actor_opt.load_state_dict(resume["optimizers"]["actor"])
        agent.critics_opt.load_state_dict(resume["optimizers"]["critics"])
        if agent.alpha_opt is not None:
            agent.alpha_opt.load_state_dict(state["alpha_opt"])
        for k, v in state["lagrangian"].items():  # the controller's whole state (its history as a list)
            setattr(lagrangian, k, deque(v, maxlen=args.pid_delay) if k == "history" else v)
        if gate:  # the checkpoint's actor is the deployed policy, the learner is kept beside it
            agent.actor.load_state_dict(resume["learner_actor"])
            gate.deployed.load_state_dict(resume["actor"])
            gate.fallback = state["gate_fallback"]
            for k, v in resume["gate"].items():
                setattr(gate, k, v)
        replay.data = {k: torch.cat([v.to(device), replay.data[k][len(v):]]) for k, v in state["replay"].items()}
        replay.size, replay.pos = state["replay_size"], state["replay_pos"]
        for env, action in zip([*envs, eval_env], state["env_actions"]):  # the motors where the run left them
            if action is not None:
                env.reset()
                env.step(action.numpy())
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])  # Bullet's reset noise
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["sampler"])
        if device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        (first_iteration, env_steps, episodes_done, violations, evaluated_at, cumulative_cost, held_test_cost,
         first_eval, last_eval) = (state["counters"][k] for k in (
            "iteration", "env_steps", "episodes", "violations", "evaluated_at", "cumulative_cost",
            "held_test_cost", "first_eval", "last_eval"))
        agent.bc_weight = state["counters"]["bc_weight"]
    lam = lagrangian.lam  # aPID/PID start at 0 (the offline λ is on another scale); dual/fixed at --lagrangian-init

    def save_resume(next_iteration: int) -> None:
        """Everything that carries over to `next_iteration`: --resume continues bit for bit from here."""
        csv.flush()
        numpy_state = np.random.get_state()
        rng = {"python": random.getstate(), "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
               "torch": torch.get_rng_state(), "sampler": generator.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
        ckpt = agent.checkpoint(args, args.env_id, obs_dim, act_dim, env_steps, algo, lagrangian)
        if gate:
            ckpt = {**ckpt, "actor": deployed.state_dict(), "learner_actor": agent.actor.state_dict(),
                    "gate": {k: v for k, v in vars(gate).items() if isinstance(v, (int, float))}}
        save_checkpoint(resume_path, {**ckpt, "resume": {
            "save_path": os.path.abspath(save_path), "device": device.type, "csv_bytes": csv.tell(), "rng": rng,
            "alpha_opt": agent.alpha_opt.state_dict() if agent.alpha_opt is not None else None,
            "lagrangian": {k: list(v) if isinstance(v, deque) else v for k, v in vars(lagrangian).items()},
            "gate_fallback": gate.fallback if gate else None,
            "replay": {k: v[:replay.size] for k, v in replay.data.items()}, "replay_size": replay.size,
            "replay_pos": replay.pos,
            "env_actions": [None if env.action is None else torch.as_tensor(env.action) for env in [*envs, eval_env]],
            "counters": {"iteration": next_iteration, "env_steps": env_steps, "episodes": episodes_done,
                         "violations": violations, "evaluated_at": evaluated_at, "cumulative_cost": cumulative_cost,
                         "held_test_cost": held_test_cost, "first_eval": first_eval, "last_eval": last_eval,
                         "bc_weight": agent.bc_weight}}})

    # Ctrl-C stops the run at the end of the current iteration, where its state is whole, and keeps that state for
    # --resume; the default KeyboardInterrupt would strike in the middle of an episode or an update
    stop = []
    default_sigint = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    num_iters = math.ceil(online_episodes / args.episodes_per_iter)
    progress = tqdm(range(first_iteration, num_iters), desc="sac-lag", initial=first_iteration, total=num_iters,
                    dynamic_ncols=True)
    for iteration in progress:
        n = min(args.episodes_per_iter, online_episodes - episodes_done)
        testing = gate is not None and gate.test_due()
        runners = [(envs[:1], agent.actor), (envs[1:n], deployed)] if testing else [(envs[:n], deployed)]
        parts = [collect_episodes(env_group, actor, device) for env_group, actor in runners if env_group]
        batch = {k: np.concatenate([part[0][k] for part in parts]) for k in REPLAY_KEYS}
        returns, costs = np.concatenate([part[1] for part in parts]), np.concatenate([part[2] for part in parts])
        if gate:  # the learner's test episode, when there is one, is the first
            test = (returns[0], costs[0]) if testing else ()
            gate.update(agent.actor, returns[len(test) > 0:], costs[len(test) > 0:], *test)
            if testing:
                agent.bc_weight = next_bc_weight(agent.bc_weight, float(costs[0]), gate.pass_cost, args)
            if args.lagrangian != "fixed":  # λ aims where the gate deploys, lower after each rollback
                lagrangian.cost_limit = gate.pass_cost
        replay.add({**batch, "rewards": batch["rewards"] * args.reward_scale})
        env_steps += len(batch["rewards"])
        episodes_done += n
        violations += int((costs > args.cost_limit).sum())
        cumulative_cost += float(costs.sum())
        # one controller update per iteration: on the episodes' mean cost, on the critic's estimate of the
        # learner's, or on the learner's latest test episode (the deployed policy's costs say nothing about the
        # learner's), held until the next test: after a failed test λ keeps rising while the next test waits.
        # The first iteration always has a test.
        if args.cost_signal == "episodes":
            lam = lagrangian.update(float(costs.mean()))
        elif args.cost_signal == "critic":
            lam = lagrangian.update(float(agent.cost_estimate(minibatch()[0])) * to_episode_cost)
        else:
            held_test_cost = float(costs[0]) if testing else held_test_cost
            lam = lagrangian.update(held_test_cost)

        for _ in range(args.updates_per_iter):
            info = agent.update(*minibatch(), lam=lam, anchor=anchor)
        for tag, value in zip(info, torch.stack(list(info.values())).tolist()):  # one sync per iteration
            writer.add_scalar(tag, value, env_steps)
        gains = [getattr(lagrangian, k, float("nan")) for k in ("kp", "ki", "kd")]
        scalars = {"charts/episodic_return": returns.mean(), "charts/episodic_cost": costs.mean(),
                   "lagrange/lambda": lam, "lagrange/kp": gains[0], "lagrange/ki": gains[1],
                   "lagrange/kd": gains[2], "charts/bc_weight": agent.bc_weight,
                   "charts/online_violations": violations,
                   "charts/cumulative_cost": cumulative_cost, "charts/SPS": env_steps / (time.time() - start)}
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, env_steps)
        csv.write(f"{episodes_done},{env_steps},{returns.mean():.4f},{costs.mean():.4f},{lam:.6f},"
                  + ",".join(f"{g:.6g}" for g in gains) + f",{violations},{cumulative_cost:.1f},,,,,"
                  + (f"{gate.deployments},," if gate else ",,") + "\n")
        csv.flush()  # a stopped run keeps its progress
        if episodes_done // args.eval_every > (episodes_done - n) // args.eval_every:
            last_eval = log_eval(episodes_done, env_steps)
            if episodes_done < online_episodes:
                save_resume(iteration + 1)  # a killed run loses at most --eval-every episodes
        progress.set_postfix(ret=f"{returns.mean():.0f}", cost=f"{costs.mean():.1f}", lam=f"{lam:.3f}")
        if stop and episodes_done < online_episodes:
            save_resume(iteration + 1)
            break
    progress.close()
    signal.signal(signal.SIGINT, default_sigint)
    interrupted = episodes_done < online_episodes
    if interrupted:  # keep the policy so far too (evaluated and saved below)
        save_path = save_path.removesuffix(".pt") + "_interrupted.pt"
    elif os.path.exists(resume_path):
        os.remove(resume_path)  # the run is complete: nothing left to resume
    if evaluated_at != episodes_done:  # the final evaluation is of the final actor, also after an interrupt
        last_eval = log_eval(episodes_done, env_steps)
    csv.close()
    writer.close()
    ckpt = agent.checkpoint(args, args.env_id, obs_dim, act_dim, env_steps, algo, lagrangian)
    if gate:  # the checkpoint's actor is the deployed policy (the one evaluated); the learner is kept beside it
        ckpt = {**ckpt, "actor": deployed.state_dict(), "learner_actor": agent.actor.state_dict(),
                "gate": gate.state_dict()}
    save_checkpoint(save_path, {**ckpt, "eval": last_eval})
    summary = {"start": first_eval, "final": last_eval, "online_violations": violations,
               "cumulative_cost": cumulative_cost, "episodes": episodes_done, "lambda": lam,
               "interrupted": interrupted}
    print(f"\n{'':8}{'return':>10}{'cost':>8}{'norm ret':>10}{'norm cost':>10}")
    for name in ("start", "final"):
        r = summary[name]
        print(f"{name:8}{r['return']:>10.1f}{r['cost']:>8.1f}{r['normalized_return']:>10.3f}{r['normalized_cost']:>10.3f}")
    print(f"online: {episodes_done} episodes, {violations} over the limit, cumulative cost {cumulative_cost:.0f}, "
          f"final λ {lam:.4f}, wall time {time.time() - start:.0f}s")
    if gate:
        print(f"gate: {gate.tests} tests, {gate.deployments} deployments, {gate.rollbacks} rollbacks")
    print(f"checkpoint: {save_path}   progress: {csv_path}")
    if interrupted:
        print(f"sac_lag_apid.py: interrupted after {episodes_done} of {online_episodes} episodes: the policy so far is "
              f"in {save_path}; continue with --resume {resume_path}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    try:
        if main(tyro.cli(Args))["interrupted"]:
            sys.exit(130)  # the partial run is saved, but it did not finish
    except InputError as e:
        sys.exit(f"sac_lag_apid.py: error: {e}")
    except KeyboardInterrupt:  # before the online loop's own Ctrl-C handling starts: nothing to save
        print("sac_lag_apid.py: interrupted before training started", file=sys.stderr)
        sys.exit(130)
