"""VPA: Value Pre-Alignment (Marvel, arXiv 2412.04426, §3.1) of an offline checkpoint's critics, in one file.

    python vpa.py --env-id OfflineCarRun-v0 --init runs/cpq_seed0/cpq.pt    # → vpa.pt + vpa_spearman.csv

Offline critics are shaped by the offline objective (CPQ inflates Qc of out-of-distribution actions and zeroes Q
behind unsafe next actions) and mislead the first online updates. VPA re-fits both critics to the frozen offline
policy μ with an entropy bonus, on offline data only, before any interaction. Per TD step on a minibatch
(s, a, r, c, s', term) of the dataset, with one a' ~ μ(·|s') shared by both targets:
    y   = r·reward_scale + γ(1−term)·[ min_i Q'_i(s', a') − α_vpa  ·log μ(a'|s') ]
    y_c = c              + γ(1−term)·[      Qc'(s', a')   − α_c_vpa·log μ(a'|s') ]      0 ≤ α_c_vpa < α_vpa
    L = Σ_i MSE(Q_i(s, a), y),   L_c = MSE(Qc(s, a), y_c),   then Polyak targets Q' ← (1−τ)Q' + τQ, same for Qc'.
−log μ is a bonus where μ is uncertain: such state-actions look better to Q and, less so, costlier to Qc — optimism
that invites exploration online. μ never changes; only `terminals` cut bootstrapping (timeouts are truncations).
The output checkpoint has the same contract, algo "<offline algo>+vpa".

Diagnostic (the paper's Table 1): Spearman ρ between critic values (Q: min over the ensemble) and discounted Monte-
Carlo returns of μ, before and after VPA. A Bullet simulator cannot be put into the state behind a dataset
observation, so the states are μ's own: roll μ out (stochastic, as in the targets) from env resets; at uniformly
drawn steps save the simulator (`snapshot`), and for a ~ μ(·|s) ("policy" pairs) and a ~ U[−1, 1]^A ("random"
pairs) step with a, follow μ for --mc-horizon more steps on the unwrapped env and sum γ^t r_t and γ^t c_t; restore.
The unwrapped env has no 200-step limit, so every pair gets the same horizon, as the infinite-horizon critics
assume (γ^300 ≈ 0.05). Scope, honestly: "policy" pairs stand in for the paper's dataset pairs — states μ visits
and actions μ takes, not the dataset's states and behaviour actions; "random" pairs are the paper's random
actions, at μ's states instead of the dataset's. The same pairs score the critics before and after.
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
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Tuple

os.environ.setdefault("DSRL_SUPPRESS_IMPORT_ERROR", "1")  # dsrl warns about suites we do not install
import dsrl  # noqa: F401  (registers the Offline*-v0 environments)
import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from scipy.stats import spearmanr
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    # help that spans lines is one implicitly joined string: tyro keeps the line breaks of a multi-line docstring
    init: str
    """offline checkpoint (cpq.py, bear_lag.py) whose actor μ is frozen and whose critics are aligned"""
    exp_name: str = "vpa"
    """name of this experiment (part of the run name)"""
    env_id: str = "OfflineCarRun-v0"
    ("DSRL environment id, e.g. OfflineBallCircle-v0, OfflineBallRun-v0, OfflineCarCircle-v0, OfflineCarRun-v0, "
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
    dataset_path: Optional[str] = None
    """DSRL-format HDF5 file; default: DSRL cache, then datasets/<env-id>.hdf5, then download"""
    save_path: Optional[str] = None
    """output checkpoint (default runs/<run-name>/vpa.pt); the Spearman table goes beside it as *_spearman.csv"""
    resume: Optional[str] = None
    ("a *_resume.pt file (written beside the checkpoint every --eval-every steps and on Ctrl-C) to continue from, "
     "with the same flags")
    cost_limit: float = 20.0
    """episode cost limit d (for the normalised cost of the evaluation)"""
    total_steps: int = 20_000
    """TD steps (official schedule: 20 000 steps of minibatch 64)"""
    batch_size: int = 64
    """minibatch size"""
    eval_every: int = 2_000
    """log the Spearman ρ of the critics on the diagnostic pairs every this many steps (μ is frozen: one env eval)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes of μ (the result is stored in the output checkpoint)"""
    alpha_vpa: Optional[float] = None
    ("α_vpa, weight of the entropy term in the reward target (default: 2 × the env's online SAC α, CarRun 0.01). "
     "Chosen by a sweep on a real CarRun CPQ checkpoint (benchmark/results/vpa_alpha_sweep_cpq15k): over α ∈ {0.001, "
     "0.01, 0.05, 0.1} (α_c = α/2) 0.01 gave ρ(Q) 0.86 (best 0.90) and hurt ρ(Qc) least. A near-deterministic μ has "
     "log μ > 0, so −α·log μ is then a penalty, not a bonus: large α drags Q and Qc below zero.")
    alpha_c_vpa: Optional[float] = None
    """α_c_vpa, weight of the entropy term in the cost target (default: α_vpa / 2); must be < α_vpa (the paper)"""
    critic_lr: Optional[float] = None
    """reward critic learning rate (default: the env's online critic lr, ENV_DEFAULTS)"""
    cost_critic_lr: Optional[float] = None
    """cost critic learning rate (default: the env's online cost critic lr, ENV_DEFAULTS)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target-network Polyak rate"""
    reward_scale: float = 0.1
    """rewards are multiplied by this in training; must equal the checkpoint's"""
    diagnostic: bool = True
    """run the Spearman diagnostic (--no-diagnostic skips its rollouts)"""
    diagnostic_pairs: int = 100
    """states of μ scored by the diagnostic; each gives one "policy" and one "random" pair"""
    pairs_per_episode: int = 10
    """diagnostic states drawn per rollout episode of μ (uniformly over its steps)"""
    mc_horizon: int = 300
    """steps of μ after the pair's action in each Monte-Carlo return (γ^H is the neglected tail weight)"""


# Per-env defaults of the official Marvel configuration: (actor lr, critic lr, cost critic lr, α, online episodes).
ENV_DEFAULTS = {
    "OfflineBallCircle-v0": (5e-5, 5e-3, 5e-3, 1e-3, 500), "OfflineBallRun-v0": (1e-5, 5e-3, 5e-3, 1e-3, 500),
    "OfflineCarCircle-v0": (5e-4, 5e-3, 8e-3, 1e-3, 500), "OfflineCarRun-v0": (5e-5, 5e-3, 8e-3, 5e-3, 500),
    "OfflineDroneCircle-v0": (5e-6, 8e-4, 2e-3, 5e-3, 1000), "OfflineDroneRun-v0": (2e-6, 8e-3, 5e-3, 1e-3, 5000),
    "OfflineAntCircle-v0": (5e-5, 5e-4, 8e-4, 5e-5, 5000), "OfflineAntRun-v0": (5e-5, 2e-3, 5e-3, 1e-4, 5000),
}


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
# VPA.
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


def init_hidden_sizes(path: str) -> Tuple[int, ...]:
    """The architecture the checkpoint declares (VPA keeps the networks it is given; VPA.load is strict)."""
    try:
        return tuple(torch.load(path, map_location="cpu", weights_only=True)["hidden_sizes"])
    except Exception:  # unreadable or foreign file: load_checkpoint reports it in one line
        return ()


# ----------------------------------------------------------------------------------------------------------
# Diagnostic: Spearman ρ between critic values and discounted Monte-Carlo returns of μ (see the module docstring).
PAIR_KINDS = ("policy", "random")
PLAIN = (bool, int, float, np.ndarray, np.generic)


def snapshot(raw: gym.Env) -> tuple:
    """pybullet's saveState covers the simulation, not the plain Python numbers that env, task and agent keep between
    steps (RunTask.old_potential: the reward is a potential difference): copy those too. Exact replay is tested."""
    objects = (raw, raw.task, raw.agent, *raw.obstacles)
    return raw.bc.saveState(), [(o, {k: copy.deepcopy(v) for k, v in vars(o).items() if isinstance(v, PLAIN)})
                                for o in objects]


def restore(raw: gym.Env, snap: tuple) -> None:
    state_id, saved = snap
    raw.bc.restoreState(state_id)
    for o, numbers in saved:  # copies again: reset() mutates some arrays in place (agent.init_xyz)
        vars(o).update(copy.deepcopy(numbers))


@torch.no_grad()
def policy_action(actor: nn.Module, obs: np.ndarray, device: torch.device) -> np.ndarray:
    return actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0][0].cpu().numpy()


