"""Run the Marvel benchmark over tasks × cost limits × seeds × methods as Ray tasks, and collect their results.

    python benchmark/run_grid.py --offline-checkpoint 'runs/cpq_s{seed}/cpq.pt' --seeds 0 1 2 3 4 \
        --methods marvel warm_start apid_only vpa_only vpa_pid scratch --out benchmark/results/carrun_grid
    python benchmark/run_grid.py --env-ids OfflineCarRun-v0 OfflineBallRun-v0 --cost-limits 10 20 --seeds 0 1 2 \
        --offline-steps 10000 --out benchmark/results/my_grid          # the offline stage is part of the grid

Every run is one subprocess (with `OMP_NUM_THREADS=1`) inside one Ray task that asks for 1 CPU (and a GPU with
`--cuda` when the cluster has one). Per (task, cost limit d, seed) the grid runs the offline stage (`safe_iql.py --seed S`, or cpq.py with `--offline-algo cpq`;
not with `--offline-checkpoint`, which names existing checkpoints), then VPA (`vpa.py --init <offline checkpoint>
--seed S`), which every method that starts from VPA shares, then one `sac_lag_apid.py` per method. The stages are
chained by object refs: the VPA task takes the offline task's ref, an online task the offline (and VPA) refs, so Ray
starts a run as soon as what it needs exists. Ray runs on this machine by default (`ray.init()` with `--jobs` CPUs);
`--address auto` (or `$RAY_ADDRESS`) joins a running cluster, whose nodes must then see the repository, `--out` and
`--work-dir` at the same paths. Ray is an optional extra: `pip install -r requirements-bench.txt`.

Skip if done: a run whose result file exists in `--out` is skipped, a complete offline checkpoint and an existing VPA
checkpoint in `--work-dir` are reused (an interrupted offline run continues from its latest evaluation's `*_last.pt`
with `--resume`; not bit-identical to an uninterrupted run), so a grid can be run in chunks and resumed. A failed run
prints `failed: <run> (log: <path>)`, so do the runs that needed it (with the same log); the others go on, and the
exit code is 1. Into `--out` go, per run, `<method>_seed<S>.csv` (sac_lag_apid.py's per-iteration progress) and
`<method>_seed<S>.json` (the command, the commit, and the offline / after-VPA / final evaluations with the online
violations), and per seed `vpa_seed<S>_spearman.csv`. `benchmark/plot.py` turns them into curves and tables. One task
at one cost limit writes straight into `--out` and `--work-dir`, as before; with several tasks or limits each (task,
d) gets a sub-folder `<env-id>_d<d>` of both (`<env-id>` when `--cost-limits` is not given: the scripts' default d).

The offline checkpoint can be one file for all seeds, or a pattern with `{seed}` (and `{env_id}`, `{cost_limit}`).
"""
import contextlib
import csv
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's online phase: sac_lag_apid.py's PAPER_ONLINE (what its --paper sets), spelled out because --paper
# overrides later flags and a method must still be able to change one of them (e.g. scratch_standard's schedule).
PAPER = ["--deploy", "learner", "--cost-margin", "0", "--rollback-tightening", "1", "--cost-signal", "episodes",
         "--bc-weight", "0", "--offline-ratio", "0", "--no-bounded-gain-adaptation",
         "--updates-per-iter", "20", "--batch-size", "64"]
