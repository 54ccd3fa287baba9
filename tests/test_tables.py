"""The results tables (bench/tables.py): what ``record`` reads from each command's output, the
stamp on every row, append-only files, and the committed tables themselves."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from bench import tables as T

ROOT = Path(__file__).resolve().parents[1]

MACHINE = {"name": "AMD EPYC", "device": "cpu", "gpu": None, "cpu": "AMD EPYC",
           "torch_threads": 2, "torch": "2.14.1", "triton": "3.8.0",
           "date": "2026-12-06T10:00:00+00:00"}


def _write(folder: Path, name: str, doc) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(doc))
    return path


def _rows(results: Path, table: str) -> list[dict]:
    return T.load(table, results)


def test_record_stamps_and_appends(tmp_path):
    out = tmp_path / "results"
    run = _write(tmp_path / "run", "e2e.json", {
        "machine": MACHINE,
        "rows": [{"preset": "mnist", "batch_size": 256, "K": None, "provider": p,
                  "kernel_backend": "torch" if p == "torch" else "auto", "compile": False,
                  "status": "ok", "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
                  "images_per_s": 1.0, "x_vs_torch": 1.0,
                  "phases_ms": {"sample": 50.0, "losses": 90.0}}
                 for p, ms in (("torch", 240.0), ("fused", 197.5))],
        "loop": [{"preset": "mnist", "batch_size": 256, "K": None, "status": "ok",
                  "loop_ms": 205.0, "step_ms": 197.0, "loop_over_step": 1.04}]})
    counts = T.record([run.parent], note="a test", commit="abc1234", results=out)
    assert counts == {"e2e": 2}
    rows = _rows(out, "e2e")
    assert [r["provider"] for r in rows] == ["torch", "fused"]
    fused = rows[1]
    assert (fused["commit"], fused["machine"], fused["device"], fused["date"], fused["note"]) == (
        "abc1234", "AMD EPYC", "cpu", MACHINE["date"], "a test")
    assert float(fused["median_ms"]) == 197.5 and float(fused["sample_ms"]) == 50.0
    assert float(fused["loop_over_step"]) == 1.04 and rows[0]["loop_ms"] == ""  # fused only
    # append-only: a second record adds rows under the same header
    T.record([run], commit="def5678", results=out)
    assert [r["commit"] for r in _rows(out, "e2e")] == ["abc1234"] * 2 + ["def5678"] * 2
    with open(T.table_path("e2e", out)) as f:
        assert sum(1 for line in f if line.startswith("date,")) == 1


def test_a_changed_schema_is_refused_not_rewritten(tmp_path):
    path = T.table_path("memory", tmp_path)
    path.write_text("date,commit,old_column\n")
    with pytest.raises(ValueError, match="header is not this table's columns"):
        T.append("memory", [{"provider": "fused"}], tmp_path)
    with pytest.raises(ValueError, match="unknown columns"):
        T.append("ab", [{"nonsense": 1}], tmp_path)
    with pytest.raises(ValueError, match="unknown table"):
        T.append("nope", [], tmp_path)


def test_each_command_output_becomes_rows(tmp_path):
    docs = {
        "results.json": {"machine": MACHINE, "rows": [
            {"op": "token_logprobs", "mode": "fwd", "set": "quick", "case": "c",
             "shape": "R=8,V=16", "dtype": "float32", "provider": "cpu", "status": "ok",
             "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "GBps": 2.0, "TFLOPs": None,
             "roofline_frac": 0.5, "x_vs_torch": 3.0, "x_vs_compile": 1.5,
             "peak_bytes": 2**20}]},
        "ab.json": {"machine": MACHINE, "base": "/tmp/base", "base_commit": "fb5b5d2", "rows": [
            {"preset": "mnist", "batch_size": 256, "provider": "fused", "base_ms": 300.0,
             "new_ms": 250.0, "new_over_base": 0.833, "new_rounds_ms": [1, 2, 3, 4]}]},
        "memory.json": {"machine": MACHINE, "rows": [
            {"provider": "fused", "N": 64, "D": 8, "V": 32, "extra_bytes": 3 * 2**20,
             "seconds": 0.1},
            {"provider": "materialised", "N": 64, "D": 8, "V": 65536,
             "skipped": "needs 48 GiB"}]},
        "result.json": {"method": "fsq", "preset": "mnist", "bits_per_image": 63.3,
                        "budget_minutes": 10, "steps": 9631, "train_seconds": 600.0,
                        "ms_per_step": 62.0, "test_psnr": 17.2, "threads": 1,
                        "machine": {"cpu": "AMD EPYC", "cores": 2, "torch": "2.14.1"},
                        "overrides": ["threads=1"]},
        "gpu_model_imagenet.json": {"preset": "imagenet256", "gpu": "H100 SXM",
                                    "overrides": ["fp32_outputs=false"],
                                    "launches_per_step": 21140, "total_ms_eager": 228.9,
                                    "total_ms_graphed": 187.0,
                                    "total_ms_sampler_graphed": 187.6,
                                    "phases": {"sample": {"ms_graphed": 140.8}}},
        "static.json": [
            {"op": "token_logprobs", "phase": "fwd", "kernel": "_k", "arch": "sm_90",
             "shape": {"R": 8, "V": 16, "dtype": "bf16"}, "gpu": gpu, "regs": 63,
             "spills": 0, "bytes_moved": 2e9, "bytes_min": 2e9, "bound": "memory",
             "dynamic_per_warp": {"fp32": 10, "mufu": 2}, "predicted_ms": ms,
             "roofline_fraction": 1.0}
            for gpu, ms in (("H100", 0.72), ("H200", 0.50))],
    }
    got = {}
    for name, doc in docs.items():
        table, _, rows = T.read(_write(tmp_path, name, doc))
        got[table] = rows
    assert got["microbench"][0]["gbps"] == 2.0 and got["microbench"][0]["peak_mib"] == 1.0
    assert got["ab"][0]["base_commit"] == "fb5b5d2" and got["ab"][0]["rounds"] == 4
    assert got["memory"][0]["extra_mib"] == 3.0
    assert got["memory"][1]["status"] == "skipped: needs 48 GiB"
    assert got["replication"][0]["test_psnr"] == 17.2
    assert got["gpu_model"][0]["overrides"] == "fp32_outputs=false"
    assert got["gpu_model"][0]["sample_ms"] == 140.8
    (static,) = got["static"]  # one row per kernel and shape, the two GPUs as columns
    assert (static["h100_ms"], static["h200_ms"], static["instr_per_warp"]) == (0.72, 0.5, 12)
    assert static["gb_moved"] == 2.0 and static["shape"] == "R=8,V=16,dtype=bf16"
    with pytest.raises(ValueError, match="not a result file"):
        T.read(_write(tmp_path, "other.json", {}))


def test_a_replication_with_a_prior_also_makes_a_generation_row(tmp_path):
    doc = {"method": "vq", "preset": "mnist", "bits_per_image": 64.0, "budget_minutes": 10,
           "steps": 8000, "test_psnr": 16.4, "threads": 1, "overrides": ["threads=1"],
           "machine": {"cpu": "AMD EPYC", "cores": 2, "torch": "2.14.1"},
           "prior": {"budget_minutes": 5, "steps": 9000, "ms_per_step": 30.0,
                     "overrides": ["eval_samples=0"], "test_loss": 21.5, "test_fd": 12.5,
                     "test_fd_data": 0.4, "test_fd_recon": 3.1, "test_precision": 0.7,
                     "test_recall": 0.5, "test_label_accuracy": 0.8, "test_guidance": 0.0,
                     "test_generated": 10000, "test_classifier_test_accuracy": 0.987}}
    run = _write(tmp_path / "run", "result.json", doc)
    counts = T.record([run.parent], commit="abc1234", results=tmp_path / "results")
    assert counts == {"replication": 1, "generation": 1}
    (row,) = _rows(tmp_path / "results", "generation")
    assert (row["method"], float(row["fd"]), float(row["fd_recon"])) == ("vq", 12.5, 3.1)
    assert float(row["test_psnr"]) == 16.4 and row["prior_steps"] == "9000"
    assert row["overrides"] == "threads=1 prior:eval_samples=0" and row["fid"] == ""


def test_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(T, "RESULTS", tmp_path / "results")
    assert T.main(["record", str(tmp_path / "missing")]) == 2
    assert "bench.tables: error:" in capsys.readouterr().err
    run = _write(tmp_path / "m", "memory.json", {"machine": MACHINE, "rows": [
        {"provider": "fused", "N": 64, "D": 8, "V": 32, "extra_bytes": 2**20, "seconds": 1}]})
    rows = T.record([run], commit="abc1234", results=tmp_path / "results")
    assert rows == {"memory": 1}
    shown = T.show("memory")
    assert "abc1234" in shown and "fused" in shown
    assert T.show("memory", where=["provider=materialised"]) == "memory: no rows"


def test_plot_draws_each_table_with_rows(tmp_path):
    out = tmp_path / "results"
    for i, commit in enumerate(("aaa1111", "bbb2222")):
        T.append("ab", [{"date": "d", "commit": commit, "machine": "m", "preset": "mnist",
                         "provider": "fused", "new_over_base": 0.8 + i / 10}], out)
    pytest.importorskip("matplotlib")
    paths = T.plot(tmp_path / "plots", results=out)
    assert [p.name for p in paths] == ["ab.png"] and paths[0].stat().st_size > 1000


def test_current_commit_names_a_commit():
    commit = T.current_commit()
    assert commit == "unknown" or len(commit.split("-")[0]) >= 7


def test_committed_tables_have_their_schema():
    """Every table under bench/results/ parses with the columns bench.tables writes, so new
    rows can be appended to it."""
    found = sorted(p.stem for p in T.RESULTS.glob("*.csv"))
    assert found and set(found) <= set(T.TABLES)
    for table in found:
        with open(T.table_path(table)) as f:
            reader = csv.reader(f)
            assert next(reader) == T.STAMP + T.TABLES[table], table
            widths = {len(row) for row in reader}
        assert widths <= {len(T.STAMP + T.TABLES[table])}, table


def test_results_folder_tracks_measurements_only():
    """git tracks the tables, their README and figures under bench/results/, nothing
    regenerable (no SASS, no per-run JSON dumps)."""
    try:
        tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "bench/results"],
                                 capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    allowed = ("bench/results/README.md", "bench/results/.gitignore")
    odd = [p for p in tracked if not (p in allowed or p.endswith(".csv")
                                      or p.startswith("bench/results/figures/"))]
    assert not odd, odd
    assert not subprocess.run(["git", "-C", str(ROOT), "ls-files", "*.sass"],
                              capture_output=True, text=True).stdout.strip()
