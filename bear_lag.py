"""BEAR-Lag: BEAR (Kumar et al. 2019) with a PID-Lagrangian cost constraint, for offline safe RL, in one file.

    python bear_lag.py --env-id OfflineCarRun-v0

Trains on a DSRL-format dataset and writes a checkpoint (format "o2o-safe-rl/1") that vpa.py and
sac_lag_apid.py load strictly. Per gradient step on a batch (s, a, r, c, s', term), N = --num-samples:
  1. VAE behaviour model of p(a|s) (as in cpq.py): L = MSE(decode(s, z), a) + β_kl·KL.
  2. Critics. N actions a'_1..N ~ π_targ(·|s') from the Polyak-averaged target actor; per action the mix
     q' = 0.75·min_i Q'_i + 0.25·max_i Q'_i over the 2-critic target ensemble, then the max over the N actions:
        y   = r + γ(1−term)·max_n q'(s', a'_n)           L   = Σ_i MSE(Q_i(s, a), y)
        y_c = c + γ(1−term)·max_n Qc'(s', a'_n)          L_c = MSE(Qc(s, a), y_c)   (max: pessimistic about cost)
  3. Actor. N pre-tanh policy samples u_n = μ(s) + σ(s)·ε_n and N pre-tanh VAE samples (decoder output before
     its tanh); ã = tanh(u_1) scores the critics; λ_k from the PID on mean Qc(s, ã) (step 4), then
        L_π = mean( −min_i Q_i(s, ã) + α·(MMD(s) − ε) ) + λ_k·mean( Qc(s, ã) − qc_thres )
  4. λ_k: PID Lagrangian on e_k = mean Qc(s, ã) − qc_thres (see QcPIDLagrangian), non-negative, every step.
  5. α by dual ascent in log-space: an Adam step on −log α·(mean MMD − ε), so α rises while MMD > ε and falls
     below it; log α clipped to [−5, 5].
  6. Polyak-average the target critics and the target actor.
MMD: the biased estimate with OSRL's Gaussian kernel k(x, y) = exp(−‖x − y‖²/(2σ)), σ = 50 (see gaussian_mmd).
qc_thres = 1.5·q_thres with q_thres = d·(1−γ^T)/((1−γ)·T) (CarRun, d = 20: 12.99).
Differences from OSRL's BEARL: the PID is updated once per step (OSRL evaluates its actor loss twice per step, so
its controller integrates twice), α's step reuses this step's MMD instead of a second actor forward, the cost
target is cut by `term` like the reward target (OSRL never cuts it), one cost critic instead of OSRL's cost
ensemble, and qc_thres = 1.5·q_thres where OSRL uses q_thres itself.
"""
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
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
    exp_name: str = "bear_lag"
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
    """checkpoint path (default runs/<run-name>/bear_lag.pt); the last step is saved beside it as *_last.pt"""
    resume: Optional[str] = None
    """a *_resume.pt file (written beside the checkpoint at every evaluation and on Ctrl-C) to continue from"""
    cost_limit: float = 20.0
    """episode cost limit d (undiscounted sum of per-step costs)"""
    total_steps: int = 50_000
    """gradient steps (the Marvel paper's budget; OSRL's default is 300 000)"""
    batch_size: int = 512
    """minibatch size"""
    eval_every: int = 5_000
    """evaluate (and maybe keep as best) every this many steps"""
    eval_episodes: int = 10
    """deterministic evaluation episodes"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target critics and the target actor"""
    reward_scale: float = 0.1
    """rewards are multiplied by this in training (returns are reported unscaled)"""
    hidden_sizes: Tuple[int, ...] = (256, 256)
    """hidden layers of actor and critics"""
    actor_lr: float = 1e-3
    """actor learning rate"""
    critic_lr: float = 1e-3
    """reward and cost critic learning rate"""
    vae_lr: float = 1e-3
    """VAE learning rate"""
    alpha_lr: float = 1e-3
    """learning rate of log α (weight of the MMD constraint)"""
    vae_hidden: int = 400
    """VAE hidden width (two layers each in encoder and decoder)"""
    kl_weight: float = 0.5
    """β_kl of the VAE loss"""
    num_samples: int = 10
    """N: target-actor actions per s' in the critic targets, and policy / VAE samples per state in the MMD"""
    target_mix: float = 0.75
    """weight of the ensemble minimum in the target value mix·min_i Q'_i + (1 − mix)·max_i Q'_i"""
    mmd_sigma: float = 50.0
    """σ of the Gaussian MMD kernel exp(−‖x − y‖² / (2σ)) on pre-tanh actions (OSRL's value and form)"""
    mmd_epsilon: float = 0.05
    """ε: the MMD constraint MMD ≤ ε that α enforces"""
    kp: float = 0.1
    """K_p of the PID Lagrangian on mean Qc(s, ã) − qc_thres"""
    ki: float = 0.003
    """K_i of the PID Lagrangian"""
    kd: float = 0.001
    """K_d of the PID Lagrangian"""
    qc_thres_factor: float = 1.5
    """qc_thres = factor · q_thres"""


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
# Per-step cost budget and the behaviour VAE (as in cpq.py).
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


