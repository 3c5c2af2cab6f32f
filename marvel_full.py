"""Marvel (Chen, Wei, Deng, Lin, arXiv 2412.04426): safe offline-to-online RL in one file and one command.

    python marvel_full.py --env-id OfflineCarRun-v0                            # CPQ → VPA → safe finetuning
    python marvel_full.py --env-id OfflineCarRun-v0 --paper                    # Marvel as published (VPA + aPID)
    python marvel_full.py --env-id OfflineCarRun-v0 --paper --no-vpa           # aPID only (+ --lagrangian dual: Warm Start)
    python marvel_full.py --env-id OfflineCarRun-v0 --paper --lagrangian dual  # VPA-only (dual-ascent λ)
    python marvel_full.py --env-id OfflineCarRun-v0 --paper --lagrangian pid   # VPA+PID (fixed gains)
    python marvel_full.py --env-id OfflineCarRun-v0 --paper --no-pretrain      # From Scratch

The three stages, each a verbatim copy of its standalone file's definitions (tests/test_sync.py keeps them equal):
  1. Offline pretraining, cpq.py: CPQ on the DSRL dataset; the best evaluated checkpoint is kept (cpq.py's rule).
  2. Value Pre-Alignment, vpa.py: the actor μ is frozen and both critics are re-fitted to μ with entropy-
     regularised targets (α_vpa for Q, α_c_vpa < α_vpa for Qc) on the offline data.
  3. Online finetuning, sac_lag_apid.py: SAC-Lagrangian whose λ comes from the adaptive PID controller, updated once
     per iteration. By default behind a deployment gate (the learner is deployed only after a test episode at or
     under (1 − m)·d = d/2, the cost λ steers it to, halved after each rollback, and at least as good), with a BC
     anchor to the replay's actions plus one to the deployed policy that grows while the learner's tests fail, and
     half offline data per minibatch; `--paper` is the published phase (see sac_lag_apid.py, docs/algorithms.md).
Each stage writes its checkpoint into --save-dir as soon as it ends (cpq.pt, vpa.pt, sac_lag.pt), and stage 1 also
keeps its whole state in cpq_resume.pt (cpq.py's *_resume.pt): Ctrl-C exits with status 130 and one line saying what
is saved, and `--resume SAVE_DIR` continues an interrupted stage 1 bit for bit (CPU) or restarts an interrupted stage 2
or 3 from the last finished stage's checkpoint. `--offline-checkpoint PATH` starts from an existing offline
checkpoint instead of stage 1.
The Spearman diagnostic of VPA is not run here (it needs Monte-Carlo rollouts): run vpa.py for it.
"""
import copy
import json
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
    exp_name: str = "marvel"
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
    """use CUDA when it is available (dataset, replay buffer and sampling then live on the GPU)"""
    compile: bool = False
    """torch.compile the three update functions (for GPU runs; on CPU it does not pay)"""
    track: bool = False
    """log to Weights and Biases (needs wandb installed and a login)"""
    wandb_project_name: str = "o2o-safe-rl"
    """wandb project name"""
    dataset_path: Optional[str] = None
    """DSRL-format HDF5 file; default: DSRL cache, then datasets/<env-id>.hdf5, then download"""
    save_dir: Optional[str] = None
    """directory for the per-stage checkpoints, the online progress CSV and summary.json (default runs/<run-name>)"""
    resume: Optional[str] = None
    """the --save-dir of an interrupted run to continue (stage 1 where it stopped, a later stage from its start)"""
    cost_limit: float = 20.0
    """episode cost limit d of the online stage (and of CPQ unless --offline-cost-limit is given)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes, in a separate env"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target-network Polyak rate"""
    reward_scale: float = 0.1
    """rewards are multiplied by this in training (returns are reported unscaled)"""
    hidden_sizes: Tuple[int, ...] = (256, 256)
    """hidden layers of actor and critics"""

    # --- which stages run (the paper's baselines and ablations)
    pretrain: bool = True
    """stage 1 (CPQ) and 2 (VPA); --no-pretrain is From Scratch: SAC-Lag from random networks, no offline data"""
    vpa: bool = True
    """stage 2; --no-vpa: the offline critics go online as they are (aPID only; with --lagrangian dual, Warm Start)"""
    offline_checkpoint: Optional[str] = None
    """skip stage 1 and start from this cpq.py / bear_lag.py checkpoint (e.g. one shared by several methods)"""

    # --- stage 1: CPQ (cpq.py's defaults)
    offline_steps: int = 100_000
    """CPQ gradient steps"""
    offline_cost_limit: Optional[float] = None
    ("the cost limit CPQ trains for (its q_thres) and selects its checkpoint by (default: --cost-limit; the official "
     "Marvel pipeline pretrained at 40 and finetuned at 20)")
    offline_batch_size: int = 512
    """CPQ minibatch size"""
    offline_eval_every: int = 5_000
    """evaluate CPQ every this many steps; the best evaluation (cpq.py's threshold-aware rule) goes to stage 2"""
    first_look: int = 1_000
    ("a first evaluation at this CPQ step, shown in the bar only (in its own env, with the random state put back: "
     "the run is the same with or without it); 0: none")
    offline_actor_lr: float = 1e-4
    """CPQ actor learning rate"""
    offline_critic_lr: float = 1e-3
    """CPQ reward and cost critic learning rate"""
    vae_lr: float = 1e-3
    """CPQ VAE learning rate"""
    alpha_c_lr: float = 1e-4
    """learning rate of CPQ's log α_c (OOD cost-penalty weight)"""
    vae_hidden: int = 400
    """VAE hidden width"""
    kl_weight: float = 0.5
    """β_kl of the VAE loss"""
    num_ood_samples: int = 10
    """policy actions sampled per state for CPQ's OOD penalty"""
    ood_quantile: float = 0.75
    """an action is OOD when its VAE KL is at or above this quantile of the batch"""
    qc_thres_factor: float = 1.5
    """qc_thres = factor · q_thres"""
    ood_penalty: Literal["hinge", "linear"] = "hinge"
    ("CPQ's OOD cost penalty: hinge α_c·relu(qc_thres − Qc) (bounded) or linear −α_c·Qc (the paper's; diverges on "
     "CarRun, see benchmark/results/cpq_divergence)")
    actor_escape: bool = True
    ("a second CPQ actor step per update on the paper's loss plus mean(1[Qc(s, ã) > q_thres]·Qc(s, ã)), so a fully "
     "gated actor still gets a gradient (with --no-actor-escape the actor also takes one step per update, not two)")

    # --- stage 2: VPA (vpa.py's defaults)
    vpa_steps: int = 20_000
    """VPA TD steps (official schedule: 20 000 of minibatch 64)"""
    vpa_batch_size: int = 64
    """VPA minibatch size"""
    alpha_vpa: Optional[float] = None
    """α_vpa, entropy weight in the reward target (default 2 × the env's online α; see vpa.py)"""
    alpha_c_vpa: Optional[float] = None
    """α_c_vpa, entropy weight in the cost target (default α_vpa / 2); must be < α_vpa"""

    # --- stage 3: SAC-Lag with a λ controller (sac_lag_apid.py's defaults)
    online_episodes: Optional[int] = None
    """online episodes (default per env: Ball*/Car* 500, DroneCircle 1000, others 5000)"""
    episodes_per_iter: int = 5
    """stochastic episodes collected per iteration (the λ controller sees their mean cost)"""
    updates_per_iter: int = 200
    """gradient steps per iteration"""
    batch_size: int = 256
    """online minibatch size"""
    eval_every: int = 100
    """evaluate every this many online episodes"""
    lagrangian: Literal["apid", "pid", "dual", "fixed"] = "apid"
    """λ rule: adaptive PID (Marvel), PID with fixed gains, dual ascent, or a constant"""
    lagrangian_init: float = 0.0
    """initial λ (the value used throughout with `fixed`)"""
    kp: float = 0.05
    """K_p⁰, proportional gain"""
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
    offline_ratio: float = 0.5
    """fraction of each online minibatch drawn from the offline dataset (0: online buffer only, as in the paper)"""
    actor_lr: Optional[float] = None
    ("online actor learning rate (default per env: BallCircle 5e-5, BallRun 1e-5, CarCircle 5e-4, CarRun 5e-5, "
     "DroneCircle 5e-6, DroneRun 2e-6, AntCircle 5e-5, AntRun 5e-5)")
    critic_lr: Optional[float] = None
    ("online (and VPA) reward critic learning rate (default per env: BallCircle 5e-3, BallRun 5e-3, CarCircle 5e-3, "
     "CarRun 5e-3, DroneCircle 8e-4, DroneRun 8e-3, AntCircle 5e-4, AntRun 2e-3)")
    cost_critic_lr: Optional[float] = None
    ("online (and VPA) cost critic learning rate (default per env: BallCircle 5e-3, BallRun 5e-3, CarCircle 8e-3, "
     "CarRun 8e-3, DroneCircle 2e-3, DroneRun 5e-3, AntCircle 8e-4, AntRun 5e-3)")
    alpha: Optional[float] = None
    ("online entropy coefficient α (default per env: BallCircle 1e-3, BallRun 1e-3, CarCircle 1e-3, CarRun 5e-3, "
     "DroneCircle 5e-3, DroneRun 1e-3, AntCircle 5e-5, AntRun 1e-4; the initial value with --autotune)")
    autotune: bool = False
    """learn α towards the target entropy −|A|"""
    alpha_lr: float = 3e-4
    """learning rate of log α with --autotune"""
    cost_value_floor: bool = False
    ("clamp the bootstrapped cost value at 0 in the cost target, y_c = c + γ(1−term)·max(0, Qc'(s', a')): "
     "costs are ≥ 0, so is their discounted sum (off: the paper's target; see README \"Results\")")


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
# Stage 1: CPQ (copied from cpq.py).
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

    @staticmethod
    def _kl(mean, log_std):
        """KL(N(mean, σ²) ‖ N(0, I)) per sample."""
        return 0.5 * (mean.pow(2) + (2 * log_std).exp() - 2 * log_std - 1).sum(-1)

    def kl(self, obs, act):
        return self._kl(*self.encode(obs, act))

    def loss(self, obs, act):
        """(reconstruction MSE, mean KL) of the ELBO."""
        mean, log_std = self.encode(obs, act)
        recon = self.decode(obs, mean + log_std.exp() * torch.randn_like(mean))
        return F.mse_loss(recon, act), self._kl(mean, log_std).mean()