# method → (starting point, extra sac_lag_apid.py flags). "vpa": the VPA-aligned checkpoint; "offline": the offline
# checkpoint as it is; "scratch": random networks. `recommended` is what marvel_full.py runs by default; the six of
# the paper (its Figures 3 and 5) follow.
METHODS = {
    "recommended": ("vpa", []),                                       # sac_lag_apid.py's defaults
    # the trivial baseline: the offline policy runs the whole online budget, unchanged (no update)
    "offline": ("offline", ["--deploy", "learner", "--cost-signal", "episodes", "--updates-per-iter", "0",
                            "--offline-ratio", "0"]),
    "marvel": ("vpa", PAPER),                                         # VPA + aPID
    "warm_start": ("offline", PAPER + ["--lagrangian", "dual"]),      # plain SAC-Lag from the offline checkpoint
    "apid_only": ("offline", PAPER),                                  # aPID, no VPA
    "vpa_only": ("vpa", PAPER + ["--lagrangian", "dual"]),            # VPA, plain dual ascent
    "vpa_pid": ("vpa", PAPER + ["--lagrangian", "pid"]),              # VPA, PID with fixed gains
    "scratch": ("scratch", PAPER),                                    # From Scratch, paper schedule (aPID)
    # From Scratch with a standard SAC schedule: one update of 256 per env step, same env-step budget
    "scratch_standard": ("scratch", PAPER + ["--episodes-per-iter", "1", "--updates-per-iter", "200",
                                             "--batch-size", "256"]),  # later flags win over PAPER's
}
# Variants for diagnosis: `<method>+<variant>` adds these flags, e.g. marvel+autotune. (Rows of variants whose
# flags were removed, e.g. +costfloor or +passes2, stay in benchmark/results/ with the commit that made them.)
VARIANTS = {
    "autotune": ["--autotune"],                                    # learn the SAC temperature α
    "mix50": ["--offline-ratio", "0.5"],                           # half of each minibatch from the offline data
    "updates200": ["--updates-per-iter", "200"],                   # 10× the paper's updates per iteration
    "actorlr0.1x": ["--actor-lr", "5e-6"],                         # CarRun's actor lr / 10
    "criticlr0.1x": ["--critic-lr", "5e-4", "--cost-critic-lr", "8e-4"],  # CarRun's critic lrs / 10
    "notighten": ["--rollback-tightening", "1"],                   # a fixed pass cost and target, (1 − m)·d
    "margin75": ["--cost-margin", "0.75"],                         # λ and the gate aim at d/4 instead of d/2
}


@dataclass
class Args:
    # help that spans lines is one implicitly joined string: tyro keeps the line breaks of a multi-line docstring
    out: str
    ("results folder (CSVs and JSONs of the finished runs; existing ones are skipped); with several tasks or cost "
     "limits, one sub-folder <env-id>_d<d> per (task, d)")
    offline_checkpoint: Optional[str] = None
    ("offline checkpoints (safe_iql.py / cpq.py / bear_lag.py): one file, or a pattern with {seed} (and {env_id}, "
     "{cost_limit}); without it the grid runs --offline-algo per seed into --work-dir")
    offline_algo: str = "safe_iql"
    """the grid's offline learner: safe_iql (marvel_full.py's default) or cpq (the paper's)"""
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """seeds (the offline run and VPA of a seed use the same seed)"""
    methods: List[str] = field(default_factory=lambda: ["recommended", "marvel", "warm_start", "scratch"])
    """methods to run: names from METHODS, each optionally with +VARIANT suffixes (e.g. marvel+autotune)"""
    env_id: str = "OfflineCarRun-v0"
    """DSRL environment id (one task; --env-ids for several)"""
    env_ids: List[str] = field(default_factory=list)
    """several DSRL environment ids, one grid each (replaces --env-id)"""
    cost_limits: List[float] = field(default_factory=list)
    """cost limits d, one grid each, passed as --cost-limit to every script (empty: no flag, the scripts' d = 20)"""
    work_dir: str = "runs/grid"
    ("where checkpoints, logs and TensorBoard files of the runs go (one per task and offline checkpoint: the offline "
     "and VPA checkpoints in it are reused); several tasks or limits get sub-folders as --out does")
    offline_steps: Optional[int] = None
    """--total-steps of the grid's offline runs (default: the learner's own); not with --offline-checkpoint"""
    offline_extra: str = ""
    """extra flags for the grid's offline runs, one string, e.g. --offline-extra='--eval-every 2500'"""
    jobs: int = 2
    """runs at a time on a local Ray instance (its CPUs); a cluster joined with --address runs on all of its CPUs"""
    address: Optional[str] = None
    """Ray cluster to join: auto, or host:port of a `ray start --head` (default: $RAY_ADDRESS, else a local instance)"""
    cuda: bool = False
    """give each run a GPU (--gpus-per-run) when the Ray cluster has one, and let the scripts use it"""
    gpus_per_run: float = 1.0
    """GPUs each run asks for with --cuda (a fraction packs several runs on one GPU)"""
    extra: str = ""
    """extra flags for every sac_lag_apid.py run of this invocation, as one string, e.g. --extra='--offline-ratio 0.5'"""
    vpa_extra: str = ""
    """extra flags for vpa.py, one string"""