# ----------------------------------------------------------------------------------------------------------
# BEAR-Lag.
def sample_pretanh(actor: Actor, obs: torch.Tensor, num: int):
    """`num` reparameterised samples per state from the shared Actor's Gaussian, after and before the tanh:
    returns (tanh(u), u), each (B, num, A), with u_n = μ(s) + σ(s)·ε_n — the same distribution as Actor.forward
    (same heads, same log σ clamp), with one trunk pass per state instead of one per sample."""
    h = actor.trunk(obs)
    mu, log_std = actor.mu(h), actor.log_std(h).clamp(-20.0, 2.0)
    noise = torch.randn(len(obs), num, mu.shape[-1], device=obs.device)
    u = mu.unsqueeze(1) + log_std.exp().unsqueeze(1) * noise
    return torch.tanh(u), u


def vae_pretanh_samples(vae: VAE, obs: torch.Tensor, num: int) -> torch.Tensor:
    """`num` behaviour actions per state from the VAE, *before* its tanh: decoder(s, z) with the clipped prior
    sample z ~ N(0, I) clamped to [−0.5, 0.5] that VAE.decode uses, so tanh of the result is VAE.decode(s).
    (The decoder output is the exact pre-image of the decoded action; atanh of a clamped action would not be.)
    Returns (B, num, A)."""
    z = torch.randn(len(obs), num, vae.latent_dim, device=obs.device).clamp(-0.5, 0.5)
    return vae.decoder(torch.cat([obs.unsqueeze(1).expand(-1, num, -1), z], -1))


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-state MMD between sample sets x (B, N, A) and y (B, M, A), with OSRL's (and BEAR's code's) kernel
        k(a, b) = exp(−‖a − b‖² / (2σ))                 σ itself, not σ², in the denominator
        MMD(x, y) = sqrt( mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) − 2·mean_ij k(x_i, y_j) + 1e-6 )
    the biased (V-statistic) estimate: every mean runs over all pairs, i = j included. Returns (B,)."""
    def mean_kernel(a, b):
        return torch.exp(-(a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1) / (2.0 * sigma)).mean((1, 2))
    return (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y) + 1e-6).sqrt()


def mixed_max_target(q_next: torch.Tensor, num_samples: int, mix: float) -> torch.Tensor:
    """BEAR's value of s' from an ensemble's values of N sampled actions. q_next is (num_q, B·N), state-major
    (column b·N + n is state b, sample n). Per sample mix·min_i Q_i + (1 − mix)·max_i Q_i, then the max over the
    N samples. Returns (B,). With one member (the cost critic) the mix is that member's value."""
    mixed = mix * q_next.min(0).values + (1.0 - mix) * q_next.max(0).values
    return mixed.view(-1, num_samples).max(1).values


