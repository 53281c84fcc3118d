"""scripts/gpu_results.sh rehearsed on the CPU, and the results it writes as notebooks read them.

The dry run (DRY_RUN=1) runs the script's own commands, part by part, on the smoke profile with tiny
settings, so that the one GPU call cannot fail on a typo; only the CUDA check and the settings differ.
It writes to temporary folders, never to the repository's results/ or data/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from metabolic.report import gpu_results

ROOT = Path(__file__).resolve().parents[1]
GPU = "cpu-dry-run"
OUT_FILES = {"budgets.tgz", "csc_throughput.tgz", "etokens.tgz", "etokens-state.tgz", "overhead.tgz",
             "overhead-profiles.tgz", "summary.txt"}


def _dry_run(tmp: Path, corpus: Path, **env) -> subprocess.CompletedProcess:
    """Run the script with DRY_RUN=1 into `tmp` (data/, results/, out/); the session's tokenized corpus is reused."""
    (tmp / "data" / "smoke").mkdir(parents=True)
    (tmp / "data" / "smoke" / "corpus").symlink_to(corpus)
    (tmp / "out").mkdir()
    full_env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "METABOLIC_DATA": str(tmp / "data"),
                "RESULTS": str(tmp / "results"), "OUT": str(tmp / "out"), **env}
    return subprocess.run(["bash", "scripts/gpu_results.sh"], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=1200)


@pytest.fixture(scope="module")
def corpus_folder(tiny_cfg) -> Path:
    from metabolic.pipeline import stages

    return stages.corpus(tiny_cfg).folder


