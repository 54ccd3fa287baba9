"""The benchmark harness (bench/): the GPU report's dry run, a --quick run on tiny shapes with
torch.compile, validation before timing, and the regression check's logic and exit codes.

These check that the benchmarks run and report honestly, not how fast anything is.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import e2e, harness, output, runner, specs

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_gpu_report_dry_run(tmp_path):
    """The GPU machine's one command, end to end on the CPU at tiny sizes, as on the GPU image
    (its missing packages unimportable), within its two-minute budget."""
    out = tmp_path / "report"
    proc = _run(["-m", "bench.gpu_report", "--dry-run", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    parts = {p["name"]: p for p in summary["parts"]}
    assert list(parts) == ["build", "info", "constants", "tests", "kernels", "steps", "micro"]
    assert {p["status"] for p in parts.values()} == {"passed"}, parts
    assert summary["elapsed_s"] < summary["budget_s"] == 150
    assert summary["constants"]["copy_tbps"] > 0
    kernels = summary["kernels"]
    assert {(r["op"], r["phase"]) for r in kernels} >= {
        ("token_logprobs", "fwd"), ("linear_token_logprobs", "bwd"), ("decode_attention", "fwd")}
    assert all(r.get("measured_ms", 0) > 0 for r in kernels), kernels
    assert summary["steps"] and summary["steps"][0]["measured_ms"] > 0
    micro = json.loads((out / "micro" / "results.json").read_text())
    timed = {(r["op"], r["provider"]) for r in micro["rows"] if r["status"] == "ok"}
    # Every op dvae_kernels has was timed through its torch backend.
    for spec in specs.SPECS:
        if spec.available():
            assert (spec.name, "torch") in timed
    e2e_rows = json.loads((out / "steps" / "dry" / "e2e.json").read_text())["rows"]
    assert {r["provider"] for r in e2e_rows} == {"torch", "fused"}
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in e2e_rows)
    md = (out / "summary.md").read_text()
    assert "GPU report" in md and "## Kernels" in md and "## Training steps" in md
    import tarfile

    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "tests.log" in names and "kernels.jsonl" in names


def test_gpu_report_a_slow_part_spends_the_budget_and_the_rest_is_skipped(tmp_path):
    """A part that runs past what the budget has left is stopped at its cap; the parts after
    it are skipped, and the summary is written with what the earlier parts learned."""
    out = tmp_path / "slow"
    env = {"DVAE_GPU_REPORT_SLOW": "constants"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_report", "--dry-run",
                           "--time-budget", "30", "--skip", "build", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {p["name"]: p["status"] for p in summary["parts"]}
    assert status == {"info": "passed", "constants": "timeout", "tests": "skipped",
                      "kernels": "skipped", "steps": "skipped", "micro": "skipped"}
    assert summary["elapsed_s"] < 30
    assert "stopped at its cap" in (out / "constants.log").read_text()
    assert (out / "summary.md").is_file() and (out / "logs.tar.gz").is_file()


def test_gpu_report_calibrate_feeds_the_predictors(tmp_path):
    """`calibrate` writes a GPU run's constants where the static report and the step cost
    model read them; a dry run's or another GPU's are refused."""
    from bench import gpu_model, gpu_report, static

    summary = {"dry_run": False, "commit": "abc1234",
               "machine": {"name": "NVIDIA H100 80GB HBM3", "gpu": "NVIDIA H100 80GB HBM3",
                           "date": "2026-12-06T10:00:00+00:00"},
               "constants": {"copy_tbps": 2.9, "bf16_tflops": 700.0, "fp32_tflops": 50.0,
                             "launch_us_eager": 5.0, "launch_us_graphed": 1.2,
                             "matmul_efficiency": {"k<=128": 0.4, "k<=512": 0.7, "k>512": 1.0}}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    constants = tmp_path / "gpu_constants.json"
    assert gpu_report.main(["calibrate", str(path), "--out", str(constants)]) == 0
    entry = json.loads(constants.read_text())["h100"]
    assert entry["copy_tbps"] == 2.9 and entry["commit"] == "abc1234"
    gpu = gpu_model.calibrated("h100", gpu_model.GPUS["h100"], constants)
    assert (gpu.copy_tbps, gpu.launch_us_eager) == (2.9, 5.0)
    assert gpu.efficiency(128) == 0.4 and gpu.efficiency(4096) == 1.0
    assert "NVIDIA H100 80GB HBM3" in gpu.source and "abc1234" in gpu.source
    sgpu = static._calibrate(static.GPUS, constants)["H100"]
    assert sgpu["copy_bytes_s"] == 2.9e12 and sgpu["bf16_flops_s"] == 700e12
    for bad in ({**summary, "dry_run": True},
                {**summary, "machine": {"name": "NVIDIA A10", "gpu": "NVIDIA A10"}}):
        path.write_text(json.dumps(bad))
        assert gpu_report.main(["calibrate", str(path), "--out", str(constants)]) == 2


def test_quick_tiny_with_compile(tmp_path):
    """`python -m bench --quick` writes JSON, CSV (with the machine) and the plot; torch.compile
    of the reference is timed; interpreted Triton never is."""
    out = tmp_path / "quick"
    proc = _run(["-m", "bench", "--quick", "--sets", "tiny", "--ops", "token_logprobs",
                 "--budget", "0.05", "--threads", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "results.json").read_text())
    assert report["machine"]["name"] and report["machine"]["torch"] == torch.__version__
    assert report["roofline"]["copy_GBps"] > 0 and report["roofline"]["matmul_TFLOPs"] > 0
    rows = {(r["shape"], r["mode"], r["provider"]): r for r in report["rows"]}
    for shape in ("R=64,V=256", "R=16,V=1000"):
        for mode in ("fwd", "fwd+bwd"):
            for prov in ("torch", "torch.compile"):
                r = rows[(shape, mode, prov)]
                assert r["status"] == "ok", r
                assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
                assert r["GBps"] > 0 and r["roofline_frac"] > 0
            assert rows[(shape, mode, "triton")]["status"].startswith("unavailable")
    with (out / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(report["rows"])
    assert csv_rows[0]["machine_name"] == report["machine"]["name"]
    assert csv_rows[0]["machine_date"] == report["machine"]["date"]
    assert (out / "throughput_vs_V.png").read_bytes()[:4] == b"\x89PNG"
    assert "token_logprobs [fwd+bwd]" in proc.stdout and "median ms" in proc.stdout


def test_wrong_provider_is_not_timed():
    """A provider whose output disagrees with the torch backend is reported, not timed."""
    spec = specs.TOKEN_LOGPROBS
    case = specs.Case("tiny", {"R": 8, "V": 16})
    good = runner.providers_for(spec, torch.device("cpu"), compile_reference=False)[0]
    assert good.name == "torch"
    # Differentiable, so that the forward+backward mode reaches the comparison too.
    bad = specs.Provider("bad", lambda i: 0 * i["logits"][:, 0].float())
    roofline = {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0}
    settings = runner.Settings(budget_s=0.01, min_reps=2, max_reps=3, warmup=1)
    for mode in ("fwd", "fwd+bwd"):
        rows = {r["provider"]: r for r in runner.run_case(
            spec, case, "t", mode, [good, bad], torch.device("cpu"), settings, roofline)}
        assert rows["torch"]["status"] == "ok" and rows["torch"]["samples"] >= 2
        assert rows["bad"]["status"].startswith("mismatch"), rows["bad"]
        assert "median_ms" not in rows["bad"]


def _report(rows: list[tuple[str, float | None]], machine: str = "m") -> dict:
    return {"machine": {"name": machine},
            "rows": [{"op": "op", "mode": "fwd", "shape": "R=1", "dtype": "float32",
                      "provider": p, "median_ms": t} for p, t in rows]}


def test_compare_logic():
    base = _report([("torch", 1.0), ("cpu", 2.0), ("liger", None)])
    same = output.compare(base, _report([("torch", 1.1), ("cpu", 2.0)]), tolerance=0.15)
    assert len(same.compared) == 2 and not same.regressions and same.exit_code == 0
    slower = output.compare(base, _report([("torch", 1.2), ("cpu", 1.0)]), tolerance=0.15)
    assert [k[-1] for k, _, _ in slower.regressions] == ["torch"] and slower.exit_code == 1
    # A row without a timing on either side is not compared; nothing compared is its own code.
    none = output.compare(base, _report([("liger", 1.0), ("cuda", 1.0)]))
    assert not none.compared and none.exit_code == 2
    text = output.format_comparison(none, 0.15, "base.json")
    assert "nothing was compared" in text
    other = output.compare(base, _report([("torch", 1.0)], machine="other"))
    assert "not comparable" in output.format_comparison(other, 0.15, "base.json")
    with pytest.raises(ValueError, match="tolerance"):
        output.compare(base, base, tolerance=-0.1)


def test_compare_cli_exit_codes(tmp_path, capsys):
    """--compare: 0 against a much slower baseline, 1 against a much faster one, 2 when nothing
    matches. (Baselines scaled by 1000x, so a busy machine cannot flip the outcome.)"""
    args = ["--ops", "daps_weights", "--sets", "tiny", "--no-compile", "--budget", "0.01",
            "--no-plot", "--providers", "torch"]
    out = tmp_path / "run"
    assert harness.main(args + ["--out", str(out)]) == 0
    results = out / "results.json"

    def scaled(factor):
        report = json.loads(results.read_text())
        for r in report["rows"]:
            if r.get("median_ms"):
                r["median_ms"] *= factor
        return report

    (tmp_path / "slower.json").write_text(json.dumps(scaled(1000)))
    assert harness.main(args + ["--out", str(tmp_path / "r0"), "--compare",
                                str(tmp_path / "slower.json")]) == 0
    assert "1 compared, 0 regressed" in capsys.readouterr().out
    faster = scaled(1 / 1000)
    (tmp_path / "faster").mkdir()
    (tmp_path / "faster" / "baseline.json").write_text(json.dumps(faster))
    assert harness.main(args + ["--out", str(tmp_path / "r1"), "--compare",
                                str(tmp_path / "faster")]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    unrelated = copy.deepcopy(faster)
    for r in unrelated["rows"]:
        r["shape"] = "N=1,K=1"
    (tmp_path / "unrelated.json").write_text(json.dumps(unrelated))
    assert harness.main(args + ["--out", str(tmp_path / "r2"), "--compare",
                                str(tmp_path / "unrelated.json")]) == 2
    assert "nothing was compared" in capsys.readouterr().out


def test_bad_arguments():
    assert harness.main(["--ops", "no_such_op", "--out", "/nonexistent"]) == 2
    with pytest.raises(SystemExit):
        e2e.parse_args(["--cases", "mnist"])  # PRESET:BATCH expected


def test_gpu_report_baseline_pieces(tmp_path):
    """A report done in pieces (--ops) builds one baseline, and a piece is compared only with
    baseline rows of its own ops."""
    from types import SimpleNamespace

    from bench import gpu_report

    baseline = tmp_path / "baseline.json"
    first = _report([("torch", 1.0)])
    (tmp_path / "a.json").write_text(json.dumps(first))
    gpu_report._merge_baseline(tmp_path / "a.json", baseline, output.row_key)
    second = _report([("torch", 2.0), ("cpu", 3.0)])
    for r in second["rows"]:
        r["op"] = "other_op"
    (tmp_path / "b.json").write_text(json.dumps(second))
    gpu_report._merge_baseline(tmp_path / "b.json", baseline, output.row_key)
    rows = json.loads(baseline.read_text())["rows"]
    assert sorted((r["op"], r["provider"]) for r in rows) == [
        ("op", "torch"), ("other_op", "cpu"), ("other_op", "torch")]
    args = SimpleNamespace(update_baseline=False, dry_run=False, tolerance=0.15)
    cmd: list[str] = []
    gpu_report._baseline_step(baseline, args, cmd, ["third_op"])
    assert "--compare" not in cmd  # nothing of third_op in the baseline: store, not compare
    gpu_report._baseline_step(baseline, args, cmd, ["op"])
    assert cmd[:2] == ["--compare", str(baseline)]


@pytest.mark.parametrize("name", ["categorical_head", "causal_lm_token_logprobs"])
def test_drop_in_specs_reference_matches_the_op(name):
    """The plain-PyTorch reference that torch.compile is given computes what the drop-in path
    computes (values and gradients), on the spec's own tiny inputs; padding included."""
    spec = specs.SPEC_BY_NAME[name]
    assert spec.available()
    gen = torch.Generator().manual_seed(0)
    inputs = spec.make(spec.sets["tiny"][0].dims, torch.float32, torch.device("cpu"), gen)
    outs = []
    for f in (functools.partial(spec.resolve(), backend="torch"), spec.reference):
        leaves = {k: (v.detach().requires_grad_() if k in spec.grad_wrt else v)
                  for k, v in inputs.items()}
        out = spec.call(f, leaves)
        first = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(first, [leaves[k] for k in spec.grad_wrt],
                                    leaves["grad_out"])
        outs.append((out if isinstance(out, tuple) else (out,), grads))
    (o1, g1), (o2, g2) = outs
    for a, b in zip(o1 + g1, o2 + g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    providers = {p.name: p for p in runner.providers_for(spec, torch.device("cpu"),
                                                          compile_reference=False)}
    assert providers["torch"].unavailable is None


def test_memory_target_check_covers_llm_vocabularies():
    from bench import memory

    def row(provider, V, nbytes):
        return {"provider": provider, "N": 8192, "D": 128, "V": V, "extra_bytes": nbytes}

    rows = [row("materialised", 50257, 800), row("fused", 50257, 100),
            row("materialised", 131072, 800), row("fused", 131072, 101),
            row("materialised", 1024, 10), row("fused", 1024, 10)]
    lines = memory.target_check(rows)
    assert len(lines) == 2  # V = 1024 carries no target
    assert "V=50257: met (0.1250)" in lines[0] and "V=131072: NOT met" in lines[1]
    assert 50257 in memory.parse_args([]).v and 131072 in memory.parse_args([]).v


def test_e2e_times_the_trainer_loop_against_its_step(tmp_path, capsys):
    assert e2e.main(["--dry-run", "--loop", "--providers", "fused", "--out",
                     str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "trainer loop digits:4:" in out and "loop/step" in out
    (loop,) = json.loads((tmp_path / "e2e.json").read_text())["loop"]
    assert loop["status"] == "ok" and loop["loop_ms"] > 0 and loop["step_ms"] > 0
    assert loop["loop_over_step"] == pytest.approx(loop["loop_ms"] / loop["step_ms"])