@dataclass
class Cell:
    """One (task, cost limit) of the grid and its folders."""
    env_id: str
    cost_limit: Optional[float]
    out: str
    work: str
    prefix: str  # "" for a one-cell grid, else "<sub-folder>/", in front of run names in messages

    def limit_flags(self) -> List[str]:
        return [] if self.cost_limit is None else ["--cost-limit", f"{self.cost_limit:g}"]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def at(path: str) -> str:
    """Paths are relative to the repository (the scripts run there), whatever the worker's working directory."""
    return os.path.join(ROOT, path)


def from_here(path: str) -> str:
    """A path given on this command line (relative to the current directory) as the scripts see it from ROOT:
    relative when it is inside the repository (so the recorded commands are as before), else absolute."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, ROOT]) == ROOT
    return os.path.relpath(path, ROOT) if inside else path


class RunFailed(RuntimeError):
    """A stage or run that failed: its name, its log, why (empty: the script's exit status; the log says why)."""

    def __init__(self, run: str, log: str, reason: str = ""):
        super().__init__(run, log, reason)
        self.run, self.log, self.reason = run, log, reason

    def __str__(self) -> str:
        return f"{self.run} (log: {self.log})" + (f": {self.reason}" if self.reason else "")


@contextlib.contextmanager
def failures_as(name: str, log: str):
    try:
        yield
    except RunFailed:
        raise
    except Exception as e:  # a refused checkpoint, a missing file: the same report, with the reason
        raise RunFailed(name, log, f"{type(e).__name__}: {e}") from None


def run(cmd: List[str], log_path: str, name: str, append: bool = False) -> None:
    os.makedirs(os.path.dirname(at(log_path)), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(at(log_path), "a" if append else "w") as log:
        blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])  # Ray's worker thread blocks it, and
        try:                                                                   # a child inherits the mask
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            while (code := proc.poll()) is None:  # not proc.wait(): a cancelled task's KeyboardInterrupt comes between
                time.sleep(0.5)                   # bytecodes, which a blocking wait never reaches
        except BaseException:  # cancelled (Ctrl-C on the grid): the script's own Ctrl-C (it says what it kept)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code != 0:
        raise RunFailed(name, log_path, "" if code == 1 else f"exit {code}")


def checkpoint_eval(path: str) -> dict:
    return torch.load(at(path), map_location="cpu", weights_only=True).get("eval")


def final_row(csv_path: str) -> dict:
    """The last evaluation row and the last training row of a progress CSV."""
    rows = list(csv.DictReader(open(at(csv_path))))
    last_eval = [r for r in rows if r["eval_return"]][-1]
    last_train = [r for r in rows if r["lambda"]][-1]
    return {"return": float(last_eval["eval_return"]), "cost": float(last_eval["eval_cost"]),
            "normalized_return": float(last_eval["eval_normalized_return"]),
            "normalized_cost": float(last_eval["eval_normalized_cost"]),
            "online_violations": int(last_train["violations"]), "cumulative_cost": float(last_train["cumulative_cost"]),
            "episodes": int(last_train["episodes"]), "lambda": float(last_train["lambda"]),
            # the learner's evaluation episodes (sac_lag_apid.py --learner-eval), counted apart; None when off
            "learner_eval_violations": next((int(r["learner_eval_violations"]) for r in reversed(rows)
                                             if r.get("learner_eval_violations")), None)}


# ---- the three stages; each runs as one Ray task (1 CPU) and returns what the next one needs ----
def offline_paths(cell: Cell, seed: int, algo: str) -> tuple:
    path = os.path.join(cell.work, f"{algo}_seed{seed}", f"{algo}.pt")
    return path, path.removesuffix(".pt") + ".log"


