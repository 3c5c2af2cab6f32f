"""Deterministic evaluation of any checkpoint of this project, with an optional GIF of the first episode.

    python benchmark/evaluate.py --checkpoint runs/<run>/cpq.pt
    python benchmark/evaluate.py --checkpoint runs/<run>/sac_lag.pt --episodes 20 --seed 1 --cost-limit 10
    python benchmark/evaluate.py --checkpoint runs/<run>/vpa.pt --episodes 1 --video carrun.gif

Reads a checkpoint (format "o2o-safe-rl/1", docs/checkpoints.md) of cpq.py, bear_lag.py, vpa.py, sac_lag_apid.py,
marvel_full.py or famo2o_lag.py, makes its env, checks the checkpoint against it strictly, and runs `--episodes`
episodes with the deterministic action tanh(μ(s)), as every training file evaluates (for a famo2o_lag.py checkpoint:
β from the balance model, or `--beta`). Prints each episode's return and cost, their means, and the DSRL-normalised
mean return and cost at `--cost-limit` (default: the checkpoint's own). The episodes are those of the training
files' `evaluate()`: with the same global seed, `evaluate(actor, env, N, ...)` gives the same means.

`--video FILE.gif` renders the first episode off-screen with pybullet's CPU renderer (no display, no GPU), the camera
following the agent; `--video-frames N` stops recording after N frames (the episode still runs to its end).
Self-contained like the algorithm files: the shared definitions are verbatim copies (tests/test_sync.py).
"""
import math
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional, Tuple

os.environ.setdefault("DSRL_SUPPRESS_IMPORT_ERROR", "1")  # dsrl warns about suites we do not install
import dsrl  # noqa: F401  (registers the Offline*-v0 environments)
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from PIL import Image


@dataclass
class Args:
    checkpoint: str
    """checkpoint to evaluate (any file of this project in the "o2o-safe-rl/1" format)"""
    episodes: int = 10
    """deterministic evaluation episodes"""
    seed: int = 0
    """seed of numpy (Bullet's reset noise), torch and random"""
    cost_limit: Optional[float] = None
    """episode cost limit d of the normalised cost (default: the checkpoint's cost_limit)"""
    video: Optional[str] = None
    """write the first episode as an animated GIF to this path (must end in .gif)"""
    video_frames: Optional[int] = None
    """record at most this many frames of the first episode (default: all of it)"""
    video_size: Tuple[int, int] = (320, 240)
    """width and height of the video frames in pixels"""
    beta: Optional[float] = None
    """famo2o_lag.py checkpoints only: a fixed balance β instead of the balance model's (within the trained range)"""


# ----------------------------------------------------------------------------------------------------------
# Verbatim copies of the algorithm files' definitions (tests/test_sync.py checks that they stay identical).
class InputError(Exception):
    """Bad input (dataset, checkpoint, flag): reported as one line and a non-zero exit, no traceback."""


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


CHECKPOINT_FORMAT = "o2o-safe-rl/1"
CHECKPOINT_KEYS = ("algo", "reward_scale", "cost_limit", "step", "actor", "critic", "critic_target", "cost_critic",
                   "cost_critic_target")


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


