"""BEAR-Lag: BEAR (Kumar et al. 2019) with a PID-Lagrangian cost constraint, for offline safe RL, in one file.

    python bear_lag.py --env-id OfflineCarRun-v0   # → runs/<run>/bear_lag.pt, an input of vpa.py and sac_lag_apid.py

Per gradient step on a batch (s, a, r, c, s', term), N = --num-samples (vs OSRL's BEARL: docs/algorithms.md):
  1. VAE behaviour model of p(a|s), as in cpq.py.
  2. Critics on N actions a'_n ~ π_targ(·|s') of the target actor (the max over them: pessimistic about cost):
     y = r + γ(1−term)·max_n [0.75·min_i Q'_i + 0.25·max_i Q'_i](s', a'_n),   y_c = c + γ(1−term)·max_n Qc'(s', a'_n)
  3. λ_k by a PID on e_k = mean Qc(s, ã) − qc_thres, qc_thres = 1.5·q_thres (QcPIDLagrangian).
  4. Actor: L_π = mean(−min_i Q_i(s, ã) + α·(MMD(s) − ε)) + λ_k·mean(Qc(s, ã) − qc_thres), ã = tanh(u_1), the MMD
     between N pre-tanh policy samples u_n and N pre-tanh VAE samples per state.
  5. α by dual ascent: an Adam step on −log α·(mean MMD − ε), so α rises while MMD > ε.
  6. Polyak-average the target critics and the target actor.
The best evaluation is kept (as cpq.py); `*_last.pt` beside it holds the latest evaluation's state for `--resume`.
"""
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
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
    exp_name: str = "bear_lag"  # name of this experiment (part of the run name)
    env_id: str = "OfflineCarRun-v0"  # DSRL task: Offline{Ball,Car,Drone,Ant}{Run,Circle}-v0
    seed: int = 0  # seed of the experiment
    torch_deterministic: bool = True  # set `torch.backends.cudnn.deterministic`
    cuda: bool = True  # use CUDA when it is available
    track: bool = False  # log to Weights and Biases (needs wandb and a login)
    wandb_project_name: str = "o2o-safe-rl"  # wandb project name
    dataset_path: Optional[str] = None  # DSRL-format HDF5 file (default: DSRL's cache, then datasets/<env-id>.hdf5)
    save_path: Optional[str] = None  # best checkpoint (default runs/<run-name>/bear_lag.pt); *_last.pt beside it
    resume: Optional[str] = None  # *_last.pt to continue in its folder (weights, optimizers, α, PID; not bit-identical)
    cost_limit: float = 20.0  # episode cost limit d (undiscounted sum of per-step costs)
    total_steps: int = 50_000  # gradient steps (the Marvel paper's budget; OSRL's default is 300 000)
    batch_size: int = 512  # minibatch size
    eval_every: int = 5_000  # evaluate (and maybe keep as best) every this many steps
    eval_episodes: int = 10  # deterministic evaluation episodes
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target critics and the target actor
    reward_scale: float = 0.1  # rewards are multiplied by this in training (returns are reported unscaled)
    hidden_sizes: Tuple[int, ...] = (256, 256)  # hidden layers of actor and critics
    # BEAR
    actor_lr: float = 1e-3  # actor learning rate
    critic_lr: float = 1e-3  # reward and cost critic learning rate
    vae_lr: float = 1e-3  # VAE learning rate
    alpha_lr: float = 1e-3  # learning rate of log α, the weight of the MMD constraint
    vae_hidden: int = 400  # VAE hidden width (two layers each in encoder and decoder)
    kl_weight: float = 0.5  # β_kl of the VAE loss
    num_samples: int = 10  # N: target-actor actions per s' in the critic targets, policy / VAE samples in the MMD
    target_mix: float = 0.75  # weight of the ensemble minimum in the target mix·min_i Q'_i + (1 − mix)·max_i Q'_i
    mmd_sigma: float = 50.0  # σ of the MMD kernel exp(−‖x − y‖²/(2σ)) on pre-tanh actions (OSRL's value and form)
    mmd_epsilon: float = 0.05  # ε of the MMD constraint MMD ≤ ε that α enforces
    # PID Lagrangian on e = mean Qc(s, ã) − qc_thres
    kp: float = 0.1  # K_p of λ's PID on mean Qc(s, ã) − qc_thres
    ki: float = 0.003  # K_i of λ's PID
    kd: float = 0.001  # K_d of λ's PID
    # not in the paper
    qc_thres_factor: float = 1.5  # qc_thres = factor · q_thres (OSRL: 1)


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


