"""Same behaviour: every entry point, run with its defaults on a short budget, reproduces the committed digests of
its checkpoints' tensors and its evaluation numbers bit for bit (tests/golden_runs.py says what is run)."""
import json

from golden_runs import GOLDEN, run_all


def test_golden_runs_reproduce_bit_for_bit(tmp_path):
    expected = json.load(open(GOLDEN))
    found = run_all(str(tmp_path))
    assert found.keys() == expected.keys()
    for name in expected:
        for path, summary in expected[name].items():
            for key, value in summary.items():
                assert found[name][path].get(key) == value, f"{name}: {path} '{key}' differs from tests/golden.json"