def offline_stage(args: Args, cell: Cell, seed: int, device: List[str]) -> str:
    """safe_iql.py or cpq.py for one seed, unless a complete run is there (best, and a *_last.pt at the last step); an
    interrupted run continues from its *_last.pt (--resume). Returns the checkpoint."""
    path, log = offline_paths(cell, seed, args.offline_algo)
    name = f"{cell.prefix}{args.offline_algo}_seed{seed}"
    last = path.removesuffix(".pt") + "_last.pt"
    with failures_as(name, log):
        ckpt = torch.load(at(last), map_location="cpu", weights_only=True) if os.path.isfile(at(last)) else None
        if not (os.path.isfile(at(path)) and ckpt is not None and ckpt["step"] == ckpt["args"]["total_steps"]):
            steps = [] if args.offline_steps is None else ["--total-steps", str(args.offline_steps)]
            cmd = [sys.executable, f"{args.offline_algo}.py", "--env-id", cell.env_id, "--seed", str(seed), "--save-path", path,
                   *device, *cell.limit_flags(), *steps, *shlex.split(args.offline_extra)]
            run(cmd + (["--resume", last] if ckpt is not None else []), log, name, append=ckpt is not None)
        made = torch.load(at(path), map_location="cpu", weights_only=True)["args"]
        wanted = {"env_id": cell.env_id, "seed": seed, "cost_limit": cell.cost_limit, "total_steps": args.offline_steps}
        differ = {k: made.get(k) for k, v in wanted.items() if v is not None and made.get(k) != v}
        if differ:
            raise RuntimeError(f"{path} was made with {differ}, not {({k: wanted[k] for k in differ})}; "
                               f"pass another --work-dir")
    return path


def vpa_stage(args: Args, cell: Cell, seed: int, device: List[str], offline: str) -> str:
    """VPA once per seed, shared by all VPA methods; its Spearman table is copied into --out. Returns the checkpoint."""
    path = os.path.join(cell.work, f"vpa_seed{seed}", "vpa.pt")
    log = path.removesuffix(".pt") + ".log"
    name = f"{cell.prefix}vpa_seed{seed}"
    with failures_as(name, log):
        if not os.path.isfile(at(path)):
            run([sys.executable, "vpa.py", "--env-id", cell.env_id, "--init", offline, "--seed", str(seed),
                 "--save-path", path, *device, *cell.limit_flags(), *shlex.split(args.vpa_extra)], log, name)
        made_from = torch.load(at(path), map_location="cpu", weights_only=True)["args"]
        if (made_from["env_id"], made_from["init"]) != (cell.env_id, offline):
            raise RuntimeError(f"{path} was made from {made_from['init']} on {made_from['env_id']}, not from "
                               f"{offline} on {cell.env_id}; pass another --work-dir")
        spearman = path.removesuffix(".pt") + "_spearman.csv"
        if os.path.isfile(at(spearman)):  # absent with --vpa-extra=--no-diagnostic
            shutil.copy(at(spearman), os.path.join(at(cell.out), f"vpa_seed{seed}_spearman.csv"))
    return path


def online_paths(cell: Cell, method: str, seed: int) -> tuple:
    name = f"{method}_seed{seed}"
    return os.path.join(cell.out, name + ".json"), os.path.join(cell.work, name, "log.txt")