# --- BEAR-Lag (the cost budget, VAE and sample_pretanh as in cpq.py) -------------------------------------------
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


def vae_pretanh_samples(vae: VAE, obs: torch.Tensor, num: int) -> torch.Tensor:
    """(B, num, A) VAE samples before the tanh of VAE.decode: the exact pre-image (atanh of the action would not be)."""
    z = torch.randn(len(obs), num, vae.latent_dim, device=obs.device).clamp(-0.5, 0.5)
    return vae.decoder(torch.cat([obs.unsqueeze(1).expand(-1, num, -1), z], -1))


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-state biased MMD (B,) of x (B, N, A), y (B, M, A) with OSRL's k(a, b) = exp(−‖a − b‖²/(2σ)) (σ, not σ²):
    sqrt(mean k(x, x) + mean k(y, y) − 2·mean k(x, y) + 1e-6), every mean over all pairs, i = j included."""
    def mean_kernel(a, b):
        return torch.exp(-(a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(-1) / (2.0 * sigma)).mean((1, 2))
    return (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y) + 1e-6).sqrt()


def mixed_max_target(q_next: torch.Tensor, num_samples: int, mix: float) -> torch.Tensor:
    """max_n [mix·min_i Q_i + (1 − mix)·max_i Q_i](s', a'_n), (B,), of q_next (num_q, B·N) in state-major order."""
    mixed = mix * q_next.min(0).values + (1.0 - mix) * q_next.max(0).values
    return mixed.view(-1, num_samples).max(1).values


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class QcPIDLagrangian:
    """OSRL's LagrangianPIDController, once per step (OSRL: twice), on e_k = mean Qc(s, ã) − qc_thres, I_0 = e_0 = 0:
        I_k = max(0, I_{k−1} + e_k)   D_k = max(0, e_k − e_{k−1})   λ_k = max(0, K_p·max(0, e_k) + K_i·I_k + K_d·D_k)
    The state is 0-dim tensors, so updating it every step costs no host sync."""

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
        dims = (obs_dim, act_dim, args.hidden_sizes)
        self.actor, self.actor_target = Actor(*dims), Actor(*dims)
        self.critic, self.cost_critic = QEnsemble(*dims, num_q=2), QEnsemble(*dims, num_q=1)
        self.critic_target, self.cost_critic_target = QEnsemble(*dims, num_q=2), QEnsemble(*dims, num_q=1)
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

    @torch.no_grad()
    def critic_targets(self, reward, cost, next_obs, term):
        """(y, y_c) of step 2; all B·N pairs (s', a'_n) in one batched call per critic."""
        args = self.args
        next_act, _ = sample_pretanh(self.actor_target, next_obs, args.num_samples)
        obs_rep = next_obs.repeat_interleave(args.num_samples, 0)  # state-major, like next_act's (B, N) layout
        act_rep = next_act.reshape(len(obs_rep), -1)
        discount = args.gamma * (1 - term)
        q_next = mixed_max_target(self.critic_target(obs_rep, act_rep), args.num_samples, args.target_mix)
        qc_next = mixed_max_target(self.cost_critic_target(obs_rep, act_rep), args.num_samples, args.target_mix)
        return reward + discount * q_next, cost + discount * qc_next

    def update(self, obs, act, reward, cost, next_obs, term) -> dict:
        args = self.args
        # 1. behaviour VAE
        recon, kl = self.vae.loss(obs, act)
        vae_loss = recon + args.kl_weight * kl
        descend(self.vae_opt, vae_loss)
        # 2. both critics on the mixed, max-over-samples targets (the cost target is cut by term too; OSRL: not)
        y, y_c = self.critic_targets(reward, cost, next_obs, term)
        critic_loss = F.mse_loss(self.critic(obs, act), y.expand(2, -1), reduction="none").mean(1).sum()
        cost_critic_loss = F.mse_loss(self.cost_critic(obs, act)[0], y_c)
        descend(self.critics_opt, critic_loss + cost_critic_loss)
        # 3.-4. λ_k from this batch's mean Qc(s, ã), then the actor on the updated critics; ã = tanh(u_1) (as OSRL)
        act_pi, u_pi = sample_pretanh(self.actor, obs, args.num_samples)
        with torch.no_grad():
            u_data = vae_pretanh_samples(self.vae, obs, args.num_samples)
        mmd = gaussian_mmd(u_data, u_pi, args.mmd_sigma)
        q_pi = self.critic(obs, act_pi[:, 0]).min(0).values
        qc_pi = self.cost_critic(obs, act_pi[:, 0])[0]
        lam = self.lagrangian.update(qc_pi.mean())
        alpha = self.log_alpha.exp().detach()
        actor_loss = (-q_pi + alpha * (mmd - args.mmd_epsilon)).mean() + lam * (qc_pi - self.qc_thres).mean()
        descend(self.actor_opt, actor_loss)
        # 5. dual ascent on log α with this step's MMD (OSRL: a second actor forward)
        mmd_mean = mmd.mean().detach()
        descend(self.alpha_opt, -self.log_alpha * (mmd_mean - args.mmd_epsilon))
        self.log_alpha.data.clamp_(-5.0, 5.0)
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
                "cost_limit": args.cost_limit, "step": step, **{k: v.state_dict() for k, v in self.named_children()},
                "log_alpha": self.log_alpha.detach().clone(), "lagrange": self.lagrangian.state_dict(),
                "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()}}

    def load(self, ckpt: dict) -> None:
        """Continue from a *_last.pt: the networks, log α, the PID's state and the optimizers."""
        for name, module in self.named_children():
            module.load_state_dict(ckpt[name])
        self.log_alpha.data.copy_(ckpt["log_alpha"])
        for k in ("lam", "integral", "prev_error"):  # float32 values, read back exactly
            setattr(self.lagrangian, k, torch.tensor(ckpt["lagrange"][k], device=self.log_alpha.device))
        for name, state in ckpt["optimizers"].items():
            getattr(self, name).load_state_dict(state)


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
    check_common_args(args)
    counts = ("total_steps", "batch_size", "eval_every", "vae_hidden", "num_samples")
    rates = ("actor_lr", "critic_lr", "vae_lr", "alpha_lr", "reward_scale", "mmd_sigma", "qc_thres_factor")
    weights = ("kl_weight", "mmd_epsilon", "kp", "ki", "kd")
    for flag, holds, must in [*((f, getattr(args, f) >= 1, ">= 1") for f in counts),
                              *((f, getattr(args, f) > 0, "> 0") for f in rates),
                              *((f, getattr(args, f) >= 0, ">= 0") for f in weights),
                              ("target_mix", 0 <= args.target_mix <= 1, "in [0, 1]")]:
        if not holds:
            refuse(flag, getattr(args, flag), must)


