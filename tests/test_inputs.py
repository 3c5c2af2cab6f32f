"""Rules every entry point shares: bad flags are refused with one line naming the flag, before any work starts."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

ENTRY_POINTS = {"cpq.py": [], "safe_iql.py": [], "bear_lag.py": [], "vpa.py": ["--init", "unused.pt"], "sac_lag_apid.py": [],
                "famo2o_lag.py": [], "marvel_full.py": []}


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_negative_cost_limit_is_refused_by_every_file(script, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--env-id", "OfflineCarRun-v0", "--no-cuda",
                           "--cost-limit", "-5", *ENTRY_POINTS[script]],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--cost-limit" in proc.stderr, proc.stderr
    assert not os.listdir(tmp_path), "nothing is written before the flags are checked"


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("flag, value, message", [("--gamma", "1.5", "--gamma 1.5: must be in (0, 1)"),
                                                  ("--eval-episodes", "0", "--eval-episodes 0: must be >= 1")])
def test_shared_flag_rules_are_the_same_in_every_file(script, flag, value, message, tmp_path):
    """Every file checks its shared flags through the same check_common_args: refused in the same words."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--env-id", "OfflineCarRun-v0", "--no-cuda",
                           flag, value, *ENTRY_POINTS[script]], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"{script}: error: {message}", proc.stderr
    assert not os.listdir(tmp_path), "nothing is written before the flags are checked"


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_unwritable_output_is_refused_before_training(script, tmp_path):
    where = ["--save-dir", "/proc/nope"] if script == "marvel_full.py" else ["--save-path", "/proc/nope/x.pt"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--env-id", "OfflineCarRun-v0", "--no-cuda",
                           *where, *ENTRY_POINTS[script]], capture_output=True, text=True, cwd=tmp_path, timeout=15)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "/proc/nope" in proc.stderr, proc.stderr


HELP_FILES = [*ENTRY_POINTS, "benchmark/run_grid.py", "benchmark/evaluate.py", "benchmark/collect_dataset.py"]


@pytest.mark.parametrize("path", HELP_FILES)
def test_help_texts_are_single_paragraphs(path):
    """tyro keeps the line breaks of a multi-line field docstring, so `--help` would break sentences mid-line: every
    field of an Args class has a help text, an inline `# comment` (one line by construction) or a docstring of one
    line or one implicitly joined string."""
    import ast
    import io
    import tokenize
    source = open(os.path.join(ROOT, path)).read()
    args = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef) and node.name == "Args"]
    assert args, f"{path} has no Args class"
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    commented = {t.start[0] for t in tokens if t.type == tokenize.COMMENT}
    body, fields, multi_line, without_help = args[0].body, 0, [], []
    for stmt, after in zip(body, [*body[1:], None]):
        if not isinstance(stmt, ast.AnnAssign):
            continue
        fields += 1
        doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
            and isinstance(after.value.value, str) else None
        if doc is not None and "\n" in doc:
            multi_line.append(stmt.target.id)
        if doc is None and not commented & set(range(stmt.lineno, stmt.end_lineno + 1)):
            without_help.append(stmt.target.id)
    assert fields and not multi_line and not without_help, (multi_line, without_help)
