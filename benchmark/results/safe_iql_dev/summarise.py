"""Table of the development runs: per (variant, task, seed) the kept evaluation (is_better: safe first, then
return), the last one, and the largest fall of a later evaluation below the kept return.

    python benchmark/results/safe_iql_dev/summarise.py   # reads runs/*.jsonl beside it
"""
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
MEDIAN = {"CarRun": 391.6, "BallRun": 337.6, "CarCircle": 153.9, "BallCircle": 206.2}  # benchmark/data_targets.py, d = 20


def kept(rows, limit=20.0):
    safe = [r for r in rows if r["cost"] <= limit]
    return max(safe, key=lambda r: r["return"]) if safe else min(rows, key=lambda r: r["cost"])


print("| variant | task | seed | kept step | kept return / cost | data median | last return / cost | "
      "largest fall after kept |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(HERE, "runs", "*.jsonl"))):
    variant, task, seed = os.path.basename(path).removesuffix(".jsonl").split("_")
    rows = [json.loads(line) for line in open(path)]
    best = kept(rows)
    later = [r for r in rows if r["step"] > best["step"]]
    fall = max([0.0] + [(best["return"] - r["return"]) / best["return"] for r in later])
    print(f"| {variant} | {task} | {seed[1:]} | {best['step']} | {best['return']:.1f} / {best['cost']:.1f} | "
          f"{MEDIAN[task]} | {rows[-1]['return']:.1f} / {rows[-1]['cost']:.1f} | {100 * fall:.1f} % |")