class QcPIDLagrangian:
    """PID Lagrange multiplier of BEAR-Lag's actor (OSRL's LagrangianPIDController, one update per gradient step).
    Input at step k: the batch mean of Qc(s, ã). With e_k = mean Qc(s, ã) − qc_thres and I_0 = e_0 = 0:
        I_k = max(0, I_{k−1} + e_k)                        anti-windup integral, in Qc units
        D_k = max(0, e_k − e_{k−1})                        only a rising error pushes λ up
        λ_k = max(0, K_p·max(0, e_k) + K_i·I_k + K_d·D_k)
    The state is kept in 0-dim tensors (on the device of the input after the first update), so updating it every
    step costs no host sync; state_dict() reads it back as plain floats."""

    def __init__(self, qc_thres: float, kp: float, ki: float, kd: float):
        self.qc_thres, self.kp, self.ki, self.kd = qc_thres, kp, ki, kd
        self.integral, self.prev_error, self.lam = torch.zeros(()), torch.zeros(()), torch.zeros(())

    @torch.no_grad()
    def update(self, qc_mean: torch.Tensor) -> torch.Tensor:
        error = qc_mean.detach() - self.qc_thres
        self.integral = (self.integral + error).clamp_min(0.0)
        derivative = (error - self.prev_error).clamp_min(0.0)
        self.prev_error = error
        self.lam = (self.kp * error.clamp_min(0.0) + self.ki * self.integral + self.kd * derivative).clamp_min(0.0)
        return self.lam

    def state_dict(self) -> dict:
        return {"kind": "qc_pid", "lam": float(self.lam), "kp": self.kp, "ki": self.ki, "kd": self.kd,
                "integral": float(self.integral), "prev_error": float(self.prev_error), "qc_thres": self.qc_thres}


