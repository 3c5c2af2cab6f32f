"""VPA: Value Pre-Alignment (Marvel, arXiv 2412.04426, §3.1) of an offline checkpoint's critics, in one file.

    python vpa.py --env-id OfflineCarRun-v0 --init runs/<run>/cpq.pt   # → runs/<run>/vpa.pt + vpa_spearman.csv

Offline critics (CPQ inflates Qc of OOD actions, zeroes Q behind unsafe next actions) mislead the first online
updates. VPA re-fits both to the frozen offline policy μ on offline data; per TD step, one a' ~ μ(·|s') for both:
    y   = r·reward_scale + γ(1−term)·[ min_i Q'_i(s', a') − α_vpa  ·log μ(a'|s') ]
    y_c = c              + γ(1−term)·[      Qc'(s', a')   − α_c_vpa·log μ(a'|s') ]      0 ≤ α_c_vpa < α_vpa
    L = Σ_i MSE(Q_i(s, a), y),   L_c = MSE(Qc(s, a), y_c),   then Polyak targets Q' ← (1−τ)Q' + τQ, same for Qc'.
−log μ is a bonus where μ is uncertain (optimism for online exploration), a penalty where log μ > 0: so α is small.
"""
import copy
import math
import os
import random
import sys
import tempfile
import time
import warnings
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
from scipy.stats import spearmanr
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    init: str  # offline checkpoint (cpq.py, bear_lag.py) whose actor μ is frozen and whose critics are aligned
    exp_name: str = "vpa"  # name of this experiment (part of the run name)
    env_id: str = "OfflineCarRun-v0"  # DSRL task: Offline{Ball,Car,Drone,Ant}{Run,Circle}-v0
    seed: int = 0  # seed of the experiment
    torch_deterministic: bool = True  # set `torch.backends.cudnn.deterministic`
    cuda: bool = True  # use CUDA when it is available
    track: bool = False  # log to Weights and Biases (needs wandb and a login)
    wandb_project_name: str = "o2o-safe-rl"  # wandb project name
    dataset_path: Optional[str] = None  # DSRL-format HDF5 file (default: DSRL's cache, then datasets/<env-id>.hdf5)
    save_path: Optional[str] = None  # output checkpoint (default runs/<run-name>/vpa.pt); *_spearman.csv beside it
    cost_limit: float = 20.0  # episode cost limit d (for the normalised cost of μ's evaluation)
    total_steps: int = 20_000  # TD steps (the official schedule: 20 000 of minibatch 64)
    batch_size: int = 64  # minibatch size
    eval_every: int = 2_000  # log the diagnostic's Spearman ρ every this many steps (μ is frozen: one env evaluation)
    eval_episodes: int = 10  # deterministic evaluation episodes of μ (stored in the output checkpoint)
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # target-network Polyak rate
    reward_scale: float = 0.1  # rewards are multiplied by this in training; must equal the checkpoint's
    # VPA
    alpha_vpa: Optional[float] = None  # α_vpa of the reward target (default 2 × the env's online SAC α: CarRun 0.01)
    alpha_c_vpa: Optional[float] = None  # α_c_vpa of the cost target (default α_vpa / 2); must be < α_vpa
    critic_lr: Optional[float] = None  # reward critic learning rate (default: the env's online one, ENV_DEFAULTS)
    cost_critic_lr: Optional[float] = None  # cost critic learning rate (default: the env's online one, ENV_DEFAULTS)
    # Spearman diagnostic (the paper's Table 1)
    diagnostic: bool = True  # run it (--no-diagnostic skips its rollouts)
    diagnostic_pairs: int = 100  # states of μ scored; each gives one "policy" and one "random" pair
    pairs_per_episode: int = 10  # states drawn per rollout episode of μ (uniformly over its steps)
    mc_horizon: int = 300  # steps of μ after the pair's action in each Monte-Carlo return


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


# --- VPA ---------------------------------------------------------------------------------------------------
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


# --- Diagnostic: Spearman ρ of the critics (Q: ensemble min) against discounted Monte-Carlo returns of μ -----
PAIR_KINDS = ("policy", "random")
PLAIN = (bool, int, float, np.ndarray, np.generic)


def snapshot(raw: gym.Env) -> tuple:
    """pybullet's saveState, plus the plain numbers env, task and agent keep (the reward is a potential difference)."""
    return raw.bc.saveState(), [(o, {k: copy.deepcopy(v) for k, v in vars(o).items() if isinstance(v, PLAIN)})
                                for o in (raw, raw.task, raw.agent, *raw.obstacles)]


def restore(raw: gym.Env, snap: tuple) -> None:
    raw.bc.restoreState(snap[0])
    for o, numbers in snap[1]:  # copies again: reset() mutates some arrays in place (agent.init_xyz)
        vars(o).update(copy.deepcopy(numbers))


