"""benchmark_adaptation_guard.py end to end on the tiny dataset."""
import json
import os

import pytest

from common import keeps_adaptation
from conftest import DEFAULT_MODEL, REPO, run_script


def test_every_draw_is_scored_adapted_and_not_and_each_rule_decides_from_its_checks(tmp_path, tiny_dataset):
    results_path = tmp_path / "guard.json"
    readme = "before\n<!-- benchmark_adaptation_guard:start -->\nold table\n<!-- benchmark_adaptation_guard:end -->\n"
    (tmp_path / "README.md").write_text(readme)
    run_script("benchmark_adaptation_guard", f"--dataset_path={tiny_dataset}",
               f"--model_path={os.path.join(REPO, DEFAULT_MODEL)}",
               "--cases=gaussian 0.1,rician 0.1 coarse", "--n_draws=2", "--adapt_steps=2", "--precision=float32",
               f"--results_path={results_path}", "--update_readme=true", cwd=tmp_path)
    results = json.loads(results_path.read_text())
    assert list(results["cases"]) == ["gaussian 0.1", "rician 0.1 coarse"]
    for case, draws in results["cases"].items():
        assert len(draws) == 2
        for draw in draws:
            assert draw["gain"] == pytest.approx(draw["adapted"] - draw["trained"])
            assert draw["kept"] == keeps_adaptation(draw["masked_z"], draw["recorrupted_z"], case.startswith("rician"))
            assert draw["kept_by_both_checks"] == (draw["masked_z"] > 2 and draw["recorrupted_z"] > 2)
        assert draws[0]["trained"] != draws[1]["trained"]  # two different noise draws
        assert all(draw["adapted"] != draw["trained"] for draw in draws)  # the adapted copy is scored, kept or not
    written = (tmp_path / "README.md").read_text()
    assert "old table" not in written and "| gaussian 0.1 |" in written and "| rician 0.1 coarse |" in written


@pytest.mark.parametrize("case", ["poisson 0.06", "gaussian x", "gaussian 0", "rician 0.06 blurred", "gaussian",
                                  "gaussian 5"])
def test_a_case_that_does_not_read_is_one_clear_error(tmp_path, case):
    result = run_script("benchmark_adaptation_guard", f"--cases={case}", f"--results_path={tmp_path / 'g.json'}",
                        cwd=tmp_path, check=False)
    assert result.returncode == 1 and f"cases: {case!r}" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "g.json").exists()


def test_an_adaptation_without_time_is_refused(tmp_path):
    result = run_script("benchmark_adaptation_guard", "--adapt_seconds=-1", f"--results_path={tmp_path / 'g.json'}",
                        cwd=tmp_path, check=False)
    assert result.returncode == 1 and "adapt_seconds=-1.0" in result.stderr.strip().splitlines()[-1]
