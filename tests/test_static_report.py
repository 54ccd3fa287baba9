"""bench.static (the sm_90 static kernel report) and the launch specialisation it shares with
dvae_kernels._compile_check. Both need the real Triton compiler, so they run in a subprocess
without TRITON_INTERPRET (the test suite sets it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FIELDS = {"op", "kernel", "arch", "shape", "gpu", "regs", "spills", "smem_bytes", "atomics",
          "bytes_moved", "bytes_min", "predicted_ms", "roofline_fraction"}


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


SPEC_SCRIPT = """
import json
from dvae_kernels import _specialize as S
out = {}
for V in (1024, 1000):
    for wl, launch in S.launches_of(S.token_workloads(64, V), 90):
        names = launch.kernel.arg_names
        out[f"{wl.label}:{V}"] = {
            "div": sorted(names[k[0]] for k, v in launch.attrs.items() if v),
            "const": {names[k[0]]: v for k, v in launch.constexprs.items()},
            "warps": launch.num_warps, "grid": launch.grid}
for wl, launch in S.launches_of(S.linear_workloads(256, 128, 1024), 90):
    names = launch.kernel.arg_names
    out[wl.label] = {"const": {names[k[0]]: v for k, v in launch.constexprs.items()
                               if not isinstance(v, bool)}}
from dvae_kernels import _triton
out["expected"] = {"tile": _triton.row_tile(1024), "warps": _triton.ROW_WARPS}
print(json.dumps(out, default=str))
"""


def test_specialisation_matches_a_real_launch():
    """Divisibility by 16 where the values allow it and not elsewhere; unit strides become
    constexprs; the launcher's own constexprs and warps."""
    proc = _run(["-c", SPEC_SCRIPT])
    assert proc.returncode == 0, proc.stderr[-4000:]
    spec = json.loads(proc.stdout)
    fwd1024, fwd1000 = spec["token_logprobs.fwd:1024"], spec["token_logprobs.fwd:1000"]
    assert {"logits_ptr", "V", "stride_row", "n_rows"} <= set(fwd1024["div"])
    assert "V" not in fwd1000["div"] and "stride_row" not in fwd1000["div"]
    assert "logits_ptr" in fwd1000["div"]  # the allocation itself is aligned
    block_r, block_v = spec["expected"]["tile"]
    assert fwd1024["const"] == {"WITH_ENTROPY": False, "BLOCK_R": block_r, "BLOCK_V": block_v,
                                "VEC": 8}
    assert fwd1000["const"]["VEC"] == 8  # 1000 bf16 logits: 2000-byte rows, 16-byte aligned
    assert fwd1024["warps"] == spec["expected"]["warps"]
    assert fwd1024["grid"] == [64 // block_r, 1, 1]
    # Unit strides of the linear ops are constexprs in a real launch.
    assert spec["linear_token_logprobs.fwd"]["const"]["stride_hd"] == 1
    assert spec["linear_token_logprobs.fwd"]["const"]["stride_wd"] == 1


def test_static_report_subset_has_the_fields_and_no_spills(tmp_path):
    out = tmp_path / "static"
    proc = _run(["-m", "bench.static", "--quick", "--arch", "sm_90", "--no-cuda",
                 "--ops", "token_logprobs", "weighted_token_nll", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads((out / "static.json").read_text())
    kernels = [r for r in records if r["kernel"].startswith("_")]
    assert {r["op"] for r in kernels} == {"token_logprobs", "weighted_token_nll"}
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
    for r in kernels:
        assert r["spills"] == 0, f"{r['kernel']} spills {r['spills']} bytes"
        assert r["regs"] > 0 and r["ctas_per_sm"] >= 1
        assert r["gpu"] in ("H100", "H200") and r["predicted_ms"] > 0
        assert 0 < r["roofline_fraction"] <= 1.0 + 1e-9
        assert r["bytes_moved"] >= r["bytes_min"] > 0
        sass = (out / r["sass"]).read_text()
        assert "MUFU.EX2" in sass  # the softmax's exponentials
        assert sum(r["dynamic_per_warp"].values()) > 0
    assert "fwd+bwd per op" in proc.stdout


VEC_SCRIPT = """
import re
from pathlib import Path
from bench import static as B
from dvae_kernels import _specialize as S
for wl, launch in S.launches_of(S.token_workloads(64, 1000), 90):
    if wl.label == "token_logprobs.bwd":
        sass = B.disassemble(S.compile_launch(launch, 90).asm["cubin"], Path(OUT), "k")
        print(len(re.findall(r"LDG\\.E\\.128", sass)), len(re.findall(r"STG\\.E\\.128", sass)),
              len(re.findall(r"LDG\\.E\\.U16", sass)))
"""


def test_rows_of_1000_bf16_logits_load_and_store_16_bytes(tmp_path):
    """V = 1000 is not a multiple of 16 elements (Triton's specialisation) but its bf16 rows
    are 16-byte aligned: the kernels say so, and the compiled code moves 16 bytes at a time."""
    proc = _run(["-c", f"OUT = {str(tmp_path)!r}\n" + VEC_SCRIPT])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ldg128, stg128, ldg16 = map(int, proc.stdout.split())
    assert ldg128 >= 8 and stg128 >= 8 and ldg16 == 0, proc.stdout