class BEARLag(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, q_thres: float):
        super().__init__()
        self.args, self.q_thres, self.qc_thres = args, q_thres, args.qc_thres_factor * q_thres
        self.actor = Actor(obs_dim, act_dim, args.hidden_sizes)
        self.actor_target = Actor(obs_dim, act_dim, args.hidden_sizes)
        self.critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic_target = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.cost_critic_target.load_state_dict(self.cost_critic.state_dict())
        self.vae = VAE(obs_dim, act_dim, args.vae_hidden)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.lagrangian = QcPIDLagrangian(self.qc_thres, args.kp, args.ki, args.kd)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, fused=True)
        # both critics in one optimizer (same lr): their losses are independent, so one backward serves both
        self.critics_opt = torch.optim.Adam([*self.critic.parameters(), *self.cost_critic.parameters()],
                                            lr=args.critic_lr, fused=True)
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=args.vae_lr, fused=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.alpha_lr)

    def critic_targets(self, reward, cost, next_obs, term):
        """y = r + γ(1−term)·max_n [mix·min_i Q'_i + (1−mix)·max_i Q'_i](s', a'_n),
        y_c = c + γ(1−term)·max_n Qc'(s', a'_n),  a'_1..N ~ π_targ(·|s'), all N·B pairs in one batched call."""
        args = self.args
        with torch.no_grad():
            next_act, _ = sample_pretanh(self.actor_target, next_obs, args.num_samples)
            obs_rep = next_obs.repeat_interleave(args.num_samples, 0)  # state-major, like next_act's (B, N) layout
            act_rep = next_act.reshape(len(obs_rep), -1)
            discount = args.gamma * (1 - term)
            q_next = mixed_max_target(self.critic_target(obs_rep, act_rep), args.num_samples, args.target_mix)
            qc_next = mixed_max_target(self.cost_critic_target(obs_rep, act_rep), args.num_samples, args.target_mix)
            return reward + discount * q_next, cost + discount * qc_next

    def actor_loss(self, obs):
        """L_π = mean(−min Q(s, ã) + α·(MMD − ε)) + λ·mean(Qc(s, ã) − qc_thres), λ updated on this batch first.
        The MMD compares N pre-tanh policy samples with N pre-tanh VAE samples per state; ã = tanh(u_1), the first
        policy sample, scores the critics (as OSRL). Returns (loss, per-state MMD, Q(s, ã), Qc(s, ã), λ)."""
        args = self.args
        act_pi, u_pi = sample_pretanh(self.actor, obs, args.num_samples)
        with torch.no_grad():
            u_data = vae_pretanh_samples(self.vae, obs, args.num_samples)
        mmd = gaussian_mmd(u_data, u_pi, args.mmd_sigma)
        act = act_pi[:, 0]
        q_pi = self.critic(obs, act).min(0).values
        qc_pi = self.cost_critic(obs, act)[0]
        lam = self.lagrangian.update(qc_pi.mean())
        alpha = self.log_alpha.exp().detach()
        loss = (-q_pi + alpha * (mmd - args.mmd_epsilon)).mean() + lam * (qc_pi - self.qc_thres).mean()
        return loss, mmd, q_pi, qc_pi, lam

    def update(self, obs, act, reward, cost, next_obs, term) -> dict:
        args = self.args
        # 1. behaviour VAE
        recon, kl = self.vae.loss(obs, act)
        vae_loss = recon + args.kl_weight * kl
        self.vae_opt.zero_grad(set_to_none=True)
        vae_loss.backward()
        self.vae_opt.step()

        # 2. both critics on the mixed, max-over-samples targets (one backward: the losses are independent)
        y, y_c = self.critic_targets(reward, cost, next_obs, term)
        critic_loss = F.mse_loss(self.critic(obs, act), y.expand(2, -1), reduction="none").mean(1).sum()
        cost_critic_loss = F.mse_loss(self.cost_critic(obs, act)[0], y_c)
        self.critics_opt.zero_grad(set_to_none=True)
        (critic_loss + cost_critic_loss).backward()
        self.critics_opt.step()

        # 3.-4. actor on the updated critics, with λ from the PID on this batch's mean Qc(s, ã)
        actor_loss, mmd, q_pi, qc_pi, lam = self.actor_loss(obs)
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()

        # 5. dual ascent on log α: raise α while mean MMD > ε (the MMD of this step's actor loss, before its step)
        mmd_mean = mmd.mean().detach()
        alpha_loss = -self.log_alpha * (mmd_mean - args.mmd_epsilon)
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        with torch.no_grad():
            self.log_alpha.clamp_(-5.0, 5.0)

        # 6. targets
        soft_update(self.critic_target, self.critic, args.tau)
        soft_update(self.cost_critic_target, self.cost_critic, args.tau)
        soft_update(self.actor_target, self.actor, args.tau)
        return {"losses/vae": vae_loss.detach(), "losses/critic": critic_loss.detach(),
                "losses/cost_critic": cost_critic_loss.detach(), "losses/actor": actor_loss.detach(),
                "losses/mmd": mmd_mean, "losses/alpha": self.log_alpha.detach().exp(),
                "losses/q_pi": q_pi.detach().mean(), "losses/qc_pi": qc_pi.detach().mean(), "lagrange/lambda": lam}

    def checkpoint(self, args: Args, env_id: str, obs_dim: int, act_dim: int, step: int) -> dict:
        return {"algo": "bear_lag", "env_id": env_id, "obs_dim": obs_dim, "act_dim": act_dim,
                "hidden_sizes": list(args.hidden_sizes), "reward_scale": args.reward_scale,
                "cost_limit": args.cost_limit, "step": step,
                "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "cost_critic": self.cost_critic.state_dict(),
                "cost_critic_target": self.cost_critic_target.state_dict(),
                "vae": self.vae.state_dict(), "actor_target": self.actor_target.state_dict(),
                "log_alpha": self.log_alpha.detach().clone(), "lagrange": self.lagrangian.state_dict(),
                "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()}}


def is_better(result: dict, best: Optional[dict]) -> bool:
    """Threshold-aware selection: among safe evaluations (normalised cost ≤ 1) the highest return; a safe one
    beats any unsafe one; among unsafe ones the lowest cost."""
    if best is None:
        return True
    safe, best_safe = result["normalized_cost"] <= 1, best["normalized_cost"] <= 1
    if safe != best_safe:
        return safe
    return result["return"] > best["return"] if safe else result["cost"] < best["cost"]


def check_args(args: Args) -> None:
    """Every rule on this file's flags, before any work: one line naming the first flag that breaks its rule."""
    refuse_bad_flags(flag_rules(args, counts=("total_steps", "batch_size", "eval_every", "eval_episodes", "vae_hidden",
                                              "num_samples"),
                                rates=("actor_lr", "critic_lr", "vae_lr", "alpha_lr", "reward_scale", "mmd_sigma",
                                       "qc_thres_factor")) + [
        ("target_mix", args.target_mix, 0 <= args.target_mix <= 1, "in [0, 1]"),
        ("kl_weight", args.kl_weight, args.kl_weight >= 0, ">= 0"),
        ("mmd_epsilon", args.mmd_epsilon, args.mmd_epsilon >= 0, ">= 0"),
        *((gain, getattr(args, gain), getattr(args, gain) >= 0, ">= 0") for gain in ("kp", "ki", "kd"))])


def main(args: Args) -> dict:
    check_args(args)
    # From here on Ctrl-C only sets a flag, read at the end of a training step (or evaluation), where the state is
    # whole and --resume can continue from it; before training it ends the run with one line. (Python's default
    # KeyboardInterrupt strikes at any bytecode, mid-update, and one raised inside a finalizer is dropped.)
    interrupted = []
    default_sigint = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    random.seed(args.seed)
    np.random.seed(args.seed)
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

    env = RememberAction(make_env(args.env_id, args.seed))
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    resume = None
    if args.resume is not None:  # refused before any work unless it continues this very run
        resume = load_checkpoint(args.resume, args.env_id, obs_dim, act_dim, args.hidden_sizes)
        if resume["algo"] != "bear_lag" or "resume" not in resume:
            raise InputError(f"--resume {args.resume}: not a resumable checkpoint (bear_lag.py writes *_resume.pt)")
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
                                   os.path.join("runs", run_name, "bear_lag.pt"))
    run_dir = prepare_output_dir(save_path)
    resume_path = save_path.removesuffix(".pt") + "_resume.pt"

    path = find_dataset(args.env_id, env.unwrapped.dataset_url, args.dataset_path)
    data = {k: torch.as_tensor(v, device=device) for k, v in load_dataset(path, obs_dim, act_dim).items()}
    data["rewards"] = data["rewards"] * args.reward_scale
    num_transitions = len(data["observations"])
    q_thres = episode_q_threshold(args.cost_limit, args.gamma, env.spec.max_episode_steps)

    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    agent = BEARLag(obs_dim, act_dim, args, q_thres).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    best, last_eval, first_step = None, None, 1
    if resume is not None:  # the state save_resume wrote, in place of the fresh one
        for name, module in agent.named_children():
            module.load_state_dict(resume[name])
        agent.log_alpha.data.copy_(resume["log_alpha"])
        for k in ("lam", "integral", "prev_error"):  # float32 values, read back exactly
            setattr(agent.lagrangian, k, torch.tensor(resume["lagrange"][k], device=device))
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
        best, last_eval, first_step = state["best"], state["last_eval"], resume["step"] + 1

    def save_resume(step: int) -> None:
        """Everything that carries over from `step` to the next: --resume continues bit for bit from here."""
        numpy_state = np.random.get_state()
        rng = {"python": random.getstate(), "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
               "torch": torch.get_rng_state(), "sampler": generator.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
        save_checkpoint(resume_path, {**agent.checkpoint(args, args.env_id, obs_dim, act_dim, step), "resume": {
            "save_path": os.path.abspath(save_path), "device": device.type, "best": best, "last_eval": last_eval,
            "optimizers": {k: v.state_dict() for k, v in vars(agent).items() if isinstance(v, torch.optim.Optimizer)},
            "eval_action": None if env.action is None else torch.as_tensor(env.action), "rng": rng}})

    if interrupted:  # Ctrl-C during the set-up: nothing to save yet
        signal.signal(signal.SIGINT, default_sigint)
        raise KeyboardInterrupt()
    print(f"{args.env_id}: {num_transitions} transitions from {path}; q_thres={q_thres:.3f}, "
          f"qc_thres={args.qc_thres_factor * q_thres:.3f} on {device}"
          + (f"; resuming after step {first_step - 1}" if resume else ""))
    start = time.time()
    progress = tqdm(range(first_step, args.total_steps + 1), desc="bear_lag", initial=first_step - 1,
                    total=args.total_steps, dynamic_ncols=True)
    for step in progress:
        idx = torch.randint(num_transitions, (args.batch_size,), device=device, generator=generator)
        info = agent.update(data["observations"][idx], data["actions"][idx], data["rewards"][idx],
                            data["costs"][idx], data["next_observations"][idx], data["terminals"][idx])
        if step % 100 == 0:  # one host sync per 100 steps
            for tag, value in zip(info, torch.stack(list(info.values())).tolist()):
                writer.add_scalar(tag, value, step)
            writer.add_scalar("charts/SPS", (step - first_step + 1) / (time.time() - start), step)
        if step % args.eval_every == 0 or step == args.total_steps:
            last_eval = evaluate(agent.actor, env, args.eval_episodes, args.cost_limit, device)
            for k, v in last_eval.items():
                writer.add_scalar(f"eval/{k}", v, step)
            lam, mmd, alpha = (float(info[k]) for k in ("lagrange/lambda", "losses/mmd", "losses/alpha"))
            progress.set_postfix(ret=f"{last_eval['return']:.1f}", cost=f"{last_eval['cost']:.1f}", lam=f"{lam:.3g}")
            progress.write(f"step {step}: eval return {last_eval['return']:.1f}, cost {last_eval['cost']:.1f} "
                           f"(normalised {last_eval['normalized_return']:.3f} / {last_eval['normalized_cost']:.3f}); "
                           f"λ {lam:.4g}, MMD {mmd:.4f}, α {alpha:.4g}")
            if is_better(last_eval, best):
                best = {**last_eval, "step": step}
                save_checkpoint(save_path, {**agent.checkpoint(args, args.env_id, obs_dim, act_dim, step),
                                            "eval": best})
            save_resume(step)  # a killed run loses at most --eval-every steps
        if interrupted:
            save_resume(step)
            progress.close()
            writer.close()
            signal.signal(signal.SIGINT, default_sigint)
            raise KeyboardInterrupt(f"interrupted at step {step}: resumable checkpoint {resume_path}; "
                                    f"continue with --resume {resume_path}")
    last = {**last_eval, "step": args.total_steps}
    ckpt = agent.checkpoint(args, args.env_id, obs_dim, act_dim, args.total_steps)
    save_checkpoint(save_path.removesuffix(".pt") + "_last.pt", {**ckpt, "eval": last})
    os.remove(resume_path)  # the run is complete: nothing left to resume
    writer.close()
    signal.signal(signal.SIGINT, default_sigint)
    print(f"\n{'':14}{'step':>8}{'return':>10}{'cost':>8}{'norm ret':>10}{'norm cost':>10}")
    for name, r in (("last", last), ("best (saved)", best)):
        print(f"{name:14}{r['step']:>8}{r['return']:>10.1f}{r['cost']:>8.1f}{r['normalized_return']:>10.3f}"
              f"{r['normalized_cost']:>10.3f}")
    print(f"final λ {ckpt['lagrange']['lam']:.4g}, α {ckpt['log_alpha'].exp().item():.4g}")
    print(f"checkpoint: {save_path}   wall time: {time.time() - start:.0f}s")
    return best


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:
        sys.exit(f"bear_lag.py: error: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C: main says what it saved; before training there is nothing to save
        print(f"bear_lag.py: {str(e) or 'interrupted before training started'}", file=sys.stderr)
        sys.exit(130)
