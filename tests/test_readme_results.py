"""The README's results block is generated from committed result files and kept current (`metabolic.report.readme`)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from metabolic.core.artefacts import read_json
from metabolic.report import readme

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_block_matches_the_committed_results():
    assert readme.main(["--check", "--root", str(ROOT)]) == 0, "run: python -m metabolic.report.readme"


def test_a_changed_result_makes_the_block_stale(tmp_path):
    (tmp_path / "results" / "budgets").mkdir(parents=True)
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for folder in (ROOT / "results" / "budgets").glob("cpu-*"):
        shutil.copytree(folder, tmp_path / "results" / "budgets" / folder.name)
    assert readme.main(["--check", "--root", str(tmp_path)]) == 0
    summary = next((tmp_path / "results" / "budgets").glob("cpu-*/summary.json"))
    text = summary.read_text(encoding="utf-8")
    data = read_json(summary)
    summary.write_text(text.replace(f'"elapsed_s": {data["elapsed_s"]}', f'"elapsed_s": {data["elapsed_s"] + 3600}'),
                       encoding="utf-8")
    assert readme.main(["--check", "--root", str(tmp_path)]) == 1
    assert readme.main(["--root", str(tmp_path)]) == 0  # rewrites the block
    assert readme.main(["--check", "--root", str(tmp_path)]) == 0
    block = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert f"{(data['elapsed_s'] + 3600) / 60:.0f} min" in block


def test_a_readme_without_markers_is_a_clear_error():
    with pytest.raises(ValueError, match="no results block"):
        readme.replace_block("# title\n", "block")
    assert re.search(r"python -m metabolic.report.readme", readme.BEGIN)


def test_the_readme_opens_with_the_two_commands_and_the_explorer():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_screen = text[:text.index("## Results")]
    for needed in ("make study", "make test", "make lab", "06_budget_explorer", "Run All", "unreachable", "Gauge"):
        assert needed in first_screen, f"the README's first screen lacks {needed!r}"
    assert len(first_screen.splitlines()) <= 60


def test_the_readme_holds_no_internal_history():
    """Issue numbers, remote-call syntax and paths outside the clone belong in DEVELOPMENT.md, not the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert not re.search(r"\bissues? \d+", text, re.IGNORECASE)
    assert "run(command=" not in text and "../shared" not in text and "carry=" not in text
    assert (ROOT / "DEVELOPMENT.md").is_file() and "DEVELOPMENT.md" in text


def test_each_stop_rule_is_paired_with_the_same_rule_on_generations():
    from metabolic.report import table1

    folder = next((ROOT / "results" / "budgets").glob("cpu-*"))
    combined = read_json(folder / "tables.json")
    rows = table1.rules_on_text_and_generations(combined)
    pairs = {(r["rule"], r["generated table"]) for r in rows}
    scale = next(iter(combined["verified_budgets"]))
    assert {("exact", f"verified_n1_{scale}"), ("token_count", f"baseline_token_count_{scale}"),
            ("random_cut", f"baseline_random_cut_{scale}")} <= pairs
    assert [r["level"] for r in rows[:3]] == ["low", "medium", "high"]  # level order, not the file's sorted keys
    first = rows[0]
    fixed = combined["stop_rules"][first["scale"]]["rules"][first["rule"]]["low"]
    generated = next(r["csc"] for r in combined["tables"][first["generated table"]]["rows"] if r["level"] == "low")
    assert (first["on held-out text"], first["on generations"]) == (table1.hit_with_interval(fixed),
                                                                     table1.hit_with_interval(generated))
    summary = table1.stop_summary(combined)
    stops = [r["stopped_by"] for t in table1.tables_of(combined, "model").values() for r in t["rows"]]
    on_budget = sum(s.get("budget", 0) + s.get("sentence", 0) for s in stops)
    assert f"{on_budget} of {sum(sum(s.values()) for s in stops)} generations" in summary