@pytest.mark.slow
def test_dry_run_runs_every_part_and_saves_each(corpus_folder, tmp_path):
    proc = _dry_run(tmp_path, corpus_folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # the plan, with every part's cap and deadline, before anything runs
    plan = ["a. budgets         cap  400 s (ends by  400 s)", "b. csc_throughput  cap  200 s (ends by  600 s)",
            "c. etokens         cap  200 s (ends by  800 s)", "d. overhead        cap  300 s (ends by 1100 s)"]
    assert all(line in out for line in plan) and max(out.index(p) for p in plan) < out.index("=== a. budgets")
    results = tmp_path / "results"
    summaries = {p: json.loads((results / p / GPU / "summary.json").read_text()) for p in gpu_results.PARTS}
    assert {p: s["status"] for p, s in summaries.items()} == dict.fromkeys(gpu_results.PARTS, "complete")
    assert [summaries[p]["cap_s"] for p in gpu_results.PARTS] == [400, 200, 200, 300]

    budgets = summaries["budgets"]
    assert set(budgets["stages_s"]) == {"corpus", "pretrain", "prior", "csc", "train", "evaluate"}
    tables = {t["table"]: t for t in budgets["tables"]}
    assert sorted(tables) == sorted([f"{v}_{d}" for v in ("faithful", "expected-cost") for d in ("plain", "steered")]
                                    + [f"verified_n{n}_{s}" for n in (1, 2) for s in ("raw", "length")]
                                    + [f"baseline_{r}_{s}" for r in ("token_count", "random_cut") for s in ("raw", "length")])
    for t in tables.values():
        assert all(0 <= t[f"hit10_{level}"] <= 100 for level in ("low", "medium", "high"))
    assert all(t["labels_per_generation"] > 0 for k, t in tables.items() if k.startswith("verified"))
    assert sorted(c["variant"] for c in budgets["cost_model"]) == ["expected-cost", "faithful"]
    assert [(r["variant"], r["epochs"], r["finished"]) for r in budgets["training"]] == [("expected-cost", 1, True),
                                                                                       ("faithful", 1, True)]
    assert "generation.verified_candidates=1,2" in budgets["overrides"]

    csc = summaries["csc_throughput"]
    methods = {m["method"]: m for m in csc["methods"]}
    assert set(methods) == {"labeller fp32", "naive"} and methods["naive"]["ratio_vs_naive"] == 1.0
    assert methods["labeller fp32"]["ratio_vs_naive"] > 0 and "mean_abs_diff_vs_fp32" not in methods["labeller fp32"]
    assert methods["naive"]["max_abs_diff_vs_fp32"] < 1e-5  # the same labels: same window, same encoder
    assert (csc["largest"]["n_sequences"], csc["largest"]["tokens"], csc["largest"]["n_labels"]) == (2, 16, 32)

    # the slice first (one cell and its preprocess unit), the joule fit (none without a GPU), then the rest
    log = out + proc.stderr
    assert "this run: only units matching cell-tiny-*-chat-b1: 2 of the 8 left" in log
    assert "this run: only units matching joule_fit: 0 of the 6 left" in log and "grid complete: " in log
    etokens = summaries["etokens"]
    assert etokens["cells"] == [{"model": "tiny", "path": "default", "task": t, "batch_size": 1}
                                for t in ("chat", "classification", "creative", "reasoning")]
    assert etokens["n_rows"] == 4 and etokens["grid_complete"]  # smoke: 1 repeat, tiny only on the CPU
    assert {"rows.jsonl", "machine.json", "joule_fit.json"} <= {p.name for p in (results / "etokens" / GPU).iterdir()}

    overhead = summaries["overhead"]
    assert [r["model"] for r in overhead["train"]] == ["GPT-2 plain LM loss", "MetabolicGPT-2 faithful",
                                                       "MetabolicGPT-2 expected-cost"]
    assert overhead["train"][0]["ratio"] == 1.0 and overhead["generation"][0]["ratio"] == 1.0
    assert overhead["verified"][0]["labels_per_generation"] > 0
    assert sorted(p.name for p in (results / "overhead" / GPU / "profiles").iterdir()) == [
        "generate_budgeted.txt", "generate_plain.txt", "generate_two_sided.txt", "train_step_expected-cost.txt",
        "train_step_faithful.txt", "train_step_plain.txt"]

    # $OUT: at most 8 files, one archive per part (unpacked with tar xzf <part>.tgz -C results), and the log
    out_dir = tmp_path / "out"
    assert {p.name for p in out_dir.iterdir()} == OUT_FILES
    for part in gpu_results.PARTS:
        with tarfile.open(out_dir / f"{part}.tgz") as tar:
            assert f"{part}/{GPU}/summary.json" in tar.getnames()
    summary_txt = (out_dir / "summary.txt").read_text()
    assert [line.split(" (")[0] for line in summary_txt.splitlines() if line.startswith("===")] == [
        "=== a. budgets", "=== b. csc_throughput", "=== c. etokens", "=== d. overhead"]
    # what the notebooks read
    assert {r["gpu"] for r in gpu_results.rows("budgets", "tables", root=results)} == {GPU}


@pytest.mark.slow
def test_a_part_cut_at_its_cap_still_writes_its_summary(corpus_folder, tmp_path):
    proc = _dry_run(tmp_path, corpus_folder, PARTS="budgets", CAP_A="6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "a. budgets         cap    6 s (ends by    6 s)" in proc.stdout and "csc_throughput  cap" not in proc.stdout
    summary = json.loads((tmp_path / "results" / "budgets" / GPU / "summary.json").read_text())
    assert summary["status"] == "cut at its cap" and summary["elapsed_s"] <= 6 + 10 + 5  # SIGINT, KILL 10 s later
    assert "tables" not in summary and (tmp_path / "results" / "budgets" / GPU / "log.txt").is_file()
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"budgets.tgz", "summary.txt"}


def test_the_gpu_run_prints_its_plan_then_needs_cuda(tmp_path):
    """Without DRY_RUN: the GPU settings' plan (caps within 9 minutes), then exit 1 on a machine without CUDA,
    having written nothing; part a's overrides are valid settings of the gpu profile."""
    import torch
    from metabolic.core.config import parse_override_strings
    from metabolic.core.profiles import load_config

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine would run the whole GPU script")
    (tmp_path / "out").mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "METABOLIC_DATA": str(tmp_path / "data"),
           "RESULTS": str(tmp_path / "results"), "OUT": str(tmp_path / "out")}
    env.pop("DRY_RUN", None)
    proc = subprocess.run(["bash", "scripts/gpu_results.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "no CUDA GPU on this machine" in proc.stdout
    caps = re.findall(r"^  ([a-d])\. (\S+) +cap +(\d+) s \(ends by +(\d+) s\)", proc.stdout, re.M)
    assert caps == [("a", "budgets", "290", "290"), ("b", "csc_throughput", "50", "340"), ("c", "etokens", "105", "445"),
                    ("d", "overhead", "65", "510")]  # 8.5 min: within 9 with packing and a cut command's 10 s
    assert not (tmp_path / "results").exists() and [p.name for p in (tmp_path / "out").iterdir()] == ["summary.txt"]
    a_set = re.findall(r'A_SET=\$\{A_SET:-"([^"]+)"\}', (ROOT / "scripts" / "gpu_results.sh").read_text())[-1]
    cfg = load_config("gpu", parse_override_strings(a_set.split()))
    assert (cfg.backbone.epochs, cfg.generation.n_valid_prompts, cfg.csc.max_sequences) == (2, 32, 2000)


# --- the library the notebooks call ----------------------------------------------------------------


def _summary(folder: Path, **fields) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"status": "complete", "cap_s": 50.0, "elapsed_s": 41.2,
                                                     "profile": "gpu", "overrides": [], **fields}))


