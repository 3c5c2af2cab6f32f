"""Marvel (Chen, Wei, Deng, Lin, arXiv 2412.04426): safe offline-to-online RL in one file and one command.

    python marvel_full.py --env-id OfflineCarRun-v0                            # Safe IQL → VPA → safe finetuning
    python marvel_full.py --env-id OfflineCarRun-v0 --paper                    # Marvel as published: CPQ → VPA → aPID
    python marvel_full.py --env-id OfflineCarRun-v0 --paper --no-vpa           # aPID only (+ --lagrangian dual: Warm Start)
    python marvel_full.py --env-id OfflineCarRun-v0 --paper --lagrangian dual  # VPA-only (dual-ascent λ)
    python marvel_full.py --env-id OfflineCarRun-v0 --paper --lagrangian pid   # VPA+PID (fixed gains)
    python marvel_full.py --env-id OfflineCarRun-v0 --paper --no-pretrain      # From Scratch

One loop runs the three stages, each a verbatim copy of its standalone file's definitions (tests/test_sync.py):
  1. `--offline-steps` steps of the offline learner on the DSRL dataset: Safe IQL (safe_iql.py, in-sample; the
     default, not in the paper) or CPQ (cpq.py; `--paper` or `--offline-algo cpq`); the best evaluation is kept.
  2. `--vpa-steps` Value Pre-Alignment steps (vpa.py): the actor μ is frozen and both critics are re-fitted to μ with
     entropy-regularised targets (α_vpa for Q, α_c_vpa < α_vpa for Qc) on the offline data.
  3. Online iterations of SAC-Lagrangian with λ from the adaptive PID controller (sac_lag_apid.py), by default
     behind its deployment gate and anchors (safe finetuning, not in the paper); `--paper` is the published phase.
Each stage writes its checkpoint into --save-dir as it ends (safe_iql.pt or cpq.pt, vpa.pt, sac_lag.pt), then
summary.json.
`--resume SAVE_DIR` reruns an interrupted run from its last finished stage; `--offline-checkpoint PATH` starts from
an existing offline checkpoint instead of stage 1. VPA's Spearman diagnostic needs Monte-Carlo rollouts: run vpa.py.
"""
import copy
import csv
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
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
    env_id: str = "OfflineCarRun-v0"  # DSRL task: Offline{Ball,Car,Drone,Ant}{Run,Circle}-v0
    seed: int = 0  # seed of the experiment
    cuda: bool = True  # use CUDA when it is available (dataset, replay buffer and sampling then live on the GPU)
    dataset_path: Optional[str] = None  # DSRL-format HDF5 file (default: DSRL cache, then datasets/<env-id>.hdf5)
    save_dir: Optional[str] = None  # the stage checkpoints, progress CSV, TensorBoard log, summary.json
    resume: Optional[str] = None  # the --save-dir of an interrupted run: rerun it from its last finished stage
    cost_limit: float = 20.0  # episode cost limit d of the online stage (and of CPQ unless --offline-cost-limit)
    eval_episodes: int = 10  # deterministic evaluation episodes, in a separate env
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # target-network Polyak rate
    reward_scale: float = 0.1  # rewards are multiplied by this in training (returns are reported unscaled)
    hidden_sizes: Tuple[int, ...] = (256, 256)  # hidden layers of actor and critics
    # which stages run (the paper's baselines and ablations)
    pretrain: bool = True  # stages 1 and 2; --no-pretrain: From Scratch (SAC-Lag from random networks)
    vpa: bool = True  # stage 2; --no-vpa: the offline critics go online as they are (aPID only)
    offline_checkpoint: Optional[str] = None  # skip stage 1: start from this cpq.py / bear_lag.py checkpoint
    # stage 1: offline pretraining, Safe IQL (safe_iql.py; not in the paper) or CPQ (cpq.py; the paper's)
    offline_algo: Optional[Literal["safe_iql", "cpq"]] = None  # the offline learner (default safe_iql; --paper: cpq)
    offline_steps: int = 30_000  # offline gradient steps
    offline_cost_limit: Optional[float] = None  # the d stage 1 trains and selects for (default --cost-limit)
    offline_eval_every: int = 2_500  # evaluate stage 1 every this many steps; the best evaluation goes on
    offline_actor_lr: Optional[float] = None  # stage 1 actor learning rate (default: safe_iql 3e-4, cpq 1e-4)
    offline_critic_lr: Optional[float] = None  # stage 1 critic learning rate (default: safe_iql 3e-4, cpq 1e-3)
    vae_hidden: int = 400  # VAE hidden width
    kl_weight: float = 0.5  # β_kl of the VAE loss
    num_ood_samples: int = 10  # policy actions sampled per state for CPQ's OOD penalty
    ood_quantile: float = 0.75  # an action is OOD when its VAE KL is at or above this quantile of the batch
    qc_thres_factor: float = 1.5  # qc_thres = factor · q_thres
    ood_penalty: Literal["hinge", "linear"] = "hinge"  # not in the paper: hinge α_c·relu(qc_thres − Qc); paper: linear
    actor_escape: bool = True  # not in the paper: a second CPQ actor step lowering Qc(s, ã) over q_thres
    # stage 2: VPA (vpa.py)
    vpa_steps: int = 20_000  # VPA TD steps (official schedule: 20 000 of minibatch 64)
    alpha_vpa: Optional[float] = None  # α_vpa, entropy weight in the reward target (default 2 × the env's online α)
    alpha_c_vpa: Optional[float] = None  # α_c_vpa, entropy weight in the cost target (default α_vpa / 2; < α_vpa)
    # stage 3: SAC-Lag with a λ controller (sac_lag_apid.py)
    online_episodes: Optional[int] = None  # online episodes (default: ENV_DEFAULTS)
    episodes_per_iter: int = 5  # stochastic episodes collected per iteration
    updates_per_iter: int = 200  # gradient steps per iteration (paper: 20)
    batch_size: int = 256  # online minibatch size (paper: 64)
    eval_every: int = 100  # evaluate every this many online episodes
    actor_lr: Optional[float] = None  # online actor learning rate (default: ENV_DEFAULTS)
    critic_lr: Optional[float] = None  # online and VPA reward critic learning rate (default: ENV_DEFAULTS)
    cost_critic_lr: Optional[float] = None  # online and VPA cost critic learning rate (default: ENV_DEFAULTS)
    alpha: Optional[float] = None  # online entropy coefficient α (default: ENV_DEFAULTS)
    autotune: bool = False  # learn α towards the target entropy −|A|
    alpha_lr: float = 3e-4  # learning rate of log α with --autotune
    lagrangian: Literal["apid", "pid", "dual", "fixed"] = "apid"  # adaptive PID, fixed-gain PID, dual ascent, constant
    lagrangian_init: float = 0.0  # initial λ (the value used throughout with `fixed`)
    kp: float = 0.05  # K_p⁰, proportional gain
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
    cost_signal: Literal["episodes", "tests"] = "tests"  # λ sees the episodes' mean cost (paper) or the latest test's
    bc_weight: float = 0.4  # w₀ of the anchored actor loss (0: the paper's SAC-Lag actor)
    offline_ratio: float = 0.5  # fraction of each minibatch from the offline dataset (paper: 0)
    bounded_gain_adaptation: bool = True  # aPID adapts gains by (c̃ − d)/max(c̃, d), at most a factor 1 ± a per update


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