def sample_pretanh(actor: Actor, obs: torch.Tensor, num: int):
    """`num` reparameterised samples per state from the shared Actor's Gaussian, after and before the tanh:
    returns (tanh(u), u), each (B, num, A), with u_n = μ(s) + σ(s)·ε_n — the same distribution as Actor.forward
    (same heads, same log σ clamp), with one trunk pass per state instead of one per sample."""
    h = actor.trunk(obs)
    mu, log_std = actor.mu(h), actor.log_std(h).clamp(-20.0, 2.0)
    noise = torch.randn(len(obs), num, mu.shape[-1], device=obs.device)
    u = mu.unsqueeze(1) + log_std.exp().unsqueeze(1) * noise
    return torch.tanh(u), u


class CPQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, q_thres: float):
        super().__init__()
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
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr)
        self.cost_critic_opt = torch.optim.Adam(self.cost_critic.parameters(), lr=args.critic_lr)
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=args.vae_lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha_c], lr=args.alpha_lr)

    def ood_samples(self, obs):
        """N policy actions per state; the OOD ones are the top (1 − ood_quantile) of them by VAE KL.
        Returns (states, actions) of the OOD pairs. top-k equals `kl >= quantile(kl, q)` (barring ties) without
        the host sync a boolean mask would need."""
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
        # 5b. escape (--actor-escape): a second actor step that also lowers Qc(s, ã) where the gate is closed;
        #     without it an actor whose actions all look unsafe gets no gradient at all
        if args.actor_escape:
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


