"""Single-file rule: blocks copied between files must stay identical.

For every pair of files below, each top-level function, class or constant defined in both must have the same
source (compared as ASTs, so formatting does not matter). `Args` and `main` are per-file by design."""
import ast
import itertools
import os

import pytest

from conftest import ROOT

FILES = ["cpq.py", "safe_iql.py", "bear_lag.py", "vpa.py", "sac_lag_apid.py", "marvel_full.py", "famo2o_lag.py",
         "benchmark/collect_dataset.py", "benchmark/evaluate.py"]
PER_FILE = {"Args", "main", "check_args"}  # check_args: each file's own flags, through the shared flag_rules
# vpa.py's Spearman diagnostic (Monte-Carlo rollouts) and its CLI helper; marvel_full.py leaves the diagnostic to vpa.py
NOT_IN_MARVEL = {"PAIR_KINDS", "PLAIN", "snapshot", "restore", "collect_pairs", "spearman_table"}


def top_level_definitions(path):
    tree = ast.parse(open(path).read())
    defs = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = ast.dump(node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            defs[node.targets[0].id] = ast.dump(node)
    return {k: v for k, v in defs.items() if k not in PER_FILE}


present = [f for f in FILES if os.path.exists(os.path.join(ROOT, f))]


@pytest.mark.parametrize("a, b", list(itertools.combinations(present, 2)))
def test_shared_definitions_are_identical(a, b):
    defs_a, defs_b = (top_level_definitions(os.path.join(ROOT, f)) for f in (a, b))
    differing = sorted(name for name in defs_a.keys() & defs_b.keys() if defs_a[name] != defs_b[name])
    assert not differing, f"{a} and {b} define these differently: {differing}"


def test_marvel_full_carries_every_stage():
    path = os.path.join(ROOT, "marvel_full.py")
    if not os.path.exists(path):
        pytest.skip("marvel_full.py not written yet")
    marvel = top_level_definitions(path)
    for standalone in ("cpq.py", "safe_iql.py", "vpa.py", "sac_lag_apid.py"):
        missing = sorted(top_level_definitions(os.path.join(ROOT, standalone)).keys() - marvel.keys()
                         - NOT_IN_MARVEL)
        assert not missing, f"marvel_full.py lacks {standalone}'s {missing}"


def test_algorithm_files_import_no_project_module():
    project = {"cpq", "safe_iql", "bear_lag", "vpa", "sac_lag_apid", "marvel_full", "famo2o_lag", "benchmark", "tests"}
    for f in present:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, f)).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {n.split(".")[0] for n in names} & project, f"{f} imports project code"