# --- CPQ ---------------------------------------------------------------------------------------------------
def episode_q_threshold(cost_limit: float, gamma: float, horizon: int) -> float:
    """Per-step Q budget of an episode budget d spread evenly over T steps: d·(1−γ^T)/((1−γ)·T)."""
    return cost_limit * (1 - gamma ** horizon) / ((1 - gamma) * horizon)


class VAE(nn.Module):
    """State-conditional VAE of the behaviour policy (BCQ style); its encoder's KL scores how OOD an action is."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.latent_dim = 2 * act_dim
        self.encoder = mlp([obs_dim + act_dim, hidden, hidden], activate_last=True)
        self.z_mean, self.z_log_std = nn.Linear(hidden, self.latent_dim), nn.Linear(hidden, self.latent_dim)
        self.decoder = mlp([obs_dim + self.latent_dim, hidden, hidden, act_dim])

    def encode(self, obs, act):
        h = self.encoder(torch.cat([obs, act], -1))
        return self.z_mean(h), self.z_log_std(h).clamp(-4.0, 15.0)

    def decode(self, obs, z=None):
        if z is None:  # prior sample, clipped as in BCQ so decoded actions stay near the data
            z = torch.randn(*obs.shape[:-1], self.latent_dim, device=obs.device).clamp(-0.5, 0.5)
        return torch.tanh(self.decoder(torch.cat([obs, z], -1)))

    def kl(self, obs, act, mean=None, log_std=None):
        """KL(N(mean, σ²) ‖ N(0, I)) per sample, of the encoder's posterior for (s, a)."""
        mean, log_std = self.encode(obs, act) if mean is None else (mean, log_std)
        return 0.5 * (mean.pow(2) + (2 * log_std).exp() - 2 * log_std - 1).sum(-1)

    def loss(self, obs, act):
        """(reconstruction MSE, mean KL) of the ELBO."""
        mean, log_std = self.encode(obs, act)
        recon = self.decode(obs, mean + log_std.exp() * torch.randn_like(mean))
        return F.mse_loss(recon, act), self.kl(obs, act, mean, log_std).mean()


def sample_pretanh(actor: Actor, obs: torch.Tensor, num: int):
    """(tanh(u), u), each (B, num, A): `num` samples u = μ(s) + σ(s)·ε per state from the Actor's Gaussian, with
    one trunk pass per state instead of one per sample."""
    h = actor.trunk(obs)
    mu, log_std = actor.mu(h), actor.log_std(h).clamp(-20.0, 2.0)
    noise = torch.randn(len(obs), num, mu.shape[-1], device=obs.device)
    u = mu.unsqueeze(1) + log_std.exp().unsqueeze(1) * noise
    return torch.tanh(u), u


class CPQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, q_thres: float, lrs: Optional[tuple] = None):
        """`lrs`: the (actor, critics, VAE, log α_c) learning rates, default args' (marvel_full.py passes its own)."""
        super().__init__()
        actor_lr, critic_lr, vae_lr, alpha_lr = lrs or (args.actor_lr, args.critic_lr, args.vae_lr, args.alpha_lr)
        self.args, self.q_thres, self.qc_thres = args, q_thres, args.qc_thres_factor * q_thres
        self.actor = Actor(obs_dim, act_dim, args.hidden_sizes)
        self.critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.cost_critic_target.load_state_dict(self.cost_critic.state_dict())
        self.vae = VAE(obs_dim, act_dim, args.vae_hidden)
        self.log_alpha_c = nn.Parameter(torch.zeros(()))
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=critic_lr)
        self.cost_critic_opt = torch.optim.Adam(self.cost_critic.parameters(), lr=critic_lr)
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=vae_lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha_c], lr=alpha_lr)

    def ood_samples(self, obs):
        """(states, actions) of the OOD pairs: of N policy actions per state, the top (1 − ood_quantile) by VAE KL
        (top-k equals `kl >= quantile(kl, q)` barring ties, without the host sync of a boolean mask)."""
        args = self.args
        obs_rep = obs.repeat_interleave(args.num_ood_samples, 0)  # state-major, like the samples below
        act_pi = sample_pretanh(self.actor, obs, args.num_ood_samples)[0].flatten(0, 1)
        kl = self.vae.kl(obs_rep, act_pi)
        num_ood = len(kl) - math.ceil(args.ood_quantile * (len(kl) - 1))
        ood = kl.topk(num_ood).indices
        return obs_rep[ood], act_pi[ood]

    def cost_critic_loss(self, obs, act, cost, term, next_qc):
        """L_c = MSE(Qc(s,a), c + γ(1−term)·Qc'(s',a')) + OOD penalty; returns (loss, TD part, mean Qc(s, a_ood))."""
        args = self.args
        with torch.no_grad():
            y_c = cost + args.gamma * (1 - term) * next_qc
            obs_ood, act_ood = self.ood_samples(obs)
        # one forward for the data pairs and the OOD pairs; gradient flows into Qc through both
        qc_all = self.cost_critic(torch.cat([obs, obs_ood]), torch.cat([act, act_ood]))[0]
        qc, qc_ood = qc_all[:len(obs)], qc_all[len(obs):]
        td = F.mse_loss(qc, y_c)
        alpha_c = self.log_alpha_c.exp().detach()
        if args.ood_penalty == "hinge":
            penalty = alpha_c * F.relu(self.qc_thres - qc_ood).mean()
        else:
            penalty = -alpha_c * qc_ood.mean()
        return td + penalty, td, qc_ood.mean().detach()

    def actor_step(self, obs, escape: bool):
        """L_π = −mean(1[Qc(s,ã) ≤ q_thres]·min Q(s,ã)) [+ mean(1[Qc(s,ã) > q_thres]·Qc(s,ã)) with escape]."""
        self.critic.requires_grad_(False)  # gradients w.r.t. actions only: the critics' weights stay out of it
        self.cost_critic.requires_grad_(False)
        act_pi, _ = self.actor(obs)
        qc_pi = self.cost_critic(obs, act_pi)[0]
        safe = (qc_pi <= self.q_thres).float().detach()
        loss = -(safe * self.critic(obs, act_pi).min(0).values).mean()
        if escape:
            loss = loss + ((1 - safe) * qc_pi).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_opt.step()
        self.critic.requires_grad_(True)
        self.cost_critic.requires_grad_(True)
        return loss.detach(), safe

    def update(self, obs, act, reward, cost, next_obs, term) -> dict:
        args = self.args
        # 1. behaviour VAE
        recon, kl = self.vae.loss(obs, act)
        vae_loss = recon + args.kl_weight * kl
        self.vae_opt.zero_grad(set_to_none=True)
        vae_loss.backward()
        self.vae_opt.step()
        # 2. cost critic with the OOD penalty (gradient flows into Qc through qc_ood)
        with torch.no_grad():
            next_act, _ = self.actor(next_obs)
            next_qc = self.cost_critic_target(next_obs, next_act)[0]  # also gates the reward bootstrap in 4.
        cost_loss, cost_td, qc_ood = self.cost_critic_loss(obs, act, cost, term, next_qc)
        self.cost_critic_opt.zero_grad(set_to_none=True)
        cost_loss.backward()
        self.cost_critic_opt.step()
        # 3. dual ascent on log α_c: raise α_c while mean Qc(s, a_ood) < qc_thres
        alpha_loss = self.log_alpha_c * (qc_ood - self.qc_thres)
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        with torch.no_grad():
            self.log_alpha_c.clamp_(-5.0, 5.0)
        # 4. reward critic: bootstrap only through next actions the cost critic deems safe
        with torch.no_grad():
            safe_next = (next_qc <= self.q_thres).float()
            y = reward + args.gamma * (1 - term) * safe_next * self.critic_target(next_obs, next_act).min(0).values
        critic_loss = F.mse_loss(self.critic(obs, act), y.expand(2, -1), reduction="none").mean(1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        # 5. actor: maximise the reward value where the cost value is within budget
        actor_loss, safe = self.actor_step(obs, escape=False)
        if args.actor_escape:  # 5b. also lower Qc(s, ã) where the gate is closed (else no gradient there at all)
            self.actor_step(obs, escape=True)
        # 6. targets
        soft_update(self.critic_target, self.critic, args.tau)
        soft_update(self.cost_critic_target, self.cost_critic, args.tau)
        return {"losses/vae": vae_loss.detach(), "losses/cost_critic_td": cost_td.detach(),
                "losses/qc_ood": qc_ood, "losses/alpha_c": self.log_alpha_c.detach().exp(),
                "losses/critic": critic_loss.detach(), "losses/actor": actor_loss,
                "losses/safe_fraction": safe.mean()}

    def checkpoint(self, args: Args, env_id: str, obs_dim: int, act_dim: int, step: int) -> dict:
        return {"algo": "cpq", "env_id": env_id, "obs_dim": obs_dim, "act_dim": act_dim,
                "hidden_sizes": list(args.hidden_sizes), "reward_scale": args.reward_scale,
                "cost_limit": args.cost_limit, "step": step,
                "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "cost_critic": self.cost_critic.state_dict(),
                "cost_critic_target": self.cost_critic_target.state_dict(),
                "vae": self.vae.state_dict(), "log_alpha_c": self.log_alpha_c.detach().clone(),
                "lagrange": None, "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()}}


def is_better(result: dict, best: Optional[dict]) -> bool:
    """Threshold-aware selection: among safe evaluations (normalised cost ≤ 1) the highest return; a safe one
    beats any unsafe one; among unsafe ones the lowest cost."""
    if best is None:
        return True
    safe, best_safe = result["normalized_cost"] <= 1, best["normalized_cost"] <= 1
    if safe != best_safe:
        return safe
    return result["return"] > best["return"] if safe else result["cost"] < best["cost"]


# --- Safe IQL (safe_iql.py) -----------------------------------------------------------------------------------
def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """mean |τ − 1[u < 0]|·u² of u = target − prediction: the τ-expectile of the target (τ = 0.5: the mean)."""
    return (torch.abs(tau - (diff < 0).float()) * diff.pow(2)).mean()


def feasibility_weights(adv, adv_c, v_c, qc, q_thres: float, beta: float, max_weight: float) -> torch.Tensor:
    """FISOR's weights: reward advantage among the cost-safe actions of feasible states (Vc(s) ≤ q_thres), cost
    advantage (lower is better) in infeasible ones; each advantage in units of its batch std, exp(·) clipped."""
    feasible = (v_c <= q_thres).float()
    w_feasible = torch.exp(beta * adv / adv.std().clamp_min(1e-6)).clamp(max=max_weight) * (qc <= q_thres).float()
    w_infeasible = torch.exp(-beta * adv_c / adv_c.std().clamp_min(1e-6)).clamp(max=max_weight)
    return feasible * w_feasible + (1 - feasible) * w_infeasible


def log_prob_of(actor: Actor, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """log N(atanh a; μ(s), σ(s)) of the data's actions (a clipped to ±0.999 so atanh stays finite); the tanh
    Jacobian does not depend on the actor's weights and is left out."""
    h = actor.trunk(obs)
    mu, log_std = actor.mu(h), actor.log_std(h).clamp(-20.0, 2.0)
    u = torch.atanh(act.clamp(-0.999, 0.999))
    return (-0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class SafeIQL(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, q_thres: float, lrs: Optional[tuple] = None):
        """`lrs`: the (actor, critics and values) learning rates, default args' (marvel_full.py passes its own)."""
        super().__init__()
        self.args, self.q_thres = args, args.q_thres_factor * q_thres  # the margin: see the module docstring
        self.actor_lr, critic_lr = lrs or (args.actor_lr, args.critic_lr)
        self.actor = Actor(obs_dim, act_dim, args.hidden_sizes)
        self.critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.cost_critic_target.load_state_dict(self.cost_critic.state_dict())
        self.value = mlp([obs_dim, *args.hidden_sizes, 1])
        self.cost_value = mlp([obs_dim, *args.hidden_sizes, 1])
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.actor_lr)
        self.critic_opt = torch.optim.Adam([*self.critic.parameters(), *self.cost_critic.parameters()], lr=critic_lr)
        self.value_opt = torch.optim.Adam([*self.value.parameters(), *self.cost_value.parameters()], lr=critic_lr)

    def update(self, obs, act, reward, cost, next_obs, term, step: int) -> dict:
        args = self.args
        # 1. values: expectiles of the target critics at the data's actions
        with torch.no_grad():
            q = self.critic_target(obs, act).min(0).values
            qc = self.cost_critic_target(obs, act)[0]
        v, v_c = self.value(obs).squeeze(-1), self.cost_value(obs).squeeze(-1)
        value_loss = expectile_loss(q - v, args.expectile) + expectile_loss(qc - v_c, args.cost_expectile)
        self.value_opt.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_opt.step()
        # 2. critics: in-sample TD through the values of s'
        with torch.no_grad():
            y = reward + args.gamma * (1 - term) * self.value(next_obs).squeeze(-1)
            y_c = cost + args.gamma * (1 - term) * self.cost_value(next_obs).squeeze(-1)
        critic_loss = F.mse_loss(self.critic(obs, act), y.expand(2, -1), reduction="none").mean(1).sum()
        cost_loss = F.mse_loss(self.cost_critic(obs, act)[0], y_c)
        self.critic_opt.zero_grad(set_to_none=True)
        (critic_loss + cost_loss).backward()
        self.critic_opt.step()
        # 3. actor: feasibility-weighted likelihood of the data's actions, lr on a cosine schedule
        v, v_c = v.detach(), v_c.detach()
        w = feasibility_weights(q - v, qc - v_c, v_c, qc, self.q_thres, args.beta, args.max_weight)
        actor_loss = -(w * log_prob_of(self.actor, obs, act)).mean()
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 1) / args.total_steps))
        self.actor_opt.param_groups[0]["lr"] = self.actor_lr * cosine
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        # 4. targets
        soft_update(self.critic_target, self.critic, args.tau)
        soft_update(self.cost_critic_target, self.cost_critic, args.tau)
        return {"losses/value": value_loss.detach(), "losses/critic": critic_loss.detach(),
                "losses/cost_critic": cost_loss.detach(), "losses/actor": actor_loss.detach(),
                "losses/feasible_fraction": (v_c <= self.q_thres).float().mean(), "losses/cost_value": v_c.mean(),
                "losses/mean_weight": w.mean()}

    def checkpoint(self, args: Args, env_id: str, obs_dim: int, act_dim: int, step: int) -> dict:
        return {"algo": "safe_iql", "env_id": env_id, "obs_dim": obs_dim, "act_dim": act_dim,
                "hidden_sizes": list(args.hidden_sizes), "reward_scale": args.reward_scale,
                "cost_limit": args.cost_limit, "step": step,
                "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "cost_critic": self.cost_critic.state_dict(),
                "cost_critic_target": self.cost_critic_target.state_dict(),
                "value": self.value.state_dict(), "cost_value": self.cost_value.state_dict(),
                "lagrange": None, "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}}


# --- VPA (vpa.py) -----------------------------------------------------------------------------------------
def vpa_targets(batch: dict, actor: nn.Module, critic_target: nn.Module, cost_critic_target: nn.Module,
                gamma: float, alpha: float, alpha_c: float):
    """y = r + γ(1−term)[min Q'(s',a') − α log μ(a'|s')],  y_c = c + γ(1−term)[Qc'(s',a') − α_c log μ(a'|s')],
    one a' ~ μ(·|s') for both. `batch` holds DSRL keys (rewards already scaled); its `timeouts` are deliberately
    unused: a time-limit truncation still bootstraps. Returns (y, y_c, log μ(a'|s'))."""
    with torch.no_grad():
        next_obs, not_done = batch["next_observations"], 1.0 - batch["terminals"]
        next_act, log_mu = actor(next_obs)
        soft_q = critic_target(next_obs, next_act).min(0).values - alpha * log_mu
        soft_qc = cost_critic_target(next_obs, next_act)[0] - alpha_c * log_mu
        return batch["rewards"] + gamma * not_done * soft_q, batch["costs"] + gamma * not_done * soft_qc, log_mu


class VPA(nn.Module):
    """Frozen actor μ, trained critics Q (2-ensemble) and Qc, their Polyak targets."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: Tuple[int, ...], args: Args):
        super().__init__()
        self.args = args
        self.actor = Actor(obs_dim, act_dim, hidden_sizes).requires_grad_(False)  # μ is never trained
        self.critic = QEnsemble(obs_dim, act_dim, hidden_sizes, num_q=2)
        self.cost_critic = QEnsemble(obs_dim, act_dim, hidden_sizes, num_q=1)
        self.critic_target = QEnsemble(obs_dim, act_dim, hidden_sizes, num_q=2).requires_grad_(False)
        self.cost_critic_target = QEnsemble(obs_dim, act_dim, hidden_sizes, num_q=1).requires_grad_(False)
        # fresh Adam (not the offline lrs); one backward of the two independent losses' sum; fused: ~1.3× steps/s on CPU
        self.critics_opt = torch.optim.Adam([{"params": self.critic.parameters(), "lr": args.critic_lr},
                                             {"params": self.cost_critic.parameters(), "lr": args.cost_critic_lr}],
                                            fused=True)

    def load(self, ckpt: dict, path: str) -> None:
        """Actor, critics and targets from the checkpoint, strictly (a mismatch is refused, never dropped)."""
        for name in ("actor", "critic", "critic_target", "cost_critic", "cost_critic_target"):
            try:
                getattr(self, name).load_state_dict(ckpt[name])
            except (KeyError, RuntimeError) as e:
                raise InputError(f"{path}: '{name}' does not fit this architecture ({str(e).splitlines()[0]})")

    def update(self, batch: dict) -> dict:
        args = self.args
        y, y_c, log_mu = vpa_targets(batch, self.actor, self.critic_target, self.cost_critic_target,
                                     args.gamma, args.alpha_vpa, args.alpha_c_vpa)
        obs, act = batch["observations"], batch["actions"]
        q, qc = self.critic(obs, act), self.cost_critic(obs, act)[0]
        critic_loss = F.mse_loss(q, y.expand(2, -1), reduction="none").mean(1).sum()  # Σ_i MSE(Q_i, y)
        cost_critic_loss = F.mse_loss(qc, y_c)
        self.critics_opt.zero_grad(set_to_none=True)
        (critic_loss + cost_critic_loss).backward()
        self.critics_opt.step()
        soft_update(self.critic_target, self.critic, args.tau)
        soft_update(self.cost_critic_target, self.cost_critic, args.tau)
        return {"losses/critic": critic_loss.detach(), "losses/cost_critic": cost_critic_loss.detach(),
                "losses/q_data": q.detach().min(0).values.mean(), "losses/qc_data": qc.detach().mean(),
                "losses/entropy_mu": -log_mu.mean()}


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


# the progress CSV: one row per iteration, and one per evaluation (learner_*: the learner's, when gated)
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


def check_args(args: Args) -> None:
    check_common_args(args)
    check_online_args(args)
    counts = ("offline_steps", "offline_eval_every", "vae_hidden", "num_ood_samples", "vpa_steps")
    rates = ("qc_thres_factor", "alpha_vpa")
    for flag, holds, must in [*((f, getattr(args, f) >= 1, ">= 1") for f in counts),
                              *((f, getattr(args, f) is None or getattr(args, f) > 0, "> 0")
                                for f in ("offline_actor_lr", "offline_critic_lr")),
                              *((f, getattr(args, f) > 0, "> 0") for f in rates),
                              ("offline_cost_limit", (args.offline_cost_limit or 0) >= 0, ">= 0"),
                              ("ood_quantile", 0 <= args.ood_quantile < 1, "in [0, 1)"),
                              ("kl_weight", args.kl_weight >= 0, ">= 0"),
                              ("alpha_c_vpa", 0 <= args.alpha_c_vpa < args.alpha_vpa,
                               ">= 0 and < --alpha-vpa (the paper's condition)")]:
        if not holds:
            refuse(flag, getattr(args, flag), must)
    if args.offline_checkpoint and not args.pretrain:
        raise InputError("--offline-checkpoint and --no-pretrain contradict each other")


# the standalone files' defaults of what this file does not make a flag
OFFLINE_BATCH_SIZE, OFFLINE_LRS = {"safe_iql": 256, "cpq": 512}, {"safe_iql": (3e-4, 3e-4), "cpq": (1e-4, 1e-3)}
CPQ_VAE_LR, CPQ_ALPHA_C_LR, VPA_BATCH_SIZE, GATE_MAX_WAIT = 1e-3, 1e-4, 64, 16
SAFE_IQL = dict(expectile=0.7, cost_expectile=0.5, beta=2.0, max_weight=100.0, q_thres_factor=0.75)


def main(args: Args) -> dict:
    args = online_defaults(args)
    args = replace(args, offline_algo=args.offline_algo or ("cpq" if args.paper else "safe_iql"))
    alpha_vpa = args.alpha_vpa if args.alpha_vpa is not None else 2 * ENV_DEFAULTS[args.env_id]["alpha"]  # vpa.py's
    args = replace(args, alpha_vpa=alpha_vpa, alpha_c_vpa=alpha_vpa / 2 if args.alpha_c_vpa is None else args.alpha_c_vpa)
    check_args(args)
    if args.resume is not None and not os.path.isdir(args.resume):
        raise InputError(f"--resume {args.resume}: no such directory")
    save_dir = args.resume or args.save_dir or os.path.join("runs", f"{args.env_id}__marvel__{args.seed}__{int(time.time())}")
    paths = {stage: os.path.join(save_dir, f"{name}.pt") for stage, name in (("offline", args.offline_algo),
                                                                             ("vpa", "vpa"), ("online", "sac_lag"))}
    prepare_output_dir(paths["offline"])
    run_start = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)  # also Bullet's reset noise
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env = make_env(args.env_id, args.seed + 10_000)  # evaluation env of stages 1 and 2
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]

    def load(path: str) -> dict:
        ckpt = load_checkpoint(path, args.env_id, obs_dim, act_dim, args.hidden_sizes)
        if ckpt["reward_scale"] != args.reward_scale:
            raise InputError(f"{path}: reward_scale {ckpt['reward_scale']} != --reward-scale {args.reward_scale}")
        return ckpt

    # the starting points: a given offline checkpoint, or the stages an interrupted run (--resume) finished
    offline = load(args.offline_checkpoint) if args.offline_checkpoint else None
    aligned = None
    if args.resume is not None:
        if os.path.exists(paths["online"]):
            raise InputError(f"--resume {args.resume}: the run finished ({paths['online']}); nothing to resume")
        offline = load(paths["offline"]) if offline is None and os.path.exists(paths["offline"]) else offline
        aligned = load(paths["vpa"]) if args.vpa and os.path.exists(paths["vpa"]) else None
    run_offline = args.pretrain and offline is None and aligned is None
    run_vpa = args.pretrain and args.vpa and aligned is None
    data = None
    if run_offline or run_vpa or args.offline_ratio > 0:
        path = find_dataset(args.env_id, env.unwrapped.dataset_url, args.dataset_path)
        data = {k: torch.as_tensor(v, device=device) for k, v in load_dataset(path, obs_dim, act_dim).items()}
        data["rewards"] = data["rewards"] * args.reward_scale
        print(f"{args.env_id}: {len(data['rewards'])} transitions from {path} on {device}")
    stages = [*([args.offline_algo if run_offline else "loaded"] * args.pretrain), *(["vpa"] * (args.pretrain and args.vpa)), "online"]
    print(f"stages: {' → '.join(stages)}; checkpoints in {save_dir}/")
    writer = SummaryWriter(save_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # stage 1 trains for the offline limit (the official pipeline pretrained at 40 and finetuned at 20)
    offline_args = replace(args, cost_limit=args.offline_cost_limit if args.offline_cost_limit is not None else args.cost_limit)
    if run_offline:
        q_thres = episode_q_threshold(offline_args.cost_limit, args.gamma, env.spec.max_episode_steps)
        actor_lr, critic_lr = OFFLINE_LRS[args.offline_algo]
        lrs = tuple(lr if lr is not None else default for lr, default in
                    ((args.offline_actor_lr, actor_lr), (args.offline_critic_lr, critic_lr)))
        if args.offline_algo == "cpq":
            agent = CPQ(obs_dim, act_dim, offline_args, q_thres, lrs=(*lrs, CPQ_VAE_LR, CPQ_ALPHA_C_LR)).to(device)
        else:  # safe_iql.py's Args: its own flags at their defaults
            offline_args = SimpleNamespace(**vars(offline_args), total_steps=args.offline_steps, **SAFE_IQL)
            agent = SafeIQL(obs_dim, act_dim, offline_args, q_thres, lrs=lrs).to(device)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        best = None
    offline_steps, vpa_steps = args.offline_steps * run_offline, args.vpa_steps * run_vpa
    num_iters = math.ceil(args.online_episodes / args.episodes_per_iter)
    rows, wall, start, stage = {}, {}, time.time(), "offline" if run_offline else "vpa" if run_vpa else "online"
    progress = tqdm(range(offline_steps + vpa_steps + num_iters), desc="marvel")
    try:
        for t in progress:
            if t < offline_steps:  # ---- stage 1: one offline step
                step = t + 1
                idx = torch.randint(len(data["rewards"]), (OFFLINE_BATCH_SIZE[args.offline_algo],), device=device,
                                    generator=generator)
                batch = [data[k][idx] for k in ("observations", "actions", "rewards", "costs", "next_observations",
                                                "terminals")]
                info = agent.update(*batch) if args.offline_algo == "cpq" else agent.update(*batch, step)
                if step % 100 == 0:  # one host sync per 100 steps
                    for tag, value in zip(info, torch.stack(list(info.values())).tolist()):
                        writer.add_scalar("offline/" + tag, value, step)
                if step % args.offline_eval_every == 0 or step == offline_steps:
                    result = {**evaluate(agent.actor, env, args.eval_episodes, offline_args.cost_limit, device), "step": step}
                    for k, v in result.items():
                        writer.add_scalar(f"offline/eval/{k}", v, step)
                    progress.set_postfix(ret=f"{result['return']:.1f}", cost=f"{result['cost']:.1f}")
                    if is_better(result, best):
                        best = result
                        offline = copy.deepcopy({**agent.checkpoint(offline_args, args.env_id, obs_dim, act_dim, step),
                                                 "eval": best})
                if step == offline_steps:  # the stage ends: its best evaluation goes on
                    save_checkpoint(paths["offline"], offline)
                    wall["offline"], start = time.time() - start, time.time()
                continue
            if t == offline_steps and args.pretrain:  # between stages 1 and 2: the offline row of the results
                if "eval" not in offline:  # a loaded checkpoint without a stored evaluation
                    actor = Actor(obs_dim, act_dim, args.hidden_sizes).to(device)
                    actor.load_state_dict(offline["actor"])
                    offline["eval"] = evaluate(actor, env, args.eval_episodes, args.cost_limit, device)
                env.unwrapped.set_target_cost(args.cost_limit)  # normalised at the online limit like the other rows
                norm_ret, norm_cost = env.unwrapped.get_normalized_score(offline["eval"]["return"],
                                                                         offline["eval"]["cost"])
                rows["offline"] = {**offline["eval"], "normalized_return": float(norm_ret),
                                   "normalized_cost": float(norm_cost)}
                if run_vpa:  # ---- stage 2 starts: μ = the offline actor, frozen
                    stage = "vpa"
                    agent = VPA(obs_dim, act_dim, args.hidden_sizes, args).to(device)
                    agent.load(offline, "offline checkpoint")
                    generator = torch.Generator(device=device).manual_seed(args.seed)
            if t < offline_steps + vpa_steps:  # ---- stage 2: one VPA step
                step = t - offline_steps + 1
                idx = torch.randint(len(data["rewards"]), (VPA_BATCH_SIZE,), device=device, generator=generator)
                info = agent.update({k: v[idx] for k, v in data.items()})
                if step % 100 == 0:
                    for tag, value in zip(info, torch.stack(list(info.values())).tolist()):
                        writer.add_scalar("vpa/" + tag, value, step)
                if step == vpa_steps:  # the stage ends: the aligned critics beside the unchanged actor
                    result = evaluate(agent.actor, env, args.eval_episodes, args.cost_limit, device)
                    for k, v in result.items():
                        writer.add_scalar(f"vpa/eval/{k}", v, step)
                    aligned = {k: v for k, v in offline.items() if k not in ("format", "optimizers")}
                    aligned.update({"algo": f"{offline['algo']}+vpa", "cost_limit": args.cost_limit, "step": step,
                                    "init": {"algo": offline["algo"], "step": offline["step"],
                                             "eval": offline.get("eval")}, "lagrange": None, "args": asdict(args),
                                    "eval": {**result, "step": step},
                                    **{k: getattr(agent, k).state_dict() for k in ("critic", "critic_target",
                                                                                   "cost_critic", "cost_critic_target")}})
                    save_checkpoint(paths["vpa"], aligned)
                    wall["vpa"], start = time.time() - start, time.time()
                continue
            if t == offline_steps + vpa_steps:  # ---- stage 3 starts, set up exactly as in sac_lag_apid.py
                init = aligned if args.vpa and args.pretrain else offline if args.pretrain else None
                if aligned is not None and args.vpa:
                    rows["after VPA"] = aligned["eval"]
                # reseeded, with fresh envs: the online episodes then do not depend on which stages ran before
                np.random.seed(args.seed)
                torch.manual_seed(args.seed)
                envs = [make_env(args.env_id, args.seed + i) for i in range(args.episodes_per_iter)]
                eval_env = make_env(args.env_id, args.seed + 10_000)
                agent = SACLag(obs_dim, act_dim, args).to(device)
                if init is not None:
                    agent.load(init)
                online = OnlineStage(args, agent, envs, eval_env, data if args.offline_ratio > 0 else None, writer,
                                     paths["online"].removesuffix(".pt") + "_progress.csv", GATE_MAX_WAIT,
                                     learner_eval=False, device=device)  # the learner diagnostic: sac_lag_apid.py
                stage = "online"
            progress.set_postfix(online.iteration())  # ---- stage 3: one online iteration
    except KeyboardInterrupt:
        progress.close()
        if stage != "online":  # an unfinished stage 1 or 2 is not kept: --resume reruns it
            kept = [p for p in paths.values() if os.path.exists(p)]
            print(f"marvel_full.py: interrupted in stage {stage}; kept "
                  f"{', '.join(kept) or 'nothing'}; continue with --resume {save_dir}", file=sys.stderr)
            sys.exit(130)
    result = online.finish(paths["online"], f"{init['algo']}+sac_lag" if init is not None else "sac_lag")
    writer.close()
    rows["final"], wall["online"] = result["final"], time.time() - start
    summary = {"stages": stages, "eval": rows, "online_violations": result["online_violations"],
               "cumulative_cost": result["cumulative_cost"], "online_episodes": result["episodes"],
               "final_lambda": result["lambda"], "wall_seconds": wall,
               "wall_time_s": round(time.time() - run_start, 1), "device": str(device),
               "interrupted": result["interrupted"], "checkpoint": result["checkpoint"], "args": asdict(args)}
    with open(os.path.join(save_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n{'':12}{'return':>9}{'cost':>7}{'norm ret':>10}{'norm cost':>11}")
    for name, r in rows.items():
        print(f"{name:12}{r['return']:>9.1f}{r['cost']:>7.1f}{r['normalized_return']:>10.3f}{r['normalized_cost']:>11.3f}")
    print(f"online: {online.episodes} episodes, {online.violations} over the limit, cumulative cost "
          f"{online.cumulative_cost:.0f}, final λ {online.lam:.4f}; wall time "
          + ", ".join(f"{k} {v:.0f}s" for k, v in wall.items()))
    if summary["interrupted"]:
        print(f"marvel_full.py: interrupted in stage 3 after {online.episodes} of {args.online_episodes} episodes: "
              f"the policy so far is in {summary['checkpoint']}; --resume {save_dir} reruns stage 3", file=sys.stderr)
    return summary


if __name__ == "__main__":
    try:
        if main(tyro.cli(Args))["interrupted"]:
            sys.exit(130)
    except InputError as e:
        sys.exit(f"marvel_full.py: error: {e}")