def online_stage(args: Args, cell: Cell, method: str, seed: int, device: List[str], commit: str,
                 offline: Optional[str], vpa: Optional[str]) -> str:
    """One sac_lag_apid.py run: its progress CSV and result JSON into --out."""
    name = f"{method}_seed{seed}"
    result_json, log = online_paths(cell, method, seed)
    with failures_as(cell.prefix + name, log):
        if os.path.exists(at(result_json)):
            return f"{cell.prefix}{name}: exists, skipped"
        base, *variants = method.split("+")
        start_kind, flags = METHODS[base]
        flags = flags + [flag for v in variants for flag in VARIANTS[v]]
        init_path = {"vpa": vpa, "offline": offline, "scratch": "scratch"}[start_kind]
        save = os.path.join(cell.work, name, "sac_lag.pt")
        cmd = [sys.executable, "sac_lag_apid.py", "--env-id", cell.env_id, "--init", init_path, "--seed", str(seed),
               "--save-path", save, *device, *cell.limit_flags(), *flags, *shlex.split(args.extra)]
        start = time.time()
        run(cmd, log, cell.prefix + name)
        progress = save.removesuffix(".pt") + "_progress.csv"
        shutil.copy(at(progress), os.path.join(at(cell.out), name + ".csv"))
        result = {"method": method, "seed": seed, "command": " ".join(["python", *cmd[1:]]), "commit": commit,
                  "wall_time_s": round(time.time() - start, 1),
                  "offline": checkpoint_eval(offline) if start_kind != "scratch" else None,
                  "after_vpa": checkpoint_eval(vpa) if start_kind == "vpa" else None,
                  "final": final_row(progress)}
        with open(at(result_json) + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(at(result_json) + ".tmp", at(result_json))
    return f"{cell.prefix}{name}: final {result['final']['return']:.1f} / {result['final']['cost']:.1f}, " \
           f"{result['final']['online_violations']} violations, {result['wall_time_s']:.0f}s"


def start_of(method: str) -> str:
    """Where a method starts: "vpa", "offline" or "scratch"."""
    return METHODS[method.split("+")[0]][0]


def cells_of(args: Args) -> List[Cell]:
    """The (task, d) grid; one cell writes straight into --out and --work-dir (the layout before --env-ids)."""
    pairs = [(env, d) for env in (args.env_ids or [args.env_id]) for d in (args.cost_limits or [None])]
    cells = []
    for env, d in pairs:
        sub = env if d is None else f"{env}_d{d:g}"
        nested = len(pairs) > 1
        cells.append(Cell(env, d, os.path.join(args.out, sub) if nested else args.out,
                          os.path.join(args.work_dir, sub) if nested else args.work_dir, f"{sub}/" if nested else ""))
    return cells


def start_ray(args: Args):
    """A local Ray instance with --jobs CPUs, or the cluster at --address / $RAY_ADDRESS; the caller's own
    ray.init() is used as it is. Returns the module and whether this call started it (and so shuts it down)."""
    try:
        import ray
    except ImportError:
        sys.exit("run_grid.py: error: Ray is not installed; pip install -r requirements-bench.txt")
    if __name__ != "__main__":  # imported (tests): ship this file's functions to the workers by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if ray.is_initialized():
        return ray, False
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address)
        except ConnectionError as e:  # Ray 2.60 only sends its token (`ray start` made one) to `auto` unless told
            sys.exit(f"run_grid.py: error: {e}; if the cluster uses token authentication (Ray's default), pass "
                     f"--address auto on its head node or set RAY_AUTH_MODE=token")
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local instance reports nothing anywhere
        ray.init(num_cpus=args.jobs, include_dashboard=False)
    return ray, True