# famo2o_lag.py's policy: the universal actor π(a|s, β) with β from the balance model π_b(β|s).
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
# This file's own parts: reading any checkpoint's policy, and the video.
def read_checkpoint(path: str) -> dict:
    """The checkpoint as a dict, or a one-line InputError; its env_id says which env to make (load_checkpoint then
    checks the file against that env strictly)."""
    if not os.path.isfile(path):
        raise InputError(f"--checkpoint {path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one with more than tensors and plain values
        reason = (str(e).splitlines() or [""])[0].split(". ")[0]
        raise InputError(f"{path}: cannot read checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or not isinstance(ckpt.get("env_id"), str):
        raise InputError(f"{path}: not an {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


def load_policy(ckpt: dict, path: str, obs_dim: int, act_dim: int, beta: Optional[float]) -> nn.Module:
    """The acting policy of a checkpoint, loaded strictly: its Actor, or for famo2o_lag.py (which stores a `balance`
    model) the universal actor with β from the balance model or the fixed `beta`."""
    hidden_sizes = tuple(ckpt["hidden_sizes"])
    try:
        if "balance" not in ckpt:
            if beta is not None:
                raise InputError(f"--beta: {path} is a {ckpt['algo']} checkpoint, not a famo2o_lag.py one")
            policy = Actor(obs_dim, act_dim, hidden_sizes)
            policy.load_state_dict(ckpt["actor"])
            return policy.eval()
        beta_min, beta_max = ckpt["beta_range"]
        if beta is not None and not beta_min <= beta <= beta_max:
            raise InputError(f"--beta {beta} lies outside the trained range [{beta_min}, {beta_max}]")
        balance = BalanceModel(obs_dim, tuple(ckpt["args"]["balance_hidden_sizes"]), beta_min, beta_max)
        balance.load_state_dict(ckpt["balance"])
        actor = Actor(obs_dim + BETA_DIM, act_dim, hidden_sizes)
        actor.load_state_dict(ckpt["actor"])
        return FamilyPolicy(actor, balance, beta).eval()
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # missing part, or weights of another shape
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise InputError(f"{path}: its policy does not fit ({type(e).__name__}: {' '.join(lines[:2])})") from None


def check_video_path(path: str) -> None:
    """Refuse, before any work, a video path that is not a .gif or where no file can be created."""
    if not path.lower().endswith(".gif"):
        raise InputError(f"--video {path}: only GIF is written; give a path ending in .gif")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(path)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp"):  # os.access says yes to root everywhere
            pass
    except OSError as e:
        raise InputError(f"--video {path}: cannot write there ({type(e).__name__})") from None


def render_frame(raw: gym.Env, width: int, height: int) -> np.ndarray:
    """An RGB frame (height, width, 3) of a Bullet-Safety-Gym env from pybullet's CPU renderer (works in DIRECT mode,
    without a display or GPU), the camera 5 m from the agent at the task camera's yaw and pitch. The task's red cost
    sphere around the agent is shown only while the agent incurs cost (the CPU renderer ignores the transparency that
    hides it otherwise). `env.render()` is not used: it would open pybullet's GUI, and its camera is fixed in space."""
    camera, bc = raw.world.camera, raw.bc
    indicator = getattr(raw.agent, "violation_body_id", None)
    hide = indicator is not None and bc.getVisualShapeData(indicator)[0][7][3] < 0.1  # alpha: 0.5 while costly
    if hide:  # a visual-only body (no mass, no collision shape): moving it away and back leaves the physics alone
        position, orientation = bc.getBasePositionAndOrientation(indicator)
        bc.resetBasePositionAndOrientation(indicator, [0.0, 0.0, -100.0], orientation)
    view = bc.computeViewMatrixFromYawPitchRoll(cameraTargetPosition=list(raw.agent.get_position()), distance=5.0,
                                                yaw=camera.cam_yaw, pitch=camera.cam_pitch, roll=0, upAxisIndex=2)
    projection = bc.computeProjectionMatrixFOV(fov=60, aspect=width / height, nearVal=0.1, farVal=100.0)
    _, _, pixels, _, _ = bc.getCameraImage(width, height, viewMatrix=view, projectionMatrix=projection,
                                           renderer=bc.ER_TINY_RENDERER)
    if hide:
        bc.resetBasePositionAndOrientation(indicator, position, orientation)
    return np.reshape(np.asarray(pixels, dtype=np.uint8), (height, width, 4))[:, :, :3]


class FrameRecorder(gym.Wrapper):
    """Renders a frame after reset() and after every step() until `max_frames` are held; otherwise the env as is,
    so evaluate() runs on it unchanged."""

    def __init__(self, env: gym.Env, max_frames: Optional[int], size: Tuple[int, int]):
        super().__init__(env)
        self.frames, self.max_frames, self.size = [], max_frames, size

    def capture(self) -> None:
        if self.max_frames is None or len(self.frames) < self.max_frames:
            self.frames.append(render_frame(self.env.unwrapped, *self.size))

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self.capture()
        return out

    def step(self, action):
        out = self.env.step(action)
        self.capture()
        return out


def write_gif(path: str, frames: list, seconds_per_frame: float) -> None:
    """Animated GIF at the env's real-time rate (GIF delays are whole centiseconds), written to a temporary name and
    renamed, like the checkpoints."""
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path + ".tmp", format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, 10 * round(100 * seconds_per_frame)))
    os.replace(path + ".tmp", path)


def main(args: Args) -> dict:
    if args.episodes < 1:
        raise InputError(f"--episodes must be >= 1, got {args.episodes}")
    if args.video_frames is not None and args.video_frames < 1:
        raise InputError(f"--video-frames must be >= 1, got {args.video_frames}")
    if min(args.video_size) < 16:
        raise InputError(f"--video-size must be at least 16 × 16 pixels, got {args.video_size}")
    if args.video is not None:
        check_video_path(args.video)
    ckpt = read_checkpoint(args.checkpoint)
    random.seed(args.seed)
    np.random.seed(args.seed)  # Bullet's reset noise
    torch.manual_seed(args.seed)
    env = make_env(ckpt["env_id"], args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    load_checkpoint(args.checkpoint, ckpt["env_id"], obs_dim, act_dim, tuple(ckpt.get("hidden_sizes") or ()))
    policy = load_policy(ckpt, args.checkpoint, obs_dim, act_dim, args.beta)
    cost_limit = float(ckpt["cost_limit"]) if args.cost_limit is None else args.cost_limit
    if cost_limit < 0:
        raise InputError(f"--cost-limit must be >= 0, got {cost_limit}")
    if args.video is not None and not (hasattr(env.unwrapped, "bc") and hasattr(env.unwrapped, "agent")):
        raise InputError(f"--video: {ckpt['env_id']} is not a Bullet-Safety-Gym env; only those are rendered here")

    trained_d = ckpt["cost_limit"]
    trained_d = f"{trained_d:g}" if isinstance(trained_d, (int, float)) else trained_d
    header = f"{args.checkpoint}: {ckpt['algo']} on {ckpt['env_id']}, step {ckpt['step']}, d = {trained_d}"
    stored = ckpt.get("eval")
    if isinstance(stored, dict) and "return" in stored:  # what the training file measured when it saved the file
        header += f"; stored evaluation: return {stored['return']:.1f}, cost {stored['cost']:.1f}"
    print(header + (f"; fixed β = {args.beta:g}" if args.beta is not None else ""))
    cpu = torch.device("cpu")
    recorder = FrameRecorder(env, args.video_frames, args.video_size) if args.video is not None else None
    episodes = [evaluate(policy, recorder if (i == 0 and recorder) else env, 1, cost_limit, cpu)
                for i in range(args.episodes)]  # one at a time: the same episodes as evaluate(policy, env, N, ...)
    returns, costs = [e["return"] for e in episodes], [e["cost"] for e in episodes]
    env.unwrapped.set_target_cost(cost_limit)
    norm_ret, norm_cost = env.unwrapped.get_normalized_score(np.mean(returns), np.mean(costs))
    result = {"return": float(np.mean(returns)), "cost": float(np.mean(costs)),
              "normalized_return": float(norm_ret), "normalized_cost": float(norm_cost),
              "episode_returns": returns, "episode_costs": costs, "cost_limit": cost_limit}

    print(f"{'episode':>8}{'return':>10}{'cost':>8}")
    for i, (ret, cost) in enumerate(zip(returns, costs), 1):
        print(f"{i:>8}{ret:>10.1f}{cost:>8.1f}")
    print(f"{'mean':>8}{result['return']:>10.1f}{result['cost']:>8.1f}")
    print(f"normalised (DSRL, d = {cost_limit:g}): return {norm_ret:.3f}, cost {norm_cost:.3f}; "
          f"{sum(c > cost_limit for c in costs)} of {len(costs)} episodes over the limit")
    if recorder is not None:
        raw = env.unwrapped
        try:
            write_gif(args.video, recorder.frames, getattr(raw, "time_step", 1 / 30) * getattr(raw, "frame_skip", 1))
        except OSError as e:
            raise InputError(f"--video {args.video}: writing failed ({e})") from None
        print(f"video: {args.video} ({len(recorder.frames)} frames of episode 1, "
              f"{args.video_size[0]}×{args.video_size[1]})")
    return result


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:
        sys.exit(f"evaluate.py: error: {e}")
