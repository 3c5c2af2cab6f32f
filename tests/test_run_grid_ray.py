"""benchmark/run_grid.py on Ray: a 2-seed × 2-method grid with tiny budgets, its offline stage included, on a local Ray
instance; its files, the skip on a second call, a failed stage reported while the other runs go on, the (task, d)
layout."""
import json
import os
import sys

import pytest
import ray  # CI installs requirements-bench.txt: without Ray these tests fail, they do not skip

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import run_grid  # noqa: E402

KEYS = ["method", "seed", "command", "commit", "wall_time_s", "offline", "after_vpa", "final"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def tiny(dataset, tmp_path, **kw):
    """The grid with the budgets of the other subprocess tests (tests/test_vpa.py, test_bear_lag.py)."""
    data = f"--dataset-path {dataset}"
    kw = {"seeds": [0, 1], "methods": ["marvel", "warm_start"], "offline_algo": "cpq", **kw}
    return run_grid.Args(
        out=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), offline_steps=4,
        offline_extra=f"--batch-size 32 --eval-every 2 --eval-episodes 1 --hidden-sizes 32 32 --vae-hidden 32 {data}",
        vpa_extra=f"--total-steps 3 --batch-size 8 --eval-every 3 --eval-episodes 1 --diagnostic-pairs 4 "
                  f"--mc-horizon 20 {data}",
        extra="--hidden-sizes 32 32 --online-episodes 2 --episodes-per-iter 2 --updates-per-iter 2 --eval-every 2 "
              "--eval-episodes 1", **kw)


def test_grid_with_its_offline_stage_on_local_ray_then_skipped(local_ray, dataset_file, tmp_path, capsys):
    args = tiny(dataset_file, tmp_path)
    assert run_grid.main(args) == 0
    printed = capsys.readouterr().out
    assert ray.is_initialized()  # the caller's instance: used, not shut down
    out, work = tmp_path / "out", tmp_path / "work"
    for seed in (0, 1):
        assert (work / f"cpq_seed{seed}" / "cpq.pt").is_file() and (work / f"vpa_seed{seed}" / "vpa.pt").is_file()
        assert (out / f"vpa_seed{seed}_spearman.csv").is_file()
        for method in ("marvel", "warm_start"):
            result = json.loads((out / f"{method}_seed{seed}.json").read_text())
            assert list(result) == KEYS and (result["method"], result["seed"]) == (method, seed)
            init = work / (f"vpa_seed{seed}/vpa.pt" if method == "marvel" else f"cpq_seed{seed}/cpq.pt")
            assert result["command"].startswith(f"python sac_lag_apid.py --env-id OfflineCarRun-v0 --init {init} "
                                                f"--seed {seed} --save-path {work / f'{method}_seed{seed}'}")
            assert "--no-cuda" in result["command"] and "--cost-limit" not in result["command"]
            assert result["offline"]["step"] in (2, 4) and result["final"]["episodes"] == 2
            assert (result["after_vpa"]["step"] == 3) if method == "marvel" else result["after_vpa"] is None
            header = (out / f"{method}_seed{seed}.csv").read_text().splitlines()[0]
            assert header.startswith("episodes,env_steps,return,cost,lambda")
            assert f"{method}_seed{seed}: final" in printed
    stamps = {p: p.stat().st_mtime_ns for p in [*out.iterdir(), *work.glob("*/*.pt")]}

    assert run_grid.main(args) == 0  # everything is there: nothing runs again
    printed = capsys.readouterr().out
    assert printed.count("exists, skipped") == 4 and "final" not in printed
    assert stamps == {p: p.stat().st_mtime_ns for p in [*out.iterdir(), *work.glob("*/*.pt")]}


def test_a_failed_stage_is_reported_with_its_log_and_the_others_go_on(local_ray, dataset_file, tmp_path, capsys):
    args = tiny(dataset_file, tmp_path, seeds=[0], methods=["marvel", "scratch"])
    args.offline_extra += " --no-such-flag"  # cpq.py refuses it: the offline stage fails, so do VPA and marvel
    assert run_grid.main(args) == 3
    printed = capsys.readouterr().out
    log = tmp_path / "work" / "cpq_seed0" / "cpq.log"
    assert f"failed: cpq_seed0 (log: {log})" in printed and f"failed: vpa_seed0 (log: {log})" in printed
    assert f"failed: marvel_seed0 (log: {log})" in printed and "--no-such-flag" in log.read_text()
    assert (tmp_path / "out" / "scratch_seed0.json").is_file()  # needs no offline checkpoint: it ran
    assert not (tmp_path / "out" / "marvel_seed0.json").exists()


def test_one_folder_per_task_and_cost_limit_only_when_there_are_several():
    one = run_grid.cells_of(run_grid.Args(out="o", work_dir="w"))
    assert [(c.env_id, c.cost_limit, c.out, c.work) for c in one] == [("OfflineCarRun-v0", None, "o", "w")]
    cells = run_grid.cells_of(run_grid.Args(out="o", work_dir="w", env_ids=["OfflineCarRun-v0", "OfflineBallRun-v0"],
                                            cost_limits=[10, 12.5]))
    assert [c.out for c in cells] == ["o/OfflineCarRun-v0_d10", "o/OfflineCarRun-v0_d12.5", "o/OfflineBallRun-v0_d10",
                                      "o/OfflineBallRun-v0_d12.5"]
    assert cells[1].work == "w/OfflineCarRun-v0_d12.5" and cells[1].limit_flags() == ["--cost-limit", "12.5"]
    assert [c.out for c in run_grid.cells_of(run_grid.Args(out="o", env_ids=["A", "B"]))] == ["o/A", "o/B"]
