"""CPQ: Constraints Penalized Q-learning (Xu, Zhan, Zhu, AAAI 2022) for offline safe RL, in one file.

    python cpq.py --env-id OfflineCarRun-v0      # → runs/<run>/cpq.pt, the input of vpa.py and sac_lag_apid.py

Per gradient step on a batch (s, a, r, c, s', term) of a DSRL dataset, a' ~ π(·|s'):
  1. VAE behaviour model of p(a|s); its KL tells out-of-distribution (OOD) actions apart.
  2. Cost critic: TD on c + γ(1−term)·Qc'(s', a') plus an OOD penalty that pushes Qc of OOD policy actions *up*
     (with gradient into Qc, unlike OSRL's code): α_c·mean relu(qc_thres − Qc(s, a_ood)) by default (`hinge`);
     the paper's linear −α_c·mean Qc(s, a_ood) (`--ood-penalty linear`) diverges on CarRun.
  3. α_c by dual ascent so that mean Qc(s, a_ood) ≥ qc_thres.
  4. Reward critic: TD on r + γ(1−term)·1[Qc'(s', a') ≤ q_thres]·min Q'(s', a').
  5. Actor: maximise 1[Qc(s, ã) ≤ q_thres]·min Q(s, ã); with `--actor-escape` (default) a second step that also
     lowers Qc(s, ã) where it is over q_thres, so an actor whose actions all look unsafe still gets a gradient.
  6. Polyak-average the target critics.
The checkpoint with the best evaluation is kept (safe first, then return); `*_last.pt` beside it holds the latest
evaluation's weights and optimizers for `--resume`.
"""
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
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
    exp_name: str = "insample"  # name of this experiment (part of the run name)
    env_id: str = "OfflineCarRun-v0"  # DSRL task: Offline{Ball,Car,Drone,Ant}{Run,Circle}-v0
    seed: int = 0  # seed of the experiment
    torch_deterministic: bool = True  # set `torch.backends.cudnn.deterministic`
    cuda: bool = True  # use CUDA when it is available
    track: bool = False  # log to Weights and Biases (needs wandb and a login)
    wandb_project_name: str = "o2o-safe-rl"  # wandb project name
    dataset_path: Optional[str] = None  # DSRL-format HDF5 file (default: DSRL's cache, then datasets/<env-id>.hdf5)
    save_path: Optional[str] = None  # best checkpoint (default runs/<run-name>/cpq.pt); *_last.pt beside it
    resume: Optional[str] = None  # a *_last.pt to continue from (weights, optimizers, step; not bit-identical)
    cost_limit: float = 20.0  # episode cost limit d (undiscounted sum of per-step costs)
    total_steps: int = 30_000  # gradient steps
    batch_size: int = 256  # minibatch size
    eval_every: int = 2_500  # evaluate (and maybe keep as best) every this many steps
    eval_episodes: int = 10  # deterministic evaluation episodes
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # target-network Polyak rate
    reward_scale: float = 0.1  # rewards are multiplied by this in training (returns are reported unscaled)
    hidden_sizes: Tuple[int, ...] = (256, 256)  # hidden layers of actor and critics
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    expectile: float = 0.7
    cost_expectile: float = 0.5
    beta: float = 2.0
    max_weight: float = 100.0
    normalize_adv: bool = True
    cosine: bool = True
    log_path: Optional[str] = None
    q_thres_factor: float = 1.0


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


# --- Feasibility-guided in-sample learning ----------------------------------------------------------------
def episode_q_threshold(cost_limit: float, gamma: float, horizon: int) -> float:
    """Per-step Q budget of an episode budget d spread evenly over T steps: d·(1−γ^T)/((1−γ)·T)."""
    return cost_limit * (1 - gamma ** horizon) / ((1 - gamma) * horizon)


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """mean |τ − 1[diff < 0]|·diff²: τ > 0.5 fits an upper expectile of the target, τ < 0.5 a lower one."""
    return (torch.abs(tau - (diff < 0).float()) * diff.pow(2)).mean()