def main(args: Args) -> dict:
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)  # also Bullet's reset noise
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    env = make_env(args.env_id, args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    resumed_best = None if args.resume is None else args.resume.removesuffix("_last.pt") + ".pt"
    save_path = args.save_path or resumed_best or os.path.join("runs", run_name, "bear_lag.pt")
    if resumed_best is not None and os.path.abspath(save_path) != os.path.abspath(resumed_best):
        raise InputError(f"--save-path {save_path}: a resumed run goes on beside --resume, at {resumed_best}")
    last_path = save_path.removesuffix(".pt") + "_last.pt"
    run_dir = prepare_output_dir(save_path)
    resume = None
    if args.resume is not None:
        resume = load_checkpoint(args.resume, args.env_id, obs_dim, act_dim, args.hidden_sizes)
        if resume["algo"] != "bear_lag" or "optimizers" not in resume or not args.resume.endswith("_last.pt"):
            raise InputError(f"--resume {args.resume}: not a bear_lag.py *_last.pt checkpoint")
    path = find_dataset(args.env_id, env.unwrapped.dataset_url, args.dataset_path)
    data = {k: torch.as_tensor(v, device=device) for k, v in load_dataset(path, obs_dim, act_dim).items()}
    data["rewards"] = data["rewards"] * args.reward_scale
    num_transitions = len(data["observations"])
    q_thres = episode_q_threshold(args.cost_limit, args.gamma, env.spec.max_episode_steps)

    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|" + "".join(f"\n|{k}|{v}|" for k, v in vars(args).items()))

    agent = BEARLag(obs_dim, act_dim, args, q_thres).to(device)
    best, last_eval, step = None, None, 0
    if resume is not None:  # fresh random streams: the continuation is not bit-identical to an uninterrupted run
        agent.load(resume)
        best, last_eval, step = resume["best"], resume["eval"], resume["step"]
    generator = torch.Generator(device=device).manual_seed(args.seed + step)
    print(f"{args.env_id}: {num_transitions} transitions from {path}; qc_thres={agent.qc_thres:.3f} on {device}")
    start, first_step = time.time(), step + 1
    try:
        progress = tqdm(range(first_step, args.total_steps + 1), desc="bear_lag", initial=step, total=args.total_steps)
        for step in progress:
            idx = torch.randint(num_transitions, (args.batch_size,), device=device, generator=generator)
            info = agent.update(data["observations"][idx], data["actions"][idx], data["rewards"][idx],
                                data["costs"][idx], data["next_observations"][idx], data["terminals"][idx])
            if step % 100 == 0:  # one host sync per 100 steps
                for tag, value in zip(info, torch.stack(list(info.values())).tolist()):
                    writer.add_scalar(tag, value, step)
                writer.add_scalar("charts/SPS", (step - first_step + 1) / (time.time() - start), step)
            if step % args.eval_every == 0 or step == args.total_steps:
                last_eval = {**evaluate(agent.actor, env, args.eval_episodes, args.cost_limit, device), "step": step}
                for k, v in last_eval.items():
                    writer.add_scalar(f"eval/{k}", v, step)
                progress.set_postfix(ret=f"{last_eval['return']:.1f}", cost=f"{last_eval['cost']:.1f}",
                                     lam=f"{info['lagrange/lambda'].item():.3g}")
                ckpt = agent.checkpoint(args, args.env_id, obs_dim, act_dim, step)
                if is_better(last_eval, best):
                    best = last_eval
                    save_checkpoint(save_path, {**ckpt, "eval": best})
                save_checkpoint(last_path, {**ckpt, "eval": last_eval, "best": best, "optimizers": {
                    k: v.state_dict() for k, v in vars(agent).items() if isinstance(v, torch.optim.Optimizer)}})
    except KeyboardInterrupt:
        kept = (f"kept {save_path} (best) and {last_path}: continue with --resume {last_path}" if best
                else "nothing saved")
        print(f"bear_lag.py: interrupted at step {step}; {kept}", file=sys.stderr)
        sys.exit(130)
    writer.close()
    for name, r in (("last", last_eval), ("best", best)):
        print(f"{name}: step {r['step']}, return {r['return']:.1f}, cost {r['cost']:.1f} "
              f"(normalised {r['normalized_return']:.3f}, {r['normalized_cost']:.3f})")
    print(f"final λ {agent.lagrangian.lam.item():.4g}, α {agent.log_alpha.exp().item():.4g}; checkpoint: {save_path}")
    return best


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:
        sys.exit(f"bear_lag.py: error: {e}")
    except KeyboardInterrupt:  # in the set-up, before main's loop: nothing saved yet
        print("bear_lag.py: interrupted before training; nothing saved", file=sys.stderr)
        sys.exit(130)
