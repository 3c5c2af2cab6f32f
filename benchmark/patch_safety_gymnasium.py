"""Make the installed safety-gymnasium 0.4.0 importable on Python ≥ 3.11 (for the velocity tasks).

    python benchmark/patch_safety_gymnasium.py

Its asset dataclasses declare `color: np.array = COLOR['apple']`: an ndarray default, which Python 3.11's dataclasses
reject as mutable (ValueError at import). Each such line becomes
`color: np.array = __import__('dataclasses').field(default_factory=lambda: COLOR['apple'])`, the same value per
instance. The package is found without importing it (importing is what fails); only those lines change; a second run
changes nothing. Standard library only.
"""
import importlib.util
import os
import re
import sys

# `<indent><name>: np.array = COLOR[<key>]`, optionally followed by a comment; the rewritten form no longer matches
MUTABLE_DEFAULT = re.compile(r"^(\s*\w+\s*:\s*np\.array\s*=\s*)(COLOR\[[^\]]+\])(\s*(#.*)?)$")
FIXED = r"\1__import__('dataclasses').field(default_factory=lambda: \2)\3"


def patch(package_dir: str) -> list:
    """Rewrites the package's mutable ndarray defaults in place; returns (path, line number) of each changed line."""
    changed = []
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            new = [MUTABLE_DEFAULT.sub(FIXED, line) for line in lines]
            if new != lines:
                changed += [(path, i + 1) for i, (a, b) in enumerate(zip(lines, new)) if a != b]
                with open(path, "w", encoding="utf-8") as f:
                    f.write("\n".join(new))
    return changed


def main() -> None:
    spec = importlib.util.find_spec("safety_gymnasium")  # a top-level name: found without running its __init__
    if spec is None or not spec.submodule_search_locations:
        sys.exit("patch_safety_gymnasium.py: error: safety_gymnasium is not installed "
                 "(pip install --no-deps safety-gymnasium==0.4.0, see requirements-velocity.txt)")
    package_dir = list(spec.submodule_search_locations)[0]
    changed = patch(package_dir)
    for path, line in changed:
        print(f"patched {os.path.relpath(path, os.path.dirname(package_dir))}:{line}")
    print(f"{package_dir}: {len(changed)} line(s) changed" + ("" if changed else " (already patched)"))


if __name__ == "__main__":
    main()