class InSample(nn.Module):
    def __init__(self, obs_dim, act_dim, args, q_thres):
        super().__init__()
        self.args, self.q_thres = args, q_thres
        self.actor = Actor(obs_dim, act_dim, args.hidden_sizes)
        self.critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=2)
        self.cost_critic = QEnsemble(obs_dim, act_dim, args.hidden_sizes, num_q=1)
        self.critic_target = copy.deepcopy(self.critic)
        self.cost_critic_target = copy.deepcopy(self.cost_critic)
        self.value = mlp([obs_dim, *args.hidden_sizes, 1])
        self.cost_value = mlp([obs_dim, *args.hidden_sizes, 1])
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr)
        self.critic_opt = torch.optim.Adam([*self.critic.parameters(), *self.cost_critic.parameters()], lr=args.critic_lr)
        self.value_opt = torch.optim.Adam([*self.value.parameters(), *self.cost_value.parameters()], lr=args.critic_lr)
        self.actor_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_opt, args.total_steps) if args.cosine else None

    def update(self, obs, act, reward, cost, next_obs, term) -> dict:
        args = self.args
        # values: V(s) an upper expectile of min Q'(s, a) over the data's actions; Vc(s) an expectile of Qc'(s, a)
        with torch.no_grad():
            q_t = self.critic_target(obs, act).min(0).values
            qc_t = self.cost_critic_target(obs, act)[0]
        v, vc = self.value(obs).squeeze(-1), self.cost_value(obs).squeeze(-1)
        value_loss = expectile_loss(q_t - v, args.expectile) + expectile_loss(qc_t - vc, args.cost_expectile)
        self.value_opt.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_opt.step()
        # critics: in-sample TD, no action outside the data is ever evaluated
        with torch.no_grad():
            y = reward + args.gamma * (1 - term) * self.value(next_obs).squeeze(-1)
            y_c = cost + args.gamma * (1 - term) * self.cost_value(next_obs).squeeze(-1)
        critic_loss = F.mse_loss(self.critic(obs, act), y.expand(2, -1), reduction="none").mean(1).sum()
        cost_loss = F.mse_loss(self.cost_critic(obs, act)[0], y_c)
        self.critic_opt.zero_grad(set_to_none=True)
        (critic_loss + cost_loss).backward()
        self.critic_opt.step()
        # actor: weighted regression on the data's actions
        with torch.no_grad():
            adv = q_t - v.detach()
            adv_c = qc_t - vc.detach()
            feasible = (vc.detach() <= self.q_thres).float()
            safe_act = (qc_t <= self.q_thres).float()
            if args.normalize_adv:
                adv = adv / adv.std().clamp_min(1e-6)
                adv_c = adv_c / adv_c.std().clamp_min(1e-6)
            w_feas = torch.exp(args.beta * adv).clamp(max=args.max_weight) * safe_act
            w_infeas = torch.exp(-args.beta * adv_c).clamp(max=args.max_weight)
            w = feasible * w_feas + (1 - feasible) * w_infeas
        h = self.actor.trunk(obs)
        mu, log_std = self.actor.mu(h), self.actor.log_std(h).clamp(-20.0, 2.0)
        u = torch.atanh(act.clamp(-1 + 1e-3, 1 - 1e-3))
        log_prob = (-0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std).sum(-1)
        actor_loss = -(w * log_prob).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        if self.actor_sched is not None:
            self.actor_sched.step()
        soft_update(self.critic_target, self.critic, args.tau)
        soft_update(self.cost_critic_target, self.cost_critic, args.tau)
        return {"losses/value": value_loss.detach(), "losses/critic": critic_loss.detach(),
                "losses/cost_critic": cost_loss.detach(), "losses/actor": actor_loss.detach(),
                "losses/feasible_fraction": feasible.mean(), "losses/safe_action_fraction": safe_act.mean(),
                "losses/mean_weight": w.mean(), "losses/vc": vc.detach().mean()}

    def checkpoint(self, args, env_id, obs_dim, act_dim, step) -> dict:
        return {"algo": "insample", "env_id": env_id, "obs_dim": obs_dim, "act_dim": act_dim,
                "hidden_sizes": list(args.hidden_sizes), "reward_scale": args.reward_scale,
                "cost_limit": args.cost_limit, "step": step,
                "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "cost_critic": self.cost_critic.state_dict(),
                "cost_critic_target": self.cost_critic_target.state_dict(),
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


def check_args(args: Args) -> None:
    check_common_args(args)


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
    if args.resume is not None and not args.resume.endswith("_last.pt"):
        raise InputError(f"--resume {args.resume}: not a cpq.py *_last.pt checkpoint")
    resumed_best = None if args.resume is None else args.resume.removesuffix("_last.pt") + ".pt"
    save_path = args.save_path or resumed_best or os.path.join("runs", run_name, "insample.pt")
    if resumed_best is not None and os.path.abspath(save_path) != os.path.abspath(resumed_best):
        raise InputError(f"--save-path {save_path}: a resumed run goes on beside --resume, at {resumed_best}")
    last_path = save_path.removesuffix(".pt") + "_last.pt"
    run_dir = prepare_output_dir(save_path)
    resume = None
    if args.resume is not None:
        resume = load_checkpoint(args.resume, args.env_id, obs_dim, act_dim, args.hidden_sizes)
        if resume["algo"] != "cpq" or "optimizers" not in resume:
            raise InputError(f"--resume {args.resume}: not a cpq.py *_last.pt checkpoint")
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

    agent = InSample(obs_dim, act_dim, args, q_thres * args.q_thres_factor).to(device)
    best, last_eval, step = None, None, 0
    if resume is not None:  # fresh random streams: the continuation is not bit-identical to an uninterrupted run
        for name, module in agent.named_children():
            module.load_state_dict(resume[name])
        for name, state in resume["optimizers"].items():
            getattr(agent, name).load_state_dict(state)
        best, last_eval, step = resume["best"], resume["eval"], resume["step"]
    generator = torch.Generator(device=device).manual_seed(args.seed + step)
    print(f"{args.env_id}: {num_transitions} transitions from {path}; q_thres={q_thres:.3f} on {device}")
    start, first_step = time.time(), step + 1
    try:
        progress = tqdm(range(first_step, args.total_steps + 1), desc="insample", initial=step, total=args.total_steps)
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
                progress.set_postfix(ret=f"{last_eval['return']:.1f}", cost=f"{last_eval['cost']:.1f}")
                if args.log_path:
                    with open(args.log_path, "a") as f:
                        f.write(json.dumps({**last_eval, **{k: round(float(v), 4) for k, v in info.items()}}) + "\n")
                ckpt = agent.checkpoint(args, args.env_id, obs_dim, act_dim, step)
                if is_better(last_eval, best):
                    best = last_eval
                    save_checkpoint(save_path, {**ckpt, "eval": best})
                save_checkpoint(last_path, {**ckpt, "eval": last_eval, "best": best, "optimizers": {
                    k: v.state_dict() for k, v in vars(agent).items() if isinstance(v, torch.optim.Optimizer)}})
    except KeyboardInterrupt:
        kept = f"kept {save_path} (best) and {last_path}: continue with --resume {last_path}" if best else "nothing saved"
        print(f"cpq.py: interrupted at step {step}; {kept}", file=sys.stderr)
        sys.exit(130)
    writer.close()
    print(f"\n{'':6}{'step':>8}{'return':>10}{'cost':>8}{'norm ret':>10}{'norm cost':>10}")
    for name, r in (("last", last_eval), ("best", best)):
        print(f"{name:6}{r['step']:>8}{r['return']:>10.1f}{r['cost']:>8.1f}{r['normalized_return']:>10.3f}"
              f"{r['normalized_cost']:>10.3f}")
    print(f"checkpoint: {save_path}   wall time: {time.time() - start:.0f}s")
    return best


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:
        sys.exit(f"cpq.py: error: {e}")