# ----------------------------------------------------------------------------------------------------------
# Stage 2: VPA (copied from vpa.py).
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
        # fresh Adam (the offline optimizer state would carry the offline lrs); the two losses are independent,
        # so one backward of their sum serves both parameter groups; fused: ~1.3× steps/s on CPU at batch 64
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


# ----------------------------------------------------------------------------------------------------------
# Stage 3: SAC-Lag with the λ controllers (copied from sac_lag_apid.py).
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


# ----------------------------------------------------------------------------------------------------------
# The pipeline: one function per stage, each returning what the next one starts from.
def log_scalars(writer: SummaryWriter, prefix: str, info: dict, step: int) -> None:
    """One host sync for a dict of 0-dim tensors (never a .item() per value)."""
    for tag, value in zip(info, torch.stack(list(info.values())).tolist()):
        writer.add_scalar(prefix + tag, value, step)


class RunBar:
    """One progress bar over every stage the run will do, so its ETA is the whole run's. Work is counted in offline
    gradient steps: a VPA step and an online episode count what they cost relative to one on a CPU (measured in
    benchmark/results/speed_cpu.md: CPQ ≈ 12 steps/s at batch 512, VPA ≈ 280 steps/s, a SAC-Lag update at batch 256
    ≈ 120/s, the env ≈ 1,300 steps/s, plus the evaluations)."""

    def __init__(self, args: Args, stages: list, horizon: int, offline_done: int = 0):
        online_episode = 12.0 * (1.2 * horizon / 1300 + args.updates_per_iter / args.episodes_per_iter / 120)
        self.weights = {"cpq": 1.0, "vpa": 12.0 / 280, "online": online_episode}
        budgets = {"cpq": args.offline_steps - offline_done, "vpa": args.vpa_steps, "online": args.online_episodes}
        total = sum(self.weights[stage] * budgets[stage] for stage in stages if stage in budgets)
        self.stages, self.weight = [s for s in stages if s in budgets], 0.0
        self.bar = tqdm(total=total, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def start(self, stage: str) -> None:
        self.weight = self.weights[stage]
        self.bar.set_description(f"{self.stages.index(stage) + 1}/{len(self.stages)} {stage}")

    def update(self, n: int = 1) -> None:
        self.bar.update(min(self.weight * n, self.bar.total - self.bar.n))  # no overshoot from rounding

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()))  # in the order given

    def close(self) -> None:
        self.bar.close()


def cpq_flags(args: Args) -> Args:
    """The run's flags under the names CPQ reads (its own Args'): the offline learning rates and cost limit."""
    cost_limit = args.offline_cost_limit if args.offline_cost_limit is not None else args.cost_limit
    return replace(args, actor_lr=args.offline_actor_lr, critic_lr=args.offline_critic_lr,
                   alpha_lr=args.alpha_c_lr, cost_limit=cost_limit)