def test_committed_gpu_folders_and_their_rows(tmp_path):
    assert gpu_results.gpu_folders("budgets", root=tmp_path) == [] and gpu_results.rows("budgets", "tables", tmp_path) == []
    _summary(tmp_path / "csc_throughput" / "nvidia-h200", methods=[{"method": "naive", "ratio_vs_naive": 1.0}],
             device_name="NVIDIA H200")
    _summary(tmp_path / "csc_throughput" / "nvidia-h100-80gb-hbm3", methods=[{"method": "naive"}, {"method": "labeller tf32"}])
    (tmp_path / "csc_throughput" / "README.md").write_text("not a GPU folder")
    (tmp_path / "csc_throughput" / "empty").mkdir()  # no summary.json: not committed results
    assert [f.name for f in gpu_results.gpu_folders("csc_throughput", root=tmp_path)] == ["nvidia-h100-80gb-hbm3",
                                                                                        "nvidia-h200"]
    assert gpu_results.rows("csc_throughput", "methods", tmp_path) == [
        {"gpu": "nvidia-h100-80gb-hbm3", "method": "naive"}, {"gpu": "nvidia-h100-80gb-hbm3", "method": "labeller tf32"},
        {"gpu": "nvidia-h200", "method": "naive", "ratio_vs_naive": 1.0}]
    h200 = gpu_results.committed("csc_throughput", tmp_path)[1]
    assert gpu_results.status_line(h200) == "NVIDIA H200: complete after 41 s (cap 50 s), profile gpu"
    assert gpu_results.overview("csc_throughput", tmp_path).splitlines() == [
        "csc_throughput on nvidia-h100-80gb-hbm3: complete after 41 s (cap 50 s), profile gpu",
        "csc_throughput on NVIDIA H200: complete after 41 s (cap 50 s), profile gpu"]
    assert gpu_results.overview("overhead", tmp_path) == gpu_results.missing("overhead")
    _summary(tmp_path / "overhead" / "nvidia-h200", train=[{"ratio": 1.0, "model": "plain", "step_ms": 2.0}])
    assert list(gpu_results.rows("overhead", "train", tmp_path)[0]) == ["gpu", "model", "ratio", "step_ms"]  # names first
    assert gpu_results.missing("etokens").startswith("no GPU results committed yet under results/etokens/ (command: "
                                                     "bash scripts/gpu_results.sh;")
    with pytest.raises(ValueError, match="unknown part 'nope'"):
        gpu_results.gpu_folders("nope", root=tmp_path)


def test_a_cpu_profile_run_sits_beside_the_gpu_runs_and_is_read_apart(tmp_path):
    _summary(tmp_path / "budgets" / "nvidia-h200", tables=[{"table": "faithful_plain"}])
    _summary(tmp_path / "budgets" / "cpu-amd-epyc", tables=[{"table": "verified_n8_length"}], profile="cpu", cap_s=0.0,
             elapsed_s=923.0, device_name="AMD EPYC (2 cores, CPU)")
    assert [r["gpu"] for r in gpu_results.rows("budgets", "tables", tmp_path)] == ["cpu-amd-epyc", "nvidia-h200"]
    assert gpu_results.rows("budgets", "tables", tmp_path, profile="cpu") == [{"gpu": "cpu-amd-epyc",
                                                                               "table": "verified_n8_length"}]
    assert gpu_results.overview("budgets", tmp_path, profile="cpu") == (
        "budgets on AMD EPYC (2 cores, CPU): complete after 923 s, profile cpu")  # no cap: none printed
    assert gpu_results.overview("budgets", tmp_path, profile="paper") == gpu_results.missing("budgets")
    assert gpu_results.missing("budgets", profile="cpu") == (
        "no cpu-profile run committed yet under results/budgets/ (command: bash scripts/cpu_budgets.sh)")


def test_budget_table_rows_flatten_hit10_per_level():
    table = {"variant": "verified", "decoding": "verified_n4", "csc_scale": "length", "n_candidates": 4, "n_prompts": 33,
             "rows": [{"level": lv, "csc": {"Hit@10": h}} for lv, h in (("low", 100.0), ("medium", 93.9), ("high", 87.9))],
             "average_MAE_csc": 0.05, "labels_per_generation": 120.5, "seconds_per_generation": 0.31,
             "goal": {"judge_ppl_rel_change": -0.04, "met": False}}
    assert gpu_results.budget_table_rows({"verified_n4_length": table}) == [{
        "table": "verified_n4_length", "variant": "verified", "decoding": "verified_n4", "scale": "length",
        "n_candidates": 4, "n_prompts": 33, "hit10_low": 100.0, "hit10_medium": 93.9, "hit10_high": 87.9,
        "average_mae_csc": 0.05, "judge_ppl_rel_change": -0.04, "labels_per_generation": 120.5,
        "seconds_per_generation": 0.31, "goal_met": False}]