@torch.no_grad()
def collect_pairs(env: gym.Env, actor: nn.Module, args: Args, device: torch.device) -> dict:
    """Bullet cannot be set to a dataset state, so at random steps of μ's rollouts the simulator is saved, stepped with
    a ~ μ ("policy" pair, for the paper's dataset pairs) or a ~ U[−1, 1]^A ("random"), μ followed for --mc-horizon
    steps without the time limit, and restored: {kind: [states, actions, MC returns, MC costs]} for PAIR_KINDS."""
    raw, horizon, rng = env.unwrapped, env.spec.max_episode_steps, np.random.default_rng(args.seed)

    def mu(obs: np.ndarray) -> np.ndarray:  # stochastic, as in the VPA targets
        return actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0][0].cpu().numpy()

    def mc_return(action: np.ndarray) -> Tuple[float, float]:  # Σ_t γ^t (r_t, c_t), t = 0..H: `action`, then μ
        ret = cost = 0.0
        for t in range(args.mc_horizon + 1):
            obs, reward, terminated, _, info = raw.step(action)
            ret, cost = ret + args.gamma ** t * reward, cost + args.gamma ** t * info["cost"]
            if terminated:
                break
            action = mu(obs)
        return ret, cost

    rows = {kind: [] for kind in PAIR_KINDS}
    with tqdm(total=args.diagnostic_pairs, desc="mc pairs") as progress:
        while len(rows["policy"]) < args.diagnostic_pairs:
            n = min(args.pairs_per_episode, args.diagnostic_pairs - len(rows["policy"]), horizon)
            picks = set(rng.choice(horizon, size=n, replace=False).tolist())
            obs, _ = raw.reset()
            for t in range(horizon):
                action = mu(obs)
                if t in picks:
                    snap = snapshot(raw)
                    for kind, a in zip(PAIR_KINDS, (action, rng.uniform(-1.0, 1.0, action.shape).astype(np.float32))):
                        rows[kind].append((obs, a, *mc_return(a)))
                        restore(raw, snap)  # both branches start from the same saved state
                    raw.bc.removeState(snap[0])
                    progress.update()
                obs, _, terminated, _, _ = raw.step(action)  # the episode goes on as if never branched
                if terminated:
                    break
    return {kind: [np.array(column) for column in zip(*pairs)] for kind, pairs in rows.items()}


@torch.no_grad()
def spearman_table(agent: VPA, pairs: dict, device: torch.device, writer: SummaryWriter, step: int) -> dict:
    """{"Q/policy": ρ, "Q/random": ρ, "Qc/policy": ρ, "Qc/random": ρ} of the current (not target) critics, logged."""
    table = {}
    for critic, net, mc in (("Q", agent.critic, 2), ("Qc", agent.cost_critic, 3)):
        for kind in PAIR_KINDS:
            obs, act = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in pairs[kind][:2])
            with warnings.catch_warnings(action="ignore"):  # constant input (no cost on any rollout): ρ is nan
                rho = float(spearmanr(net(obs, act).min(0).values.cpu().numpy(), pairs[kind][mc]).statistic)
            table[f"{critic}/{kind}"] = rho
            writer.add_scalar(f"eval/spearman_{critic}_{kind}", rho, step)
    return table


def check_args(args: Args) -> None:  # defaults filled in; check_common_args spelt out (vpa.py has no --hidden-sizes)
    rules = [*((f, vars(args)[f] >= 1, ">= 1") for f in ("total_steps", "batch_size", "eval_every", "eval_episodes")),
             *((f, vars(args)[f] > 0, "> 0") for f in ("critic_lr", "cost_critic_lr", "alpha_vpa", "reward_scale")),
             ("cost_limit", args.cost_limit >= 0, ">= 0 (an episode's cost is a sum of costs >= 0)"),
             ("gamma", 0 < args.gamma < 1, "in (0, 1)"), ("tau", 0 < args.tau <= 1, "in (0, 1]"),
             ("mc_horizon", args.mc_horizon >= 0, ">= 0"),
             ("alpha_c_vpa", 0 <= args.alpha_c_vpa < args.alpha_vpa, f"in [0, --alpha-vpa) = [0, {args.alpha_vpa})"),
             *((f, not args.diagnostic or vars(args)[f] >= n, f">= {n} (or pass --no-diagnostic)")
               for f, n in (("diagnostic_pairs", 2), ("pairs_per_episode", 1)))]
    for flag, holds, must in rules:
        if not holds:
            refuse(flag, getattr(args, flag), must)