def pretrain(args: Args, data: dict, env: gym.Env, writer: SummaryWriter, progress: RunBar, save_path: str,
             device: torch.device, stop: list, resume: Optional[dict] = None) -> dict:
    """Stage 1, CPQ (cpq.py). Returns the best evaluated checkpoint, saved to `save_path`. Its whole state is kept in
    *_resume.pt (as cpq.py's) at every evaluation and when `stop` (Ctrl-C) ends it; `resume` continues from one."""
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    cpq_args = cpq_flags(args)
    agent = CPQ(obs_dim, act_dim, cpq_args, episode_q_threshold(cpq_args.cost_limit, args.gamma,
                                                                env.spec.max_episode_steps)).to(device)
    update = torch.compile(agent.update) if args.compile else agent.update
    generator = torch.Generator(device=device).manual_seed(args.seed)
    resume_path = save_path.removesuffix(".pt") + "_resume.pt"
    num_transitions, best, first_step = len(data["rewards"]), None, 1  # best: the evaluation save_path holds
    if resume is not None:  # the state save_resume wrote, in place of the fresh one
        state = resume["resume"]
        for name, module in agent.named_children():
            module.load_state_dict(resume[name])
        agent.log_alpha_c.data.copy_(resume["log_alpha_c"])
        for name, optimizer_state in state["optimizers"].items():
            getattr(agent, name).load_state_dict(optimizer_state)
        if state["eval_action"] is not None:  # put the eval env's motors where the last evaluation left them
            env.reset()
            env.step(state["eval_action"].numpy())
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])  # Bullet's reset noise
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["sampler"])
        if device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        best, first_step = state["best"], resume["step"] + 1

    def save_resume(step: int) -> None:
        """Everything that carries over from `step` to the next: --resume continues bit for bit from here."""
        numpy_state = np.random.get_state()
        rng = {"python": random.getstate(), "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
               "torch": torch.get_rng_state(), "sampler": generator.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
        save_checkpoint(resume_path, {**agent.checkpoint(cpq_args, args.env_id, obs_dim, act_dim, step), "resume": {
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
            "device": device.type, "best": best,
            "optimizers": {k: v.state_dict() for k, v in vars(agent).items() if isinstance(v, torch.optim.Optimizer)},
            "eval_action": None if env.action is None else torch.as_tensor(env.action), "rng": rng}})

    progress.start("cpq")
    for step in range(first_step, args.offline_steps + 1):
        idx = torch.randint(num_transitions, (args.offline_batch_size,), device=device, generator=generator)
        info = update(data["observations"][idx], data["actions"][idx], data["rewards"][idx], data["costs"][idx],
                      data["next_observations"][idx], data["terminals"][idx])
        if step % 100 == 0:  # one host sync per 100 steps
            log_scalars(writer, "offline/", info, step)
        if step % args.offline_eval_every == 0 or step == args.offline_steps:
            result = evaluate(agent.actor, env, args.eval_episodes, cpq_args.cost_limit, device)
            for k, v in result.items():
                writer.add_scalar(f"offline/eval/{k}", v, step)
            progress.set_postfix(ret=f"{result['return']:.1f}", cost=f"{result['cost']:.1f}", at=step)
            if is_better(result, best):
                best = {**result, "step": step}
                save_checkpoint(save_path, {**agent.checkpoint(cpq_args, args.env_id, obs_dim, act_dim, step),
                                            "eval": best})
            save_resume(step)  # a killed run loses at most --offline-eval-every steps
        if step == args.first_look and step % args.offline_eval_every:  # feedback minutes before the first eval
            numpy_state = np.random.get_state()  # Bullet's reset noise: the later evaluations see the same
            look = evaluate(agent.actor, make_env(args.env_id, args.seed + 20_000), args.eval_episodes,
                            cpq_args.cost_limit, device)
            np.random.set_state(numpy_state)
            progress.set_postfix(ret=f"{look['return']:.1f}", cost=f"{look['cost']:.1f}", at=step)
        progress.update()
        if stop:
            save_resume(step)
            raise KeyboardInterrupt(f"interrupted in stage 1 (CPQ) at step {step}: resumable state {resume_path}; "
                                    f"continue with --resume {os.path.dirname(save_path)}")
    os.remove(resume_path)  # stage 1 is complete: nothing left to resume
    # the best evaluation's networks, read back: a resumed stage 1 only knows that evaluation
    return torch.load(save_path, map_location="cpu", weights_only=True)


def align(args: Args, data: dict, offline: dict, env: gym.Env, writer: SummaryWriter, progress: RunBar,
          save_path: str, device: torch.device, stop: list) -> dict:
    """Stage 2, VPA (vpa.py): re-fit both critics of `offline` to its frozen actor. Returns the aligned checkpoint,
    also saved to `save_path`; `stop` (Ctrl-C) ends it unsaved."""
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    agent = VPA(obs_dim, act_dim, args.hidden_sizes, args).to(device)
    agent.load(offline, "offline checkpoint")
    update = torch.compile(agent.update) if args.compile else agent.update
    generator = torch.Generator(device=device).manual_seed(args.seed)
    num_transitions = len(data["rewards"])
    progress.start("vpa")
    for step in range(1, args.vpa_steps + 1):
        idx = torch.randint(num_transitions, (args.vpa_batch_size,), device=device, generator=generator)
        info = update({k: v[idx] for k, v in data.items()})
        if step % 100 == 0:
            log_scalars(writer, "vpa/", info, step)
        progress.update()
        if stop:  # VPA is saved only when it ends: it starts over from the offline checkpoint
            save_dir = os.path.dirname(save_path)
            restart = (f"run the same command again to restart it from {args.offline_checkpoint}"
                       if args.offline_checkpoint else
                       f"continue with --resume {save_dir}, which restarts it from {os.path.join(save_dir, 'cpq.pt')}")
            raise KeyboardInterrupt(f"interrupted in stage 2 (VPA) at step {step} (VPA is saved only when it ends); "
                                    f"{restart}")
    result = evaluate(agent.actor, env, args.eval_episodes, args.cost_limit, device)  # μ is unchanged
    for k, v in result.items():
        writer.add_scalar(f"vpa/eval/{k}", v, args.vpa_steps)
    aligned = {k: v for k, v in offline.items() if k not in ("format", "optimizers")}
    aligned.update({"algo": f"{offline['algo']}+vpa", "cost_limit": args.cost_limit, "step": args.vpa_steps,
                    "init": {"algo": offline["algo"], "step": offline["step"], "eval": offline.get("eval")},
                    "critic": agent.critic.state_dict(),
                    "critic_target": agent.critic_target.state_dict(),
                    "cost_critic": agent.cost_critic.state_dict(),
                    "cost_critic_target": agent.cost_critic_target.state_dict(), "lagrange": None,
                    "args": asdict(args), "eval": {**result, "step": args.vpa_steps}})
    save_checkpoint(save_path, aligned)
    return aligned


def finetune(args: Args, init: Optional[dict], data: Optional[dict], writer: SummaryWriter, progress: RunBar,
             save_path: str, device: torch.device, stop: list) -> dict:
    """Stage 3, SAC-Lag with the λ controller (sac_lag_apid.py), from `init` (None: from scratch); `data` is the
    offline dataset that --offline-ratio mixes into the minibatches; `stop` (Ctrl-C) ends it after an iteration."""
    # reseed and make the envs afresh, in sac_lag_apid.py's order: the online episodes (Bullet's reset noise is
    # np.random) then do not depend on which stages ran before, so methods that share a checkpoint and a seed see
    # the same noise, and the stage reproduces sac_lag_apid.py exactly
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    envs = [make_env(args.env_id, args.seed + i) for i in range(args.episodes_per_iter)]
    env = make_env(args.env_id, args.seed + 10_000)  # evaluation
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = SACLag(obs_dim, act_dim, args, (args.actor_lr, args.critic_lr, args.cost_critic_lr), args.alpha).to(device)
    algo = "sac_lag"
    if init is not None:
        agent.load(init)
        algo = f"{init['algo']}+sac_lag"
    update = torch.compile(agent.update) if args.compile else agent.update
    lagrangian = make_lagrangian(args)
    replay = ReplayBuffer(args.online_episodes * env.spec.max_episode_steps, obs_dim, act_dim, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    num_offline = int(round(args.offline_ratio * args.batch_size))
    csv_path = save_path.removesuffix(".pt") + "_progress.csv"
    csv = open(csv_path, "w")
    csv.write("episodes,env_steps,return,cost,lambda,kp,ki,kd,violations,cumulative_cost,"
              "eval_return,eval_cost,eval_normalized_return,eval_normalized_cost,deployments,"
              "learner_eval_return,learner_eval_cost\n")
    # gated deployment: `gate.deployed` runs the episodes, `agent.actor` learns
    gate = DeploymentGate(agent.actor, args.cost_limit, args.gate_max_wait, args.gate_passes,
                          pass_cost=(1 - args.cost_margin) * args.cost_limit, passes_unsafe=args.gate_passes_unsafe,
                          tightening=args.rollback_tightening) if args.deploy == "gated" else None
    deployed = gate.deployed if gate else agent.actor
    anchor = deployed if args.bc_target != "replay" else None  # the anchor's target policy (--bc-target)
    # the critic's per-step discounted cost-to-go in episode-cost units: Qc·(1−γ)T/(1−γ^T) (inverse of q_thres)
    horizon = env.spec.max_episode_steps
    to_episode_cost = (1 - args.gamma) * horizon / (1 - args.gamma ** horizon)

    def log_eval(episodes_done: int, env_steps: int) -> dict:
        nonlocal evaluated_at
        evaluated_at = episodes_done
        result = evaluate(deployed, env, args.eval_episodes, args.cost_limit, device)
        for k, v in result.items():
            writer.add_scalar(f"eval/{k}", v, env_steps)
        learner = ",,"
        if gate:  # the learner, evaluated the same way, for the record (it does not touch the online counts)
            learner_result = evaluate(agent.actor, env, args.eval_episodes, args.cost_limit, device)
            writer.add_scalar("eval/learner_return", learner_result["return"], env_steps)
            writer.add_scalar("eval/learner_cost", learner_result["cost"], env_steps)
            learner = f"{gate.deployments},{learner_result['return']:.4f},{learner_result['cost']:.4f}"
        csv.write(f"{episodes_done},{env_steps},,,,,,,,," + ",".join(f"{result[k]:.4f}" for k in (
            "return", "cost", "normalized_return", "normalized_cost")) + f",{learner}\n")
        csv.flush()
        return result

    def minibatch() -> list:
        sample = replay.sample(args.batch_size - num_offline, generator)
        if num_offline > 0:
            idx = torch.randint(len(data["rewards"]), (num_offline,), device=device, generator=generator)
            sample = [torch.cat([s, data[k][idx]]) for s, k in zip(sample, REPLAY_KEYS)]
        return sample

    env_steps = episodes_done = violations = evaluated_at = 0
    cumulative_cost, interrupted, start = 0.0, False, time.time()
    last_eval = log_eval(0, 0)
    lam = lagrangian.lam
    progress.start("online")
    while episodes_done < args.online_episodes and not stop:  # Ctrl-C: at the end of an iteration
        n = min(args.episodes_per_iter, args.online_episodes - episodes_done)
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
        # λ as a 0-dim tensor: under --compile a Python float is baked into the graph (a recompile per value)
        lam_tensor = torch.tensor(lam, device=device)
        for _ in range(args.updates_per_iter):
            info = update(*minibatch(), lam=lam_tensor, anchor=anchor)
        log_scalars(writer, "", info, env_steps)  # one sync per iteration
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
        progress.update(n)
        progress.set_postfix(ret=f"{returns.mean():.0f}", cost=f"{costs.mean():.1f}", lam=f"{lam:.3f}",
                             eval=f"{last_eval['return']:.0f}/{last_eval['cost']:.1f}")
    if episodes_done < args.online_episodes:  # stopped by Ctrl-C: keep the work done so far
        save_path, interrupted = save_path.removesuffix(".pt") + "_interrupted.pt", True
    if evaluated_at != episodes_done:  # the final evaluation is of the final actor, also after an interrupt
        last_eval = log_eval(episodes_done, env_steps)
    csv.close()
    ckpt = agent.checkpoint(args, args.env_id, obs_dim, act_dim, env_steps, algo, lagrangian)
    if gate:  # the checkpoint's actor is the deployed policy (the one evaluated); the learner is kept beside it
        ckpt = {**ckpt, "actor": deployed.state_dict(), "learner_actor": agent.actor.state_dict(),
                "gate": gate.state_dict()}
    save_checkpoint(save_path, {**ckpt, "eval": last_eval})
    return {"eval": last_eval, "online_violations": violations, "cumulative_cost": cumulative_cost,
            "episodes": episodes_done, "lambda": lam, "interrupted": interrupted, "checkpoint": save_path}


def check_args(args: Args) -> None:
    """Every rule on the flags (per-env defaults filled in), before any work: one line naming the first flag that
    breaks its rule, the same rules as the standalone files'; then the combinations."""
    refuse_bad_flags(
        flag_rules(args, counts=("offline_steps", "offline_batch_size", "offline_eval_every", "vae_hidden",
                                 "num_ood_samples", "vpa_steps", "vpa_batch_size"),
                   rates=("offline_actor_lr", "offline_critic_lr", "vae_lr", "alpha_c_lr", "qc_thres_factor",
                          "alpha_vpa"))
        + online_flag_rules(args) + [
            ("first_look", args.first_look, args.first_look >= 0, ">= 0 (0: none)"),
            ("offline_cost_limit", args.offline_cost_limit,
             args.offline_cost_limit is None or args.offline_cost_limit >= 0, ">= 0"),
            ("ood_quantile", args.ood_quantile, 0 <= args.ood_quantile < 1, "in [0, 1)"),
            ("kl_weight", args.kl_weight, args.kl_weight >= 0, ">= 0"),
            ("alpha_c_vpa", args.alpha_c_vpa, 0 <= args.alpha_c_vpa < args.alpha_vpa,
             ">= 0 and < --alpha-vpa (the paper's condition)")])
    needs_gate = [flag for flag, on in (("--cost-signal tests", args.cost_signal == "tests"),
                                        (f"--bc-target {args.bc_target}", args.bc_target != "replay")) if on]
    if needs_gate and args.deploy != "gated":  # only the gate runs test episodes and keeps a deployed policy
        raise InputError(f"--deploy {args.deploy}: {' and '.join(needs_gate)} need{'s' * (len(needs_gate) == 1)} "
                         f"--deploy gated; add --cost-signal episodes --bc-target replay, or use --paper for the whole "
                         f"published phase")


def resolve_defaults(args: Args) -> Args:
    """Per-env online defaults (ENV_DEFAULTS) and the VPA α defaults of vpa.py, --paper; checks the flags."""
    if args.paper:
        args = replace(args, **PAPER_ONLINE)
    if args.env_id not in ENV_DEFAULTS:
        raise InputError(f"--env-id {args.env_id}: no online defaults; choose one of {sorted(ENV_DEFAULTS)}")
    actor_lr, critic_lr, cost_critic_lr, alpha, episodes = ENV_DEFAULTS[args.env_id]
    alpha_vpa = args.alpha_vpa if args.alpha_vpa is not None else 2 * alpha
    args = replace(args, actor_lr=actor_lr if args.actor_lr is None else args.actor_lr,
                   critic_lr=critic_lr if args.critic_lr is None else args.critic_lr,
                   cost_critic_lr=cost_critic_lr if args.cost_critic_lr is None else args.cost_critic_lr,
                   alpha=args.alpha if args.alpha is not None else alpha, alpha_vpa=alpha_vpa,
                   alpha_c_vpa=args.alpha_c_vpa if args.alpha_c_vpa is not None else alpha_vpa / 2,
                   online_episodes=args.online_episodes if args.online_episodes is not None else episodes)
    check_args(args)
    if args.offline_checkpoint and not args.pretrain:
        raise InputError("--offline-checkpoint and --no-pretrain contradict each other")
    return args


def resume_point(args: Args, obs_dim: int, act_dim: int, device: torch.device) -> Tuple[Optional[dict], ...]:
    """--resume: what the run's folder holds to go on from, refused in one line (InputError) unless it continues this
    very run. Returns (cpq_resume.pt, cpq.pt, vpa.pt), None where unused: an interrupted stage 1 goes on from its
    state, else the run goes on after the last finished stage (a file written after cpq.pt is this run's)."""
    folder = args.resume
    if args.save_dir is not None and os.path.abspath(args.save_dir) != os.path.abspath(folder):
        raise InputError(f"--save-dir {args.save_dir}: --resume {folder} continues the run in that folder")
    path = {name: os.path.join(folder, name) for name in ("cpq_resume.pt", "cpq.pt", "vpa.pt", "sac_lag.pt")}

    def written_after_cpq(name: str) -> bool:
        return os.path.exists(path[name]) and os.path.getmtime(path[name]) >= os.path.getmtime(path["cpq.pt"])

    state = offline = aligned = None
    if os.path.exists(path["cpq_resume.pt"]):  # stage 1 was interrupted
        state = load_checkpoint(path["cpq_resume.pt"], args.env_id, obs_dim, act_dim, args.hidden_sizes)
        if "resume" not in state:
            raise InputError(f"{path['cpq_resume.pt']}: not a resumable checkpoint")
        recorded, flags = state["resume"]["args"], asdict(args)
    elif os.path.exists(path["cpq.pt"]):  # stage 1 finished
        if written_after_cpq("sac_lag.pt"):
            raise InputError(f"--resume {folder}: the run finished ({path['sac_lag.pt']}); nothing to resume")
        offline = load_checkpoint(path["cpq.pt"], args.env_id, obs_dim, act_dim, args.hidden_sizes)
        # cpq.pt records the flags under CPQ's names, its learning rates in place of the online ones: those are not
        # known here (nothing saved depends on them yet)
        recorded = offline["args"]
        flags = {k: v for k, v in asdict(cpq_flags(args)).items() if k not in ("actor_lr", "critic_lr", "alpha_lr")}
        if args.vpa and written_after_cpq("vpa.pt"):  # stage 2 finished too
            aligned = load_checkpoint(path["vpa.pt"], args.env_id, obs_dim, act_dim, args.hidden_sizes)
            recorded, flags = aligned["args"], asdict(args)
    else:
        raise InputError(f"--resume {folder}: nothing to resume (no cpq_resume.pt or cpq.pt: stage 1 never ran there)")

    def plain(value):  # cpq.pt's args hold tuples as lists
        return list(value) if isinstance(value, tuple) else value

    changed = [f"--{k.replace('_', '-')} (was {recorded.get(k)})" for k, v in flags.items()
               if k not in ("exp_name", "track", "wandb_project_name", "cuda", "save_dir", "resume")
               and plain(recorded.get(k)) != plain(v)]
    if state is not None and state["resume"]["device"] != device.type:  # RNG states do not carry over between devices
        changed.append(f"--cuda/--no-cuda (ran on {state['resume']['device']})")
    if changed:
        raise InputError(f"--resume {folder}: these flags differ from the interrupted run's: {', '.join(changed)}")
    return state, offline, aligned


def main(args: Args) -> dict:
    args = resolve_defaults(args)
    if args.resume is not None and not os.path.isdir(args.resume):  # before prepare_output_dir would create it
        raise InputError(f"--resume {args.resume}: no such directory")
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    save_dir = args.resume or args.save_dir or os.path.join("runs", run_name)
    prepare_output_dir(os.path.join(save_dir, "cpq.pt"))
    random.seed(args.seed)
    np.random.seed(args.seed)  # also Bullet's reset noise
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Bullet's reset keeps the motor targets of the last action (CarRun's wheels and steering), so an evaluation
    # starts from where the one before it stopped: the env remembers its last action for --resume to replay
    class RememberAction(gym.Wrapper):
        action = None

        def step(self, action):
            self.action = action
            return self.env.step(action)

    env = RememberAction(make_env(args.env_id, args.seed + 10_000))  # evaluation env, separate from the online ones
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]

    # --resume: refused before any work unless it continues this very run
    state, offline, aligned = resume_point(args, obs_dim, act_dim, device) if args.resume else (None, None, None)
    data = None
    if args.offline_checkpoint:  # read first: a bad path fails before any work
        offline = load_checkpoint(args.offline_checkpoint, args.env_id, obs_dim, act_dim, args.hidden_sizes)
        if offline["reward_scale"] != args.reward_scale:
            raise InputError(f"{args.offline_checkpoint}: reward_scale {offline['reward_scale']} != "
                             f"--reward-scale {args.reward_scale}")
    if (args.pretrain and aligned is None and (args.vpa or offline is None)) or args.offline_ratio > 0:
        path = find_dataset(args.env_id, env.unwrapped.dataset_url, args.dataset_path)
        data = {k: torch.as_tensor(v, device=device) for k, v in load_dataset(path, obs_dim, act_dim).items()}
        data["rewards"] = data["rewards"] * args.reward_scale
        print(f"{args.env_id}: {len(data['rewards'])} transitions from {path} on {device}")
    stages = ([] if not args.pretrain else ["loaded" if args.offline_checkpoint else "cpq"]
              + (["vpa"] if args.vpa else [])) + ["online"]

    # From here on Ctrl-C stops the current stage at the end of its step (or evaluation), where its state is whole,
    # and stage 1 saves it for --resume; the default KeyboardInterrupt would strike in the middle of an update
    stop = []
    default_sigint = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    print(f"stages: {' → '.join(stages)}; checkpoints in {save_dir}/")
    if args.resume:  # an interrupted stage 2 or 3 starts over
        print("resuming " + (f"stage 1 after step {state['step']}" if state else "after stage 2 (vpa.pt)" if aligned
                             else "after stage 1 (cpq.pt)"))
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(save_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    todo = (["cpq"] if args.pretrain and offline is None and aligned is None else []) \
        + (["vpa"] if args.pretrain and args.vpa and aligned is None else []) + ["online"]
    progress = RunBar(args, todo, env.spec.max_episode_steps, offline_done=state["step"] if state else 0)
    rows, wall = {}, {}
    start = time.time()
    try:
        if args.pretrain:
            if offline is None:
                offline = pretrain(args, data, env, writer, progress, os.path.join(save_dir, "cpq.pt"), device, stop,
                                   state)
                wall["offline"] = time.time() - start
            if "eval" not in offline:  # a loaded checkpoint without a stored evaluation
                actor = Actor(obs_dim, act_dim, args.hidden_sizes).to(device)
                actor.load_state_dict(offline["actor"])
                offline["eval"] = evaluate(actor, env, args.eval_episodes, args.cost_limit, device)
            # normalised at the online limit like the other rows (CPQ may have trained and selected at another one)
            env.unwrapped.set_target_cost(args.cost_limit)
            norm_ret, norm_cost = env.unwrapped.get_normalized_score(offline["eval"]["return"],
                                                                     offline["eval"]["cost"])
            rows["offline"] = {**offline["eval"], "normalized_return": float(norm_ret),
                               "normalized_cost": float(norm_cost)}
            start = time.time()
            if args.vpa:
                if aligned is None:  # else --resume found stage 2 finished
                    aligned = align(args, data, offline, env, writer, progress, os.path.join(save_dir, "vpa.pt"),
                                    device, stop)
                    wall["vpa"] = time.time() - start
                offline, rows["after VPA"] = aligned, aligned["eval"]
        start = time.time()
        online = finetune(args, offline, data, writer, progress, os.path.join(save_dir, "sac_lag.pt"), device, stop)
        rows["final"], wall["online"] = online["eval"], time.time() - start
    except KeyboardInterrupt:  # a stage ended on Ctrl-C and says what it saved; Ctrl-C acts as usual again
        signal.signal(signal.SIGINT, default_sigint)
        raise
    finally:
        progress.close()
        writer.close()

    summary = {"stages": stages, "eval": rows, "online_violations": online["online_violations"],
               "cumulative_cost": online["cumulative_cost"], "online_episodes": online["episodes"],
               "final_lambda": online["lambda"], "wall_seconds": wall, "device": str(device),
               "interrupted": online["interrupted"], "checkpoint": online["checkpoint"], "args": asdict(args)}
    with open(os.path.join(save_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n{'':12}{'return':>9}{'cost':>7}{'norm ret':>10}{'norm cost':>11}")
    for name, r in rows.items():
        print(f"{name:12}{r['return']:>9.1f}{r['cost']:>7.1f}{r['normalized_return']:>10.3f}"
              f"{r['normalized_cost']:>11.3f}")
    print(f"online: {online['episodes']} episodes, {online['online_violations']} over the limit, cumulative cost "
          f"{online['cumulative_cost']:.0f}, final λ {online['lambda']:.4f}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in wall.items()) + f"; outputs in {save_dir}/")
    signal.signal(signal.SIGINT, default_sigint)
    if online["interrupted"]:  # stage 3 starts over: from the last finished stage's checkpoint, or from scratch
        restart = (f"continue with --resume {save_dir}, which restarts it from "
                   f"{os.path.join(save_dir, 'vpa.pt' if args.vpa else 'cpq.pt')}"
                   if args.pretrain and not args.offline_checkpoint else "run the same command again to start over")
        raise KeyboardInterrupt(f"interrupted in stage 3 (online) after {online['episodes']} of "
                                f"{args.online_episodes} episodes: partial checkpoint {online['checkpoint']} (the "
                                f"'final' row above, and summary.json); {restart}")
    return summary


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:
        sys.exit(f"marvel_full.py: error: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C: main says what it saved; before the stages there is nothing to save
        print(f"marvel_full.py: {str(e) or 'interrupted before the first stage started: nothing saved'}", file=sys.stderr)
        sys.exit(130)