def mc_return(raw: gym.Env, actor: nn.Module, action: np.ndarray, horizon: int, gamma: float,
              device: torch.device) -> Tuple[float, float]:
    """(Σ_t γ^t r_t, Σ_t γ^t c_t), t = 0..H: step with `action`, then follow μ (stochastic) for H steps."""
    ret = cost = 0.0
    for t in range(horizon + 1):
        obs, reward, terminated, _, info = raw.step(action)
        ret, cost = ret + gamma ** t * reward, cost + gamma ** t * info["cost"]
        if terminated:
            break
        action = policy_action(actor, obs, device)
    return ret, cost


def collect_pairs(env: gym.Env, actor: nn.Module, args: Args, device: torch.device) -> dict:
    """States visited by μ from env resets, each with a "policy" and a "random" action and their MC returns.
    Returns obs (N, O), act (2, N, A), ret (2, N), cost (2, N); index 0/1 follows PAIR_KINDS."""
    raw, horizon = env.unwrapped, env.spec.max_episode_steps
    rng = np.random.default_rng(args.seed)
    rows = []  # (s, a, MC return, MC cost), alternating policy and random pairs
    progress = tqdm(total=args.diagnostic_pairs, desc="mc pairs", dynamic_ncols=True)
    while len(rows) < 2 * args.diagnostic_pairs:
        n = min(args.pairs_per_episode, args.diagnostic_pairs - len(rows) // 2, horizon)
        picks = set(rng.choice(horizon, size=n, replace=False).tolist())
        obs, _ = raw.reset()
        for t in range(horizon):
            action = policy_action(actor, obs, device)
            if t in picks:
                snap = snapshot(raw)
                for a in (action, rng.uniform(-1.0, 1.0, action.shape).astype(np.float32)):
                    rows.append((obs, a, *mc_return(raw, actor, a, args.mc_horizon, args.gamma, device)))
                    restore(raw, snap)  # both branches start from the same saved state
                raw.bc.removeState(snap[0])
                progress.update()
            obs, _, terminated, _, _ = raw.step(action)  # the episode goes on as if never branched
            if terminated:
                break
    progress.close()
    obs, act, ret, cost = (np.array(column) for column in zip(*rows))
    n = len(rows) // 2
    return {"obs": obs[::2].astype(np.float32), "act": act.reshape(n, 2, -1).swapaxes(0, 1),
            "ret": ret.reshape(n, 2).T, "cost": cost.reshape(n, 2).T}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():  # constant input (e.g. no cost on any rollout): ρ is undefined, report nan
        warnings.simplefilter("ignore")
        return float(spearmanr(x, y).statistic)


@torch.no_grad()
def spearman_table(agent: VPA, pairs: dict, device: torch.device) -> dict:
    """{"Q/policy": ρ, "Q/random": ρ, "Qc/policy": ρ, "Qc/random": ρ} for the current (not target) critics."""
    obs, table = torch.as_tensor(pairs["obs"], device=device), {}
    acts = [torch.as_tensor(a, device=device) for a in pairs["act"]]
    for k, kind in enumerate(PAIR_KINDS):
        table[f"Q/{kind}"] = spearman(agent.critic(obs, acts[k]).min(0).values.cpu().numpy(), pairs["ret"][k])
    for k, kind in enumerate(PAIR_KINDS):
        table[f"Qc/{kind}"] = spearman(agent.cost_critic(obs, acts[k])[0].cpu().numpy(), pairs["cost"][k])
    return table


def report_spearman(before: dict, after: dict, pairs: dict, csv_path: str) -> None:
    """Print the before/after table and write it as CSV (critic, pairs, before, after, nonzero_mc). `nonzero_mc`
    counts the pairs whose MC target is not 0: a near-safe μ gives most pairs zero MC cost, and ρ then rests on
    the few that are not (ties share one rank)."""
    print(f"\nSpearman ρ(critic value, discounted MC return of μ){'before':>12}{'after':>10}{'MC ≠ 0':>10}")
    lines = ["critic,pairs,before,after,nonzero_mc"]
    for key in before:
        critic, kind = key.split("/")
        mc = pairs["ret" if critic == "Q" else "cost"][PAIR_KINDS.index(kind)]
        nonzero = f"{int(np.count_nonzero(mc))}/{len(mc)}"
        print(f"  {critic:3}{kind + ' pairs':47}{before[key]:>12.4f}{after[key]:>10.4f}{nonzero:>10}")
        lines.append(f"{critic},{kind},{before[key]:.6f},{after[key]:.6f},{nonzero}")
    with open(csv_path, "w") as f:  # beside the checkpoint, whose folder exists by now
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    """Every rule on this file's flags, before any work: one line naming the first flag that breaks its rule."""
    refuse_bad_flags(flag_rules(args, counts=("total_steps", "batch_size", "eval_every", "eval_episodes"),
                                rates=("critic_lr", "cost_critic_lr", "alpha_vpa", "reward_scale")) + [
        ("mc_horizon", args.mc_horizon, args.mc_horizon >= 0, ">= 0"),
        ("alpha_c_vpa", args.alpha_c_vpa, args.alpha_c_vpa is None or args.alpha_c_vpa >= 0, ">= 0"),
        ("diagnostic_pairs", args.diagnostic_pairs, not args.diagnostic or args.diagnostic_pairs >= 2,
         ">= 2 (or pass --no-diagnostic)"),
        ("pairs_per_episode", args.pairs_per_episode, not args.diagnostic or args.pairs_per_episode >= 1,
         ">= 1 (or pass --no-diagnostic)")])


def main(args: Args) -> dict:
    check_args(args)
    if args.env_id not in ENV_DEFAULTS and None in (args.critic_lr, args.cost_critic_lr, args.alpha_vpa):
        raise InputError(f"--env-id {args.env_id}: no defaults; pass --critic-lr, --cost-critic-lr and --alpha-vpa")
    _, critic_lr, cost_critic_lr, online_alpha, _ = ENV_DEFAULTS.get(args.env_id, (None,) * 5)
    alpha = args.alpha_vpa if args.alpha_vpa is not None else 2 * online_alpha
    args = replace(args, critic_lr=args.critic_lr or critic_lr, cost_critic_lr=args.cost_critic_lr or cost_critic_lr,
                   alpha_vpa=alpha, alpha_c_vpa=args.alpha_c_vpa if args.alpha_c_vpa is not None else alpha / 2)
    if not 0 <= args.alpha_c_vpa < args.alpha_vpa:
        raise InputError(f"need 0 <= --alpha-c-vpa < --alpha-vpa (the paper's condition), got "
                         f"{args.alpha_c_vpa} and {args.alpha_vpa}")
    resume = None
    if args.resume is not None:  # refused before any work unless it continues this very run
        try:
            resume = torch.load(args.resume, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"--resume {args.resume}: cannot read checkpoint ({type(e).__name__})") from None
        if not isinstance(resume, dict) or "vpa_resume" not in resume:
            raise InputError(f"--resume {args.resume}: not a resumable checkpoint (vpa.py writes *_resume.pt)")
        was, state = resume["args"], resume["vpa_resume"]
        changed = [f"--{k.replace('_', '-')} (was {was.get(k)})" for k, v in asdict(args).items()
                   if k not in ("exp_name", "track", "wandb_project_name", "cuda", "save_path", "resume")
                   and was.get(k) != (list(v) if isinstance(v, tuple) else v)]
        if args.save_path and os.path.abspath(args.save_path) != state["save_path"]:
            changed.append(f"--save-path (was {state['save_path']})")
        if changed:
            raise InputError(f"--resume {args.resume}: these flags differ from the interrupted run's: "
                             f"{', '.join(changed)}")
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    save_path = args.save_path or (resume["vpa_resume"]["save_path"] if resume else
                                   os.path.join("runs", run_name, "vpa.pt"))
    run_dir = prepare_output_dir(save_path)
    resume_path = save_path.removesuffix(".pt") + "_resume.pt"
    random.seed(args.seed)
    np.random.seed(args.seed)  # also Bullet's reset noise
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    env = make_env(args.env_id, args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    ckpt = load_checkpoint(args.init, args.env_id, obs_dim, act_dim, init_hidden_sizes(args.init))
    if ckpt["reward_scale"] != args.reward_scale:
        raise InputError(f"{args.init}: reward_scale {ckpt['reward_scale']} != --reward-scale {args.reward_scale}")
    hidden_sizes = tuple(ckpt["hidden_sizes"])
    agent = VPA(obs_dim, act_dim, hidden_sizes, args).to(device)
    agent.load(ckpt, args.init)
    path = find_dataset(args.env_id, env.unwrapped.dataset_url, args.dataset_path)
    data = {k: torch.as_tensor(v, device=device) for k, v in load_dataset(path, obs_dim, act_dim).items()}
    data["rewards"] = data["rewards"] * args.reward_scale
    num_transitions = len(data["observations"])
    print(f"{args.env_id}: {num_transitions} transitions from {path}; aligning {args.init} ({ckpt['algo']}, "
          f"hidden {hidden_sizes}) with α={args.alpha_vpa}, α_c={args.alpha_c_vpa}, lrs {args.critic_lr}/"
          f"{args.cost_critic_lr} on {device}")

    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    pairs = before = after = None  # the Spearman diagnostic's pairs and its tables before VPA and at the last check

    def log_spearman(step: int) -> dict:
        table = spearman_table(agent, pairs, device)
        for key, rho in table.items():
            writer.add_scalar(f"eval/spearman_{key.replace('/', '_')}", rho, step)
        return table

    start = time.time()
    if args.diagnostic:  # own RNG stream: the VPA run is the same with or without the diagnostic
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            pairs = collect_pairs(make_env(args.env_id, args.seed + 1), agent.actor, args, device)
        before = log_spearman(0)
        print(f"diagnostic: {args.diagnostic_pairs} states × {PAIR_KINDS}, horizon {args.mc_horizon}, "
              f"{time.time() - start:.0f}s; before VPA: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()))

    generator = torch.Generator(device=device).manual_seed(args.seed)
    first_step = 1
    if resume is not None:  # the critics, optimizer and random states of the step the run stopped after
        state = resume["vpa_resume"]
        if state["device"] != device.type:  # RNG states do not carry over between devices
            raise InputError(f"--resume {args.resume}: ran on {state['device']}, not {device.type}")
        for name in ("critic", "critic_target", "cost_critic", "cost_critic_target"):
            getattr(agent, name).load_state_dict(resume[name])
        agent.critics_opt.load_state_dict(state["critics_opt"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])  # Bullet's reset noise
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["sampler"])
        if device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        before, after, first_step = state["before"], state["after"], resume["step"] + 1

    def save_resume(step: int) -> None:
        """Everything that carries over from `step` to the next: --resume continues bit for bit from here."""
        numpy_state = np.random.get_state()
        rng = {"python": random.getstate(), "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
               "torch": torch.get_rng_state(), "sampler": generator.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
        save_checkpoint(resume_path, {
            "step": step, "args": asdict(args), **{name: getattr(agent, name).state_dict() for name in (
                "critic", "critic_target", "cost_critic", "cost_critic_target")},
            "vpa_resume": {"save_path": os.path.abspath(save_path), "device": device.type, "rng": rng,
                           "critics_opt": agent.critics_opt.state_dict(), "before": before,
                           "after": after}})

    # Ctrl-C stops the run at the end of the current step, where its state is whole, and keeps it for --resume
    stop = []
    default_sigint = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    start = time.time()
    progress = tqdm(range(first_step, args.total_steps + 1), desc="vpa", initial=first_step - 1,
                    total=args.total_steps, dynamic_ncols=True)
    for step in progress:
        idx = torch.randint(num_transitions, (args.batch_size,), device=device, generator=generator)
        info = agent.update({k: v[idx] for k, v in data.items()})
        if step % 100 == 0 or step == args.total_steps:  # one host sync per 100 steps
            values = torch.stack(list(info.values())).tolist()
            for tag, value in zip(info, values):
                writer.add_scalar(tag, value, step)
            writer.add_scalar("charts/SPS", step / (time.time() - start), step)
            progress.set_postfix(critic=f"{values[0]:.3g}", cost_critic=f"{values[1]:.3g}")
        if pairs is not None and (step % args.eval_every == 0 or step == args.total_steps):
            after = log_spearman(step)
        if step % args.eval_every == 0 and step < args.total_steps:
            save_resume(step)  # a killed run loses at most --eval-every steps
        if stop:
            save_resume(step)
            progress.close()
            writer.close()
            signal.signal(signal.SIGINT, default_sigint)
            raise KeyboardInterrupt(f"interrupted at step {step}: resumable checkpoint {resume_path}; continue "
                                    f"with --resume {resume_path}")
    signal.signal(signal.SIGINT, default_sigint)
    sps = (args.total_steps - first_step + 1) / (time.time() - start)
    if os.path.exists(resume_path):
        os.remove(resume_path)  # the run is complete: nothing left to resume

    result = evaluate(agent.actor, env, args.eval_episodes, args.cost_limit, device)  # μ is unchanged
    for k, v in result.items():
        writer.add_scalar(f"eval/{k}", v, args.total_steps)
    writer.close()
    summary = {key: {"before": before[key], "after": after[key]} for key in before} if pairs is not None else None
    out = {k: v for k, v in ckpt.items() if k not in ("format", "optimizers")}  # offline optimizer state is stale
    out.update({"algo": f"{ckpt['algo']}+vpa", "cost_limit": args.cost_limit, "step": args.total_steps,
                "critic": agent.critic.state_dict(), "critic_target": agent.critic_target.state_dict(),
                "cost_critic": agent.cost_critic.state_dict(),
                "cost_critic_target": agent.cost_critic_target.state_dict(), "lagrange": None, "args": asdict(args),
                "init": {"path": args.init, "algo": ckpt["algo"], "step": ckpt["step"], "eval": ckpt.get("eval"),
                         "args": ckpt.get("args")},
                "eval": {**result, "step": args.total_steps}, "spearman": summary})
    save_checkpoint(save_path, out)
    if pairs is not None:
        report_spearman(before, after, pairs, save_path.removesuffix(".pt") + "_spearman.csv")
    print(f"\nμ ({ckpt['algo']}, unchanged): return {result['return']:.1f}, cost {result['cost']:.1f}, normalised "
          f"{result['normalized_return']:.3f} / {result['normalized_cost']:.3f}")
    print(f"VPA: {args.total_steps} steps at {sps:.0f} steps/s; checkpoint: {save_path}")
    return {"eval": result, "spearman": summary, "sps": sps}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:
        sys.exit(f"vpa.py: error: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C: main says what it saved; before training there is nothing to save
        print(f"vpa.py: {str(e) or 'interrupted before training started: nothing was saved'}", file=sys.stderr)
        sys.exit(130)