def main(args: Args) -> None:
    if args.env_id not in ENV_DEFAULTS and None in (args.critic_lr, args.cost_critic_lr, args.alpha_vpa):
        raise InputError(f"--env-id {args.env_id}: no defaults; pass --critic-lr, --cost-critic-lr and --alpha-vpa")
    defaults = ENV_DEFAULTS.get(args.env_id, {})
    args = replace(args, **{k: defaults[k] for k in ("critic_lr", "cost_critic_lr") if getattr(args, k) is None})
    alpha = 2 * defaults["alpha"] if args.alpha_vpa is None else args.alpha_vpa  # 2 × the env's online SAC α
    args = replace(args, alpha_vpa=alpha, alpha_c_vpa=alpha / 2 if args.alpha_c_vpa is None else args.alpha_c_vpa)
    check_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)  # also Bullet's reset noise
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env = make_env(args.env_id, args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    save_path = args.save_path or os.path.join("runs", run_name, "vpa.pt")
    run_dir = prepare_output_dir(save_path)
    try:  # VPA keeps the networks the checkpoint declares (VPA.load is strict)
        hidden_sizes = tuple(torch.load(args.init, map_location="cpu", weights_only=True)["hidden_sizes"])
    except Exception:  # unreadable or foreign: load_checkpoint says so in one line
        hidden_sizes = ()
    ckpt = load_checkpoint(args.init, args.env_id, obs_dim, act_dim, hidden_sizes)
    if ckpt["reward_scale"] != args.reward_scale:
        raise InputError(f"{args.init}: reward_scale {ckpt['reward_scale']} != --reward-scale {args.reward_scale}")
    path = find_dataset(args.env_id, env.unwrapped.dataset_url, args.dataset_path)
    data = {k: torch.as_tensor(v, device=device) for k, v in load_dataset(path, obs_dim, act_dim).items()}
    data["rewards"] = data["rewards"] * args.reward_scale
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|" + "".join(f"\n|{k}|{v}|" for k, v in vars(args).items()))
    agent = VPA(obs_dim, act_dim, hidden_sizes, args).to(device)
    agent.load(ckpt, args.init)
    print(f"{args.env_id}: {len(data['rewards'])} transitions from {path}; α={args.alpha_vpa}, α_c={args.alpha_c_vpa}, "
          f"lrs {args.critic_lr}/{args.cost_critic_lr} on {device}")
    try:
        if args.diagnostic:  # its own torch RNG stream: the VPA updates are the same with or without it
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                pairs = collect_pairs(make_env(args.env_id, args.seed + 1), agent.actor, args, device)
            before = after = spearman_table(agent, pairs, device, writer, 0)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        start = time.time()
        for step in tqdm(range(1, args.total_steps + 1), desc="vpa"):
            idx = torch.randint(len(data["rewards"]), (args.batch_size,), device=device, generator=generator)
            info = agent.update({k: v[idx] for k, v in data.items()})
            if step % 100 == 0 or step == args.total_steps:  # one host sync per 100 steps
                for tag, value in zip(info, torch.stack(list(info.values())).tolist()):
                    writer.add_scalar(tag, value, step)
                writer.add_scalar("charts/SPS", step / (time.time() - start), step)
            if args.diagnostic and (step % args.eval_every == 0 or step == args.total_steps):
                after = spearman_table(agent, pairs, device, writer, step)
        result = evaluate(agent.actor, env, args.eval_episodes, args.cost_limit, device)  # μ is unchanged
    except KeyboardInterrupt:
        print(f"vpa.py: interrupted; nothing saved ({args.init} is untouched): run the command again", file=sys.stderr)
        sys.exit(130)
    for k, v in result.items():
        writer.add_scalar(f"eval/{k}", v, args.total_steps)
    writer.close()
    out = {k: v for k, v in ckpt.items() if k not in ("format", "optimizers")}  # offline optimizer state is stale
    out.update({**{k: m.state_dict() for k, m in agent.named_children() if k != "actor"},  # the aligned critics
                "algo": f"{ckpt['algo']}+vpa", "cost_limit": args.cost_limit, "step": args.total_steps,
                "lagrange": None, "args": asdict(args), "eval": {**result, "step": args.total_steps},
                "init": {k: ckpt.get(k) for k in ("algo", "step", "eval", "args")} | {"path": args.init},
                "spearman": {k: {"before": before[k], "after": after[k]} for k in before} if args.diagnostic else None})
    save_checkpoint(save_path, out)
    if args.diagnostic:  # nonzero_mc: a near-safe μ gives most pairs zero MC cost, and ρ(Qc) rests on the few others
        nonzero = [f"{np.count_nonzero(pairs[kind][i])}/{len(pairs[kind][i])}" for i in (2, 3) for kind in PAIR_KINDS]
        table = ["critic,pairs,before,after,nonzero_mc"] + [f"{k.replace('/', ',')},{before[k]:.6f},{after[k]:.6f},{n}"
                                                           for k, n in zip(before, nonzero)]  # Q/…, then Qc/…
        with open(save_path.removesuffix(".pt") + "_spearman.csv", "w") as f:
            f.write("\n".join(table) + "\n")
        print("\nSpearman ρ(critic value, discounted MC return of μ) before and after VPA:", *table, sep="\n")
    print(f"μ ({ckpt['algo']}, unchanged): return {result['return']:.1f}, cost {result['cost']:.1f} (normalised "
          f"{result['normalized_return']:.3f}, {result['normalized_cost']:.3f}); checkpoint: {save_path}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:
        sys.exit(f"vpa.py: error: {e}")
