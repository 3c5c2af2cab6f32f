"""FamO2O-Lag: a safe "Train Once, Get a Family" (Wang et al., NeurIPS 2023) baseline in one file.

    python famo2o_lag.py --env-id OfflineCarRun-v0            # offline (100k steps) → family sweep → online

A *universal* SAC-Lag+BC actor π(a|s, β) is trained for a whole family of balances β ∈ [β_min, β_max] between
improving the Lagrangian value and staying near the data, and a *balance model* π_b(β|s) picks β per state.
β enters the actor as a 6-dim encoding e(β) = [sin(β/k), cos(β/k)] for k = 1, 10000^(1/3), 10000^(2/3), so the
actor is the shared tanh-Gaussian `Actor` with obs_dim + 6 inputs. Per gradient step on (s, a, r, c, s', term):
    β       offline: β ~ U[β_min, β_max] per sample;  online: β ~ π_b(·|s), detached
    y   = r + γ(1−term)·( min Q'(s', a') − α·log π(a'|s', β) ),   a' ~ π(·|s', β)   (the sample's own β)
    y_c = c + γ(1−term)·Qc'(s', a')
    L_π = mean( α·log π(ã|s,β) − β·(min Q(s,ã) − λ·Qc(s,ã))/ν + ‖tanh μ(s,β) − a‖² ),  ν = sg(mean|Q − λQc|)
    L_b = mean( α_b·log π_b(β|s) − (min Q(s,ā) − λ·Qc(s,ā))/ν_b ),  β ~ π_b(·|s) reparameterised, ā = tanh μ(s,β)
    α_b autotuned towards the target entropy −0.5;  λ ← max(0, λ + η·(mean Qc(s, ā) − q_thres))
Larger β weights improvement over behaviour cloning, so fixed β ∈ {1, 3, 5} after offline training gives a
return/cost trade-off from one run: the "family sweep" (printed, saved as <save-path stem>_family.csv and .png).

Design choices (this project's safe adaptation; the paper's FamO2O wraps AWAC/IQL without costs):
  * The balance model is trained offline too (the actor on uniform β, the balance model on its own β), so the
    online phase starts with a sensible one. It is the shared `Actor` with one output b = tanh(u) ∈ [−1, 1],
    mapped to β = β_min + (b + 1)/2·(β_max − β_min); its log-probability (and so the entropy target −0.5) is that
    of b, like SAC's actions. The temperature starts at --balance-alpha 0.1. Its objective uses the actor's
    deterministic action, with ν_b = sg(mean|Q − λQc|) over that batch (both ν floored at 1e-6).
  * λ: plain projected dual ascent, once per gradient step, on the critic's estimate of the cost of the policy that
    acts (β ~ π_b, the actor's deterministic action ā) against q_thres = d(1−γ^T)/((1−γ)T) (CarRun 8.660).
    Offline there are no episodes, so this is the only signal; online the same rule and --lambda-lr continue from
    the offline λ (so the carried λ keeps its meaning; the online cost critic learns the real costs).
  * Only the BC term keeps the offline actor near the data (as TD3+BC): no CQL/CPQ critic penalty.
  * Offline selection as Marvel's CPQ stage: the best evaluation (β from the balance model, deterministic) by
    cpq.py's threshold-aware rule is kept and restored; the family sweep and the online phase start from it.
  * Offline lrs: actor and balance 1e-4 / critics 1e-3 (CPQ's), batch 256 (CPQ uses 512; halving it halves CPU
    time). Online: sac_lag_apid.py's schedule, per-env lrs and α (ENV_DEFAULTS), fresh optimizers, an empty
    replay buffer whose actions are the BC targets, batch 64. α (SAC entropy weight) is the env's in both phases.
  * Online β: collection samples β ~ π_b and a ~ π; evaluation is deterministic in both. Updates use a sampled β,
    so the members around the chosen balance keep training. Logged: the balance model's mean β over the states
    visited in each iteration (famo2o/beta_mean, famo2o/beta_std, a histogram famo2o/beta, CSV columns).
Checkpoints (<stem>_offline.pt after the sweep, save_path at the end) follow docs/checkpoints.md plus `balance`,
`beta_range` and `balance_log_alpha`; the actor takes obs_dim + 6 inputs, so sac_lag_apid.py cannot load them.
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
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    # help that spans lines is one implicitly joined string: tyro keeps the line breaks of a multi-line docstring
    exp_name: str = "famo2o_lag"
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
    dataset_path: Optional[str] = None
    """DSRL-format HDF5 file; default: DSRL cache, then datasets/<env-id>.hdf5, then download"""
    save_path: Optional[str] = None
    """final checkpoint (default runs/<run-name>/famo2o.pt); beside it *_offline.pt, *_family.csv/png, *_progress.csv"""
    resume: Optional[str] = None
    ("a *_offline_resume.pt file (written beside the checkpoints at every offline evaluation and on Ctrl-C) to "
     "continue the offline phase from; the family sweep and the online phase then run as usual")
    cost_limit: float = 20.0
    """episode cost limit d (undiscounted sum of per-step costs)"""
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
    alpha: Optional[float] = None
    ("SAC entropy coefficient α of the universal actor, both phases (default per env: BallCircle 1e-3, BallRun 1e-3, "
     "CarCircle 1e-3, CarRun 5e-3, DroneCircle 5e-3, DroneRun 1e-3, AntCircle 5e-5, AntRun 1e-4)")

    # --- the family: β, the balance model and λ
    beta_min: float = 1.0
    """smallest balance β (most behaviour cloning)"""
    beta_max: float = 5.0
    """largest balance β (most improvement of Q − λQc)"""
    family_betas: Tuple[float, ...] = (1.0, 3.0, 5.0)
    """fixed β values evaluated after offline training (the family sweep; each in [β_min, β_max])"""
    balance_hidden_sizes: Tuple[int, ...] = (64, 64)
    """hidden layers of the balance model π_b(β|s)"""
    balance_lr: float = 1e-4
    """balance model learning rate (both phases)"""
    balance_alpha: float = 0.1
    """initial entropy temperature α_b of the balance model (autotuned)"""
    balance_alpha_lr: float = 3e-4
    """learning rate of log α_b"""
    balance_target_entropy: float = -0.5
    """target entropy of π_b (of its squashed output in [−1, 1])"""
    lambda_lr: float = 1e-3
    """η of λ ← max(0, λ + η·(mean Qc(s, ā) − q_thres)), once per gradient step, both phases"""
    lambda_init: float = 0.0
    """λ at the start of offline training"""

    # --- offline phase
    offline_steps: int = 100_000
    """offline gradient steps"""
    batch_size: int = 256
    """offline minibatch size"""
    eval_every: int = 5_000
    """evaluate (and maybe keep as best) every this many offline steps"""
    offline_actor_lr: float = 1e-4
    """offline actor learning rate"""
    offline_critic_lr: float = 1e-3
    """offline reward and cost critic learning rate"""

    # --- online phase (sac_lag_apid.py's schedule)
    online_episodes: Optional[int] = None
    """online episodes (default per env: Ball*/Car* 500, DroneCircle 1000, others 5000)"""
    episodes_per_iter: int = 5
    """stochastic episodes collected per iteration"""
    updates_per_iter: int = 20
    """gradient steps per iteration"""
    online_batch_size: int = 64
    """online minibatch size"""
    online_eval_every: int = 100
    """evaluate every this many online episodes"""
    actor_lr: Optional[float] = None
    ("online actor learning rate (default per env: BallCircle 5e-5, BallRun 1e-5, CarCircle 5e-4, CarRun 5e-5, "
     "DroneCircle 5e-6, DroneRun 2e-6, AntCircle 5e-5, AntRun 5e-5)")
    critic_lr: Optional[float] = None
    ("online reward critic learning rate (default per env: BallCircle 5e-3, BallRun 5e-3, CarCircle 5e-3, CarRun 5e-3, "
     "DroneCircle 8e-4, DroneRun 8e-3, AntCircle 5e-4, AntRun 2e-3)")
    cost_critic_lr: Optional[float] = None
    ("online cost critic learning rate (default per env: BallCircle 5e-3, BallRun 5e-3, CarCircle 8e-3, CarRun 8e-3, "
     "DroneCircle 2e-3, DroneRun 5e-3, AntCircle 8e-4, AntRun 5e-3)")


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


def log_scalars(writer: SummaryWriter, prefix: str, info: dict, step: int) -> None:
    """One host sync for a dict of 0-dim tensors (never a .item() per value)."""
    for tag, value in zip(info, torch.stack(list(info.values())).tolist()):
        writer.add_scalar(prefix + tag, value, step)


# ----------------------------------------------------------------------------------------------------------
# The family: β encoding, the balance model π_b(β|s), and the policy that acts (universal actor + chosen β).
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


# ----------------------------------------------------------------------------------------------------------
# FamO2O-Lag: SAC-Lag+BC universal actor, twin reward critic, cost critic, balance model, dual-ascent λ.
class FamO2OLag(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, alpha: float, q_thres: float):
        super().__init__()
        self.args, self.alpha, self.q_thres = args, alpha, q_thres
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

    def critic_targets(self, reward, cost, next_obs, term, beta):
        """y = r + γ(1−term)(min Q'(s',a') − α log π(a'|s',β)),  y_c = c + γ(1−term)·Qc'(s',a'),  a' ~ π(·|s',β)."""
        with torch.no_grad():
            next_act, next_log_prob = self.actor(condition(next_obs, beta))
            soft_value = self.critic_target(next_obs, next_act).min(0).values - self.alpha * next_log_prob
            y = reward + self.args.gamma * (1 - term) * soft_value
            y_c = cost + self.args.gamma * (1 - term) * self.cost_critic_target(next_obs, next_act)[0]
        return y, y_c

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
        if beta is None:
            with torch.no_grad():
                beta = self.balance(obs)[0]
        y, y_c = self.critic_targets(reward, cost, next_obs, term, beta)
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
        self.actor.requires_grad_(True)
        self.critic.requires_grad_(True)
        self.cost_critic.requires_grad_(True)
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
            try:
                getattr(self, name).load_state_dict(ckpt[name])
            except (KeyError, RuntimeError) as e:
                raise InputError(f"checkpoint '{name}' does not fit this architecture ({str(e).splitlines()[0]})")
        with torch.no_grad():
            self.lam.fill_(ckpt["lagrange"]["lam"])
            self.balance_log_alpha.copy_(ckpt["balance_log_alpha"])


# ----------------------------------------------------------------------------------------------------------
# The three phases: offline training, the family sweep, online finetuning.
def offline_phase(args: Args, agent: FamO2OLag, data: dict, env: gym.Env, writer: SummaryWriter, save_path: str,
                  device: torch.device, stop: list, resume: Optional[dict] = None) -> Tuple[dict, float]:
    """Offline training; returns the best evaluated checkpoint (cpq.py's rule, also saved to `save_path`) and the
    training speed in gradient steps/s (evaluations excluded). The whole state is kept in *_offline_resume.pt at
    every evaluation and when `stop` (Ctrl-C) ends it; `resume` (one such file) continues it bit for bit."""
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    policy = FamilyPolicy(agent.actor, agent.balance)  # β from the balance model, as deployed
    generator = torch.Generator(device=device).manual_seed(args.seed)
    resume_path = save_path.removesuffix(".pt") + "_resume.pt"
    num_transitions, best, eval_time, start, first_step = len(data["rewards"]), None, 0.0, time.time(), 1
    if resume is not None:  # the state save_resume wrote, in place of the fresh one
        state = resume["resume"]
        agent.load(resume)
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
        if state["has_best"]:  # the best evaluation so far is the file save_path holds
            best = torch.load(save_path, map_location="cpu", weights_only=True)
        first_step = resume["step"] + 1

    def save_resume(step: int) -> None:
        """Everything that carries over from `step` to the next."""
        numpy_state = np.random.get_state()
        rng = {"python": random.getstate(), "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
               "torch": torch.get_rng_state(), "sampler": generator.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
        save_checkpoint(resume_path, {**agent.checkpoint(args, args.env_id, obs_dim, act_dim, step), "resume": {
            "save_path": os.path.abspath(save_path), "device": device.type, "has_best": best is not None,
            "optimizers": {k: v.state_dict() for k, v in vars(agent).items() if isinstance(v, torch.optim.Optimizer)},
            "eval_action": None if env.action is None else torch.as_tensor(env.action), "rng": rng}})

    progress = tqdm(range(first_step, args.offline_steps + 1), desc="famo2o offline", initial=first_step - 1,
                    total=args.offline_steps, dynamic_ncols=True)
    for step in progress:
        idx = torch.randint(num_transitions, (args.batch_size,), device=device, generator=generator)
        # β ~ U[β_min, β_max] per sample: every member of the family learns from every state
        beta = torch.rand(args.batch_size, device=device, generator=generator)
        beta = args.beta_min + (args.beta_max - args.beta_min) * beta
        info = agent.update(*(data[k][idx] for k in REPLAY_KEYS), beta=beta)
        if step % 100 == 0:  # one host sync per 100 steps
            log_scalars(writer, "offline/", info, step)
            writer.add_scalar("offline/charts/SPS", step / (time.time() - start - eval_time), step)
        if step % args.eval_every == 0 or step == args.offline_steps:
            eval_start = time.time()
            result = evaluate(policy, env, args.eval_episodes, args.cost_limit, device)
            for k, v in result.items():
                writer.add_scalar(f"offline/eval/{k}", v, step)
            progress.set_postfix(ret=f"{result['return']:.1f}", cost=f"{result['cost']:.1f}",
                                 lam=f"{float(agent.lam):.3f}")
            progress.write(f"step {step}: eval return {result['return']:.1f}, cost {result['cost']:.1f} "
                           f"(normalised {result['normalized_return']:.3f} / {result['normalized_cost']:.3f}), "
                           f"λ {float(agent.lam):.3f}")
            if is_better(result, best and best["eval"]):
                # deep copy: the state dicts hold the live parameters, which keep training
                best = copy.deepcopy({**agent.checkpoint(args, args.env_id, obs_dim, act_dim, step),
                                      "eval": {**result, "step": step}})
                save_checkpoint(save_path, best)
            save_resume(step)  # a killed run loses at most --eval-every steps
            eval_time += time.time() - eval_start
        if stop:
            save_resume(step)
            progress.close()
            raise KeyboardInterrupt(f"interrupted in the offline phase at step {step}: resumable state "
                                    f"{resume_path}; continue with --resume {resume_path}")
    os.remove(resume_path)  # the offline phase is complete: nothing left to resume
    return best, (args.offline_steps - first_step + 1) / (time.time() - start - eval_time)


def family_sweep(args: Args, agent: FamO2OLag, env: gym.Env, stem: str, device: torch.device,
                 balance_eval: dict) -> list:
    """Deterministic evaluation of π(·|s, β) at each fixed β of --family-betas: a return/cost trade-off from one
    offline run. Writes <stem>_family.csv (and <stem>_family.png, with `balance_eval` marked, when matplotlib is
    installed)."""
    rows = [{"beta": beta, **evaluate(FamilyPolicy(agent.actor, agent.balance, beta), env, args.eval_episodes,
                                      args.cost_limit, device)} for beta in args.family_betas]
    with open(stem + "_family.csv", "w") as f:
        f.write("beta,return,cost,normalized_return,normalized_cost\n")
        for r in rows:
            f.write(f"{r['beta']},{r['return']:.4f},{r['cost']:.4f},{r['normalized_return']:.4f},"
                    f"{r['normalized_cost']:.4f}\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return rows
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


def online_phase(args: Args, agent: FamO2OLag, env: gym.Env, writer: SummaryWriter, save_path: str,
                 device: torch.device, online_episodes: int) -> dict:
    """sac_lag_apid.py's loop: iterations of `episodes_per_iter` stochastic episodes (β ~ π_b, a ~ π) into an empty
    replay buffer, then `updates_per_iter` updates with β from the balance model. Saves the final checkpoint."""
    # reseed as marvel_full.py's online stage does: the online episodes (Bullet's reset noise is np.random) then
    # see the same noise as the other methods' online phases for the same seed
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    envs = [make_env(args.env_id, args.seed + i) for i in range(args.episodes_per_iter)]
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    policy = FamilyPolicy(agent.actor, agent.balance)
    replay = ReplayBuffer(online_episodes * env.spec.max_episode_steps, obs_dim, act_dim, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    csv_path = save_path.removesuffix(".pt") + "_progress.csv"
    csv = open(csv_path, "w")
    csv.write("episodes,env_steps,return,cost,lambda,beta_mean,beta_std,violations,cumulative_cost,"
              "eval_return,eval_cost,eval_normalized_return,eval_normalized_cost\n")

    def log_eval(episodes_done: int, env_steps: int) -> dict:
        nonlocal evaluated_at
        evaluated_at = episodes_done
        result = evaluate(policy, env, args.eval_episodes, args.cost_limit, device)
        for k, v in result.items():
            writer.add_scalar(f"eval/{k}", v, env_steps)
        csv.write(f"{episodes_done},{env_steps},,,,,,,," + ",".join(f"{result[k]:.4f}" for k in (
            "return", "cost", "normalized_return", "normalized_cost")) + "\n")
        return result

    env_steps = episodes_done = violations = evaluated_at = 0
    cumulative_cost, lam, beta_mean, interrupted, start = 0.0, float(agent.lam), float("nan"), False, time.time()
    first_eval = last_eval = log_eval(0, 0)
    progress = tqdm(range(math.ceil(online_episodes / args.episodes_per_iter)), desc="famo2o online",
                    dynamic_ncols=True)
    try:
        for _ in progress:
            n = min(args.episodes_per_iter, online_episodes - episodes_done)
            batch, returns, costs = collect_episodes(envs[:n], policy, device)
            replay.add({**batch, "rewards": batch["rewards"] * args.reward_scale})
            env_steps += len(batch["rewards"])
            episodes_done += n
            violations += int((costs > args.cost_limit).sum())
            cumulative_cost += float(costs.sum())
            for _ in range(args.updates_per_iter):
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
                       "charts/SPS": env_steps / (time.time() - start)}
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, env_steps)
            csv.write(f"{episodes_done},{env_steps},{returns.mean():.4f},{costs.mean():.4f},{lam:.6f},"
                      f"{beta_mean:.4f},{values['famo2o/beta_std']:.4f},{violations},{cumulative_cost:.1f},,,,\n")
            csv.flush()  # a stopped run keeps its progress
            if episodes_done // args.online_eval_every > (episodes_done - n) // args.online_eval_every:
                last_eval = log_eval(episodes_done, env_steps)
            progress.set_postfix(ret=f"{returns.mean():.0f}", cost=f"{costs.mean():.1f}", lam=f"{lam:.3f}",
                                 beta=f"{beta_mean:.2f}")
    except KeyboardInterrupt:  # keep the work done so far
        save_path, interrupted = save_path.removesuffix(".pt") + "_interrupted.pt", True
        print(f"\ninterrupted after {episodes_done} episodes")
    if evaluated_at != episodes_done:  # the final evaluation is of the final actor, also after an interrupt
        last_eval = log_eval(episodes_done, env_steps)
    csv.close()
    ckpt = agent.checkpoint(args, args.env_id, obs_dim, act_dim, env_steps)
    save_checkpoint(save_path, {**ckpt, "eval": last_eval})
    return {"start": first_eval, "final": last_eval, "online_violations": violations, "episodes": episodes_done,
            "cumulative_cost": cumulative_cost, "lambda": lam, "beta_mean": beta_mean, "interrupted": interrupted,
            "checkpoint": save_path, "progress": csv_path, "wall_seconds": time.time() - start}


def check_args(args: Args) -> None:
    """Every rule on this file's flags (per-env defaults filled in), before any work: one line naming the first flag
    that breaks its rule (the β range is checked in main)."""
    refuse_bad_flags(flag_rules(args, counts=("offline_steps", "batch_size", "eval_every", "eval_episodes",
                                              "episodes_per_iter", "updates_per_iter", "online_batch_size",
                                              "online_eval_every"),
                                rates=("alpha", "balance_alpha", "balance_lr", "balance_alpha_lr", "offline_actor_lr",
                                       "offline_critic_lr", "actor_lr", "critic_lr", "cost_critic_lr", "reward_scale"))
                     + [("online_episodes", args.online_episodes, args.online_episodes >= 0, ">= 0"),
                        ("lambda_lr", args.lambda_lr, args.lambda_lr >= 0, ">= 0 (0: λ stays at --lambda-init)"),
                        ("lambda_init", args.lambda_init, args.lambda_init >= 0, ">= 0"),
                        ("balance_hidden_sizes", args.balance_hidden_sizes,
                         len(args.balance_hidden_sizes) > 0 and min(args.balance_hidden_sizes) >= 1,
                         "one or more sizes >= 1")])


def main(args: Args) -> dict:
    if args.env_id not in ENV_DEFAULTS:
        raise InputError(f"--env-id {args.env_id}: no online defaults; choose one of {sorted(ENV_DEFAULTS)}")
    actor_lr, critic_lr, cost_critic_lr, alpha, episodes = ENV_DEFAULTS[args.env_id]
    lrs = tuple(default if given is None else given for given, default in
                zip((args.actor_lr, args.critic_lr, args.cost_critic_lr), (actor_lr, critic_lr, cost_critic_lr)))
    alpha = args.alpha if args.alpha is not None else alpha
    online_episodes = args.online_episodes if args.online_episodes is not None else episodes
    check_args(replace(args, actor_lr=lrs[0], critic_lr=lrs[1], cost_critic_lr=lrs[2], alpha=alpha,
                       online_episodes=online_episodes))
    if not 0 <= args.beta_min < args.beta_max:
        raise InputError(f"need 0 <= --beta-min < --beta-max, got {args.beta_min} and {args.beta_max}")
    outside = [b for b in args.family_betas if not args.beta_min <= b <= args.beta_max]
    if outside:
        raise InputError(f"--family-betas {outside} lie outside [--beta-min, --beta-max] = "
                         f"[{args.beta_min}, {args.beta_max}], where the family was never trained")
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

    env = RememberAction(make_env(args.env_id, args.seed + 10_000))  # evaluation env, apart from the online ones
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    resume = None
    if args.resume is not None:  # refused before any work unless it continues this very run
        resume = load_checkpoint(args.resume, args.env_id, obs_dim, act_dim, args.hidden_sizes)
        if resume["algo"] != "famo2o_lag" or "resume" not in resume:
            raise InputError(f"--resume {args.resume}: not a resumable checkpoint (famo2o_lag.py writes "
                             f"*_offline_resume.pt)")
        was, state = resume["args"], resume["resume"]
        changed = [f"--{k.replace('_', '-')} (was {was.get(k)})" for k, v in asdict(args).items()
                   if k not in ("exp_name", "track", "wandb_project_name", "cuda", "save_path", "resume")
                   and was.get(k) != (list(v) if isinstance(v, tuple) else v)]
        if args.save_path and os.path.abspath(args.save_path).removesuffix(".pt") + "_offline.pt" \
                != state["save_path"]:
            changed.append(f"--save-path (was {state['save_path'].removesuffix('_offline.pt')}.pt)")
        if state["device"] != device.type:  # RNG states do not carry over between devices
            changed.append(f"--cuda/--no-cuda (ran on {state['device']})")
        if changed:
            raise InputError(f"--resume {args.resume}: these flags differ from the interrupted run's: "
                             f"{', '.join(changed)}")
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    save_path = args.save_path or (resume["resume"]["save_path"].removesuffix("_offline.pt") + ".pt" if resume
                                   else os.path.join("runs", run_name, "famo2o.pt"))
    run_dir = prepare_output_dir(save_path)
    stem = save_path.removesuffix(".pt")
    path = find_dataset(args.env_id, env.unwrapped.dataset_url, args.dataset_path)
    data = {k: torch.as_tensor(v, device=device) for k, v in load_dataset(path, obs_dim, act_dim).items()}
    data["rewards"] = data["rewards"] * args.reward_scale
    q_thres = episode_q_threshold(args.cost_limit, args.gamma, env.spec.max_episode_steps)
    print(f"{args.env_id}: {len(data['rewards'])} transitions from {path}; q_thres={q_thres:.3f} on {device}")

    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    agent = FamO2OLag(obs_dim, act_dim, args, alpha, q_thres).to(device)

    # 1. offline: universal actor on β ~ U[β_min, β_max], balance model, λ; the best evaluation is kept. Ctrl-C
    # stops it at the end of a step, where its state is whole, and keeps that state for --resume
    start, stop = time.time(), []
    default_sigint = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    try:
        best, offline_sps = offline_phase(args, agent, data, env, writer, stem + "_offline.pt", device, stop, resume)
    finally:
        signal.signal(signal.SIGINT, default_sigint)  # the online phase handles Ctrl-C itself
        if stop:
            writer.close()
    agent.load(best)
    offline_wall = time.time() - start
    # 2. family sweep of the kept offline model, saved with it
    family = family_sweep(args, agent, env, stem, device, best["eval"])
    writer.add_text("family", "|β|return|cost|norm ret|norm cost|\n|-|-|-|-|-|\n" + "\n".join(
        f"|{r['beta']:g}|{r['return']:.1f}|{r['cost']:.1f}|{r['normalized_return']:.3f}|{r['normalized_cost']:.3f}|"
        for r in family))
    save_checkpoint(stem + "_offline.pt", {**best, "family": family})
    # 3. online: same networks and λ, fresh optimizers at the env's online lrs
    agent.set_optimizers(*lrs)
    online = online_phase(args, agent, env, writer, save_path, device, online_episodes)
    writer.close()

    rows = {f"offline ({best['eval']['step']})": best["eval"], **{f"β = {r['beta']:g}": r for r in family},
            "online start": online["start"], "final": online["final"]}
    print(f"\n{'':16}{'return':>9}{'cost':>7}{'norm ret':>10}{'norm cost':>11}")
    for name, r in rows.items():
        print(f"{name:16}{r['return']:>9.1f}{r['cost']:>7.1f}{r['normalized_return']:>10.3f}"
              f"{r['normalized_cost']:>11.3f}")
    print(f"offline: {args.offline_steps} steps at {offline_sps:.1f} steps/s, wall {offline_wall:.0f}s; family "
          f"sweep: {stem}_family.csv")
    print(f"online: {online['episodes']} episodes, {online['online_violations']} over the limit, cumulative cost "
          f"{online['cumulative_cost']:.0f}, final λ {online['lambda']:.4f}, last mean β {online['beta_mean']:.2f}, "
          f"wall {online['wall_seconds']:.0f}s")
    print(f"checkpoints: {stem}_offline.pt, {online['checkpoint']}   progress: {online['progress']}")
    return {**online, "offline": best["eval"], "family": family, "offline_steps_per_s": offline_sps}


if __name__ == "__main__":
    try:
        if main(tyro.cli(Args))["interrupted"]:
            sys.exit(130)  # partial results are saved, but the run did not finish
    except InputError as e:
        sys.exit(f"famo2o_lag.py: error: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C in the offline phase: it says what it kept
        print(f"famo2o_lag.py: {str(e) or 'interrupted before training started'}", file=sys.stderr)
        sys.exit(130)