def test_example_records_keep_five_per_table_and_level(tmp_path):
    records = [{"variant": "expected-cost", "decoding": "steered", "level": lv, "prompt": "p", "text": f"t{i}",
                "generated_ids": [1] * i, "budget_csc": 0.2, "csc": 0.1 * i, "stopped_by": "budget", "lambdas": [0.0]}
               for lv in ("low", "high") for i in range(7)]
    records += [{"variant": "verified", "decoding": "verified_n8_length", "level": "low", "prompt": "p", "text": "v",
                 "generated_ids": [1, 2], "budget_csc": 5.0, "csc": 5.1, "status": "in band"}]
    records += [{"variant": "expected-cost", "decoding": "unbudgeted", "level": "none", "prompt": "p", "text": "u",
                 "generated_ids": [3]}]
    rows = gpu_results.example_records(records)
    assert [(r["table"], r["level"], r["n_tokens"]) for r in rows] == \
        [("expected-cost_steered", lv, i) for lv in ("low", "high") for i in range(5)] + [("verified_n8_length", "low", 2)]
    assert "lambdas" not in rows[0] and "generated_ids" not in rows[0] and rows[-1]["status"] == "in band"
    folder = tmp_path / "budgets" / "cpu-x"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"profile": "cpu"}))
    gen = tmp_path / "generations.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert gpu_results.main(["examples", str(gen), str(folder / gpu_results.EXAMPLES)]) == 0
    shown = gpu_results.committed_examples("budgets", tmp_path, profile="cpu", table="verified_n8_length")
    assert [(r["gpu"], r["text"]) for r in shown] == [("cpu-x", "v")]


# --- zeus on a GPU image without it (scripts/gpu_common.sh: ensure_zeus) -----------------------------------

ZEUS_WHEELS = ("zeus", "httpx", "idna")  # what scripts/pack-zeus-wheels packs
HIDE_ZEUS = '''# an image without zeus, httpx and idna: found only where ensure_zeus installs them ($PYDEPS)
import os, sys
from importlib.machinery import PathFinder

class Hide:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in {HIDDEN!r}:
            return None
        spec = PathFinder.find_spec(name, [p for p in sys.path if p.startswith(os.environ["PYDEPS"])])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden)", name=name)
        return spec

sys.meta_path.insert(0, Hide)
'''


def _wheel_of_installed(name: str, dest: Path) -> Path:
    """A wheel of the installed distribution `name`: its own files and dist-info, as pip installed them."""
    import importlib.metadata as md
    import zipfile

    dist = md.distribution(name)
    wheel = dest / f"{name}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in dist.files:
            if f.parts[0] != ".." and "__pycache__" not in f.parts:
                zf.write(dist.locate_file(f), str(f))
    return wheel


def _ensure_zeus(tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(HIDE_ZEUS.format(HIDDEN=set(ZEUS_WHEELS)))
    env = {**os.environ, "PYTHON": sys.executable, "PYDEPS": str(tmp_path / "pydeps"),
           "PYTHONPATH": str(tmp_path / "site")}
    script = (f'source {ROOT}/scripts/gpu_common.sh >/dev/null; ensure_zeus; echo "ensure_zeus: $?"; '
              '"$PY" -c "import zeus.monitor; print(\'zeus from\', zeus.__file__)"')
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_ensure_zeus_without_wheels_says_how_to_pack_them(tmp_path):
    proc = _ensure_zeus(tmp_path)
    assert "zeus is not importable here and .assets/wheels holds no zeus wheel: run scripts/pack-zeus-wheels" in proc.stdout
    assert "ensure_zeus: 1" in proc.stdout and "No module named 'zeus' (hidden)" in proc.stderr


@pytest.mark.slow
def test_ensure_zeus_installs_the_carried_wheels_offline(tmp_path):
    """The image lacks zeus, httpx and idna: each is installed from .assets/wheels into $PYDEPS, and zeus.monitor imports."""
    wheels = tmp_path / ".assets" / "wheels"
    wheels.mkdir(parents=True)
    for name in ZEUS_WHEELS:
        _wheel_of_installed(name, wheels)
    proc = _ensure_zeus(tmp_path)
    assert "ensure_zeus: 0" in proc.stdout, proc.stdout + proc.stderr
    installed = re.findall(r"installed (\S+)-[^-\s]+-py3-none-any\.whl into (\S+) \(offline\)", proc.stdout)
    assert sorted(installed) == sorted((name, str(tmp_path / "pydeps")) for name in ZEUS_WHEELS)
    assert f"zeus from {tmp_path / 'pydeps' / 'zeus' / '__init__.py'}" in proc.stdout