def main(args: Args) -> int:
    """Runs the grid; returns the number of failed stages and runs."""
    unknown = [m for m in args.methods if m.split("+")[0] not in METHODS or
               any(v not in VARIANTS for v in m.split("+")[1:])]
    if unknown:
        sys.exit(f"run_grid.py: error: unknown methods {unknown}; known: {sorted(METHODS)}, variants {sorted(VARIANTS)}")
    if args.offline_algo not in ("safe_iql", "cpq"):
        sys.exit(f"run_grid.py: error: --offline-algo {args.offline_algo}: must be safe_iql or cpq")
    if args.offline_checkpoint is not None and (args.offline_steps is not None or args.offline_extra):
        sys.exit("run_grid.py: error: --offline-steps and --offline-extra are for the grid's own offline runs, "
                 "not with --offline-checkpoint")
    if args.offline_checkpoint is not None and len(args.env_ids) > 1 and "{env_id}" not in args.offline_checkpoint:
        sys.exit("run_grid.py: error: with several --env-ids, --offline-checkpoint needs {env_id} in its pattern")
    if (args.offline_steps is not None and args.offline_steps < 1) or args.jobs < 1 or args.gpus_per_run <= 0 \
            or any(d < 0 for d in args.cost_limits):
        sys.exit("run_grid.py: error: --offline-steps, --jobs and --gpus-per-run must be > 0, --cost-limits >= 0")
    args = replace(args, out=from_here(args.out), work_dir=from_here(args.work_dir))
    cells = cells_of(args)
    for cell in cells:
        os.makedirs(at(cell.out), exist_ok=True)
    failed, plan = 0, []  # plan: (cell, seed, methods to run, the given offline checkpoint or None: the grid's own)
    for cell in cells:
        for seed in args.seeds:
            todo = []
            for method in args.methods:
                if os.path.exists(at(online_paths(cell, method, seed)[0])):
                    print(f"{cell.prefix}{method}_seed{seed}: exists, skipped", flush=True)
                else:
                    todo.append(method)
            given = None
            if args.offline_checkpoint is not None and any(start_of(m) != "scratch" for m in todo):
                given = from_here(args.offline_checkpoint.format(seed=seed, env_id=cell.env_id, cost_limit=(
                    "" if cell.cost_limit is None else f"{cell.cost_limit:g}")))
                if not os.path.isfile(at(given)):
                    for method in [m for m in todo if start_of(m) != "scratch"]:
                        print(f"failed: {cell.prefix}{method}_seed{seed}: no offline checkpoint {given}", flush=True)
                        failed += 1
                    todo = [m for m in todo if start_of(m) == "scratch"]
            if todo:
                plan.append((cell, seed, todo, given))
    if not plan:
        return failed

    commit = git_commit()
    ray, started = start_ray(args)
    gpus = args.gpus_per_run if args.cuda and ray.cluster_resources().get("GPU", 0) > 0 else 0
    if args.cuda and not gpus:
        print("--cuda: the Ray cluster has no GPU; the runs use the CPU", flush=True)
    device = [] if gpus else ["--no-cuda"]
    stages = {fn: ray.remote(fn) for fn in (offline_stage, vpa_stage, online_stage)}  # exported once

    def task(fn, name: str):
        return stages[fn].options(num_cpus=1, num_gpus=gpus, name=name)

    pending = {}  # object ref → (name, log)
    offlines = []  # per plan entry: the offline checkpoint's path, or the ref of the task that makes it, or None
    for cell, seed, todo, given in plan:  # the long offline runs first: Ray starts ready tasks in the order they came
        offline = given
        if given is None and any(start_of(m) != "scratch" for m in todo):
            name = f"{cell.prefix}{args.offline_algo}_seed{seed}"
            offline = task(offline_stage, name).remote(args, cell, seed, device)
            pending[offline] = (name, offline_paths(cell, seed, args.offline_algo)[1])
        offlines.append(offline)
    for (cell, seed, todo, _), offline in zip(plan, offlines):
        kinds, vpa = {start_of(m) for m in todo}, None
        if "vpa" in kinds:
            name = f"{cell.prefix}vpa_seed{seed}"
            vpa = task(vpa_stage, name).remote(args, cell, seed, device, offline)
            pending[vpa] = (name, os.path.join(cell.work, f"vpa_seed{seed}", "vpa.log"))
        # methods that need VPA alternate with those that do not, so that a seed's VPA runs beside other work
        with_vpa = [m for m in todo if start_of(m) == "vpa"]
        without = [m for m in todo if m not in with_vpa]
        for method in [m for pair in itertools.zip_longest(with_vpa, without) for m in pair if m is not None]:
            name = f"{cell.prefix}{method}_seed{seed}"
            ref = task(online_stage, name).remote(args, cell, method, seed, device, commit,  # its dependencies:
                                                  offline if start_of(method) != "scratch" else None,
                                                  vpa if start_of(method) == "vpa" else None)
            pending[ref] = (name, online_paths(cell, method, seed)[1])
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout lets Ctrl-C through
            for ref in done:
                name, log = pending.pop(ref)
                try:
                    value = ray.get(ref)
                    print(value if value.startswith(name) else f"{name}: {value}", flush=True)
                except Exception as e:  # report and go on: the other runs' results are still kept
                    cause = getattr(e, "cause", None) or e
                    if getattr(cause, "run", name) != name:  # it needed a stage that failed: that stage's log
                        print(f"failed: {name} (log: {cause.log}): needs {cause.run}, which failed", flush=True)
                    elif hasattr(cause, "log"):
                        print(f"failed: {cause}", flush=True)
                    else:  # the task itself died (a lost worker or node)
                        print(f"failed: {name} (log: {log}): {type(cause).__name__}: {cause}", flush=True)
                    failed += 1
    except KeyboardInterrupt:  # cancel the rest; a running script gets its own Ctrl-C (the offline scripts keep their *_last.pt)
        print(f"interrupted: cancelling {len(pending)} stages and runs; the same command resumes the grid", flush=True)
        for ref in pending:
            ray.cancel(ref)
        ray.wait(list(pending), num_returns=len(pending), timeout=90)
        raise SystemExit(130)
    finally:
        if started:
            ray.shutdown()
    return failed


if __name__ == "__main__":
    sys.exit(1 if main(tyro.cli(Args)) else 0)
