"""What the algorithm files are made of: per file its lines, non-blank lines, and non-blank lines by concern.

    python benchmark/anatomy.py            # the table
    python benchmark/anatomy.py --check    # exit 1 if a file is over its line limit or under 50 % algorithm

Each top-level definition goes to one concern by its name (ALGORITHM, DATA, CHECKPOINTS, FLAGS below; imports, the
module docstring, InputError, `if __name__` and any name not listed: other). Comment lines between definitions go
with the definition below them. A function such as `main` is split: the lines of its outermost training loop(s)
(a `for` over `progress`, `tqdm(...)` or a `range` of steps/episodes) are algorithm ("loop"), the rest of it is
"set-up and logging".
"""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = {"cpq.py": 500, "safe_iql.py": 500, "bear_lag.py": 500, "vpa.py": 500, "sac_lag_apid.py": 700, "marvel_full.py": 900,
          "famo2o_lag.py": 700}
MAX_ARGS_FIELDS = {"marvel_full.py": 60}
CONCERNS = {  # concern → names (full-match regular expressions); the first match wins
    "set-up and logging": r"PROGRESS_FIELDS",
    "algorithm": r"mlp|Actor|QEnsemble|soft_update|VAE|sample_pretanh|vae_pretanh_samples|BalanceModel|FamilyPolicy"
                 r"|beta_\w+|BETA_\w+|condition|CPQ|BEARLag|VPA|vpa_targets|SACLag|\w+Lagrangian|make_lagrangian"
                 r"|\w+Stage|DeploymentGate|next_anchor_weight|episode_q_threshold|is_better|gaussian_mmd"
                 r"|mixed_max_target|SafeIQL|expectile_loss|feasibility_weights|log_prob_of|SAFE_IQL"
                 r"|descend|collect_episodes|ReplayBuffer|REPLAY_KEYS|FamO2OLag|family_sweep|evaluate|mc_return"
                 r"|collect_pairs|spearman\w*|report_spearman|snapshot|restore|policy_action|PAIR_KINDS|PLAIN",
    "data": r"find_dataset|load_dataset|DSRL_KEYS|make_env",
    "checkpoints": r"CHECKPOINT_\w+|to_cpu|save_checkpoint|load_checkpoint|prepare_output_dir",
    "flags": r"Args|ENV_DEFAULTS|PAPER_ONLINE|refuse|check_\w+|online_defaults|[A-Z][A-Z0-9_]*",  # and constants
}
LOOP = re.compile(r"progress|tqdm\(.*|range\(.*(steps|episodes|iters).*")


def names_of(node):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def concern_of(node) -> str:
    for concern, pattern in CONCERNS.items():
        if any(re.fullmatch(pattern, name) for name in names_of(node)):
            return concern
    return "other"


def training_loops(fn):
    """The outermost loops of fn (not inside another loop) that run over the training steps."""
    found, todo = [], list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.For, ast.While)):
            if isinstance(node, ast.For) and LOOP.fullmatch(ast.unparse(node.iter)):
                found.append(node)
        elif not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return found


def anatomy(path: str) -> dict:
    source = open(path).read()
    lines, tree = source.splitlines(), ast.parse(source)
    concern_at = ["other"] * (len(lines) + 2)  # 1-based line → concern
    start = 1  # comments above a definition belong to it
    for node in tree.body:
        concern = concern_of(node)
        loops = training_loops(node) if isinstance(node, ast.FunctionDef) else []
        if concern == "other" and loops:
            concern = "set-up and logging"
        for i in range(start, node.end_lineno + 1):
            concern_at[i] = concern
        for loop in loops:
            for i in range(loop.lineno, loop.end_lineno + 1):
                concern_at[i] = "loop"
        start = node.end_lineno + 1
    counts = {c: 0 for c in ["algorithm", "loop", "set-up and logging", "data", "checkpoints", "flags", "other"]}
    for i, line in enumerate(lines, 1):
        if line.strip():
            counts[concern_at[i]] += 1
    args = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args"]
    fields = sum(isinstance(s, ast.AnnAssign) for s in args[0].body) if args else 0
    nonblank = sum(counts.values())
    return {"lines": len(lines), "non-blank": nonblank, **counts, "Args fields": fields,
            "algorithm %": 100 * (counts["algorithm"] + counts["loop"]) / nonblank}


def main(check: bool) -> int:
    columns = ["lines", "non-blank", "algorithm", "loop", "set-up and logging", "data", "checkpoints", "flags",
               "other", "Args fields", "algorithm %"]
    print(f"{'file':16}" + "".join(f"{c:>{max(len(c), 6) + 2}}" for c in columns))
    problems = []
    for name, limit in LIMITS.items():
        a = anatomy(os.path.join(ROOT, name))
        print(f"{name:16}" + "".join(f"{a[c]:>{max(len(c), 6) + 2}{'.1f' if c == 'algorithm %' else ''}}"
                                     for c in columns))
        if a["lines"] > limit:
            problems.append(f"{name}: {a['lines']} lines, over {limit}")
        if a["algorithm %"] < 50:
            problems.append(f"{name}: {a['algorithm %']:.1f} % algorithm, under 50 %")
        if a["Args fields"] > MAX_ARGS_FIELDS.get(name, 10 ** 9):
            problems.append(f"{name}: {a['Args fields']} Args fields, over {MAX_ARGS_FIELDS[name]}")
    print("algorithm % = (algorithm + loop) / non-blank; loop = the lines of main's training loop(s)")
    for p in problems:
        print(f"limit: {p}")
    return 1 if check and problems else 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv[1:]))
