"""bench.gpu_model: the step cost model runs for the small presets, its per-op rules count what
they say they count, and its calibration file is checked."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_model

REQUIRED = {"preset", "gpu", "phases", "total_ms_eager", "total_ms_graphed",
            "launches_per_step", "sampler_launches_per_position", "gpu_hours"}


@pytest.mark.parametrize("preset", ["digits", "mnist"])
def test_cli_small_presets(preset, tmp_path, capsys):
    out = tmp_path / "model.json"
    assert gpu_model.main(["--preset", preset, "--gpu", "h100", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert REQUIRED <= set(doc)
    assert set(doc["phases"]) == set(gpu_model.PHASES)
    for name in ("sample", "reward", "teacher_forced", "losses", "optimizer"):
        p = doc["phases"][name]
        assert p["launches"] > 0 and p["gbytes"] > 0, name
        # every launch costs at least the floor; graphed is never slower than eager
        assert p["ms_eager"] >= p["launches"] * 4e-3 * (1 - 1e-9)
        assert p["ms_graphed"] <= p["ms_eager"]
        assert p["ms_bytes_bound"] <= p["ms_graphed"] + 1e-12
    total = sum(p["launches"] for p in doc["phases"].values())
    assert doc["launches_per_step"] == total
    L = {"digits": 4, "mnist": 8}[preset]
    assert doc["sampled_positions"] == L
    assert 5 < doc["sampler_launches_per_position"] < doc["phases"]["sample"]["launches"] / L
    top = doc["phases"]["sample"]["top_ops"]
    assert top["dvae_kernels::linear_sample_tokens"] == 2 * L  # two launches per position
    steps = doc["config"]["steps"]
    assert doc["gpu_hours"] == pytest.approx(doc["total_ms_eager"] * steps / 3.6e6)
    text = capsys.readouterr().out
    assert "sampler launches per sampled position" in text and "GPU-hours" in text


def test_sampler_launches_scale_with_positions():
    """Four more positions: four times the per-position launches more in the sampling loop."""
    r4, _ = gpu_model.trace_step("digits", ["latent_len=4"])
    r8, _ = gpu_model.trace_step("digits", ["latent_len=8"])
    assert r4.positions == 4 and r8.positions == 8
    per = r4.launches_per_position()
    assert per == r8.launches_per_position() and per == int(per) > 5
    assert r8.loop_launches - r4.loop_launches == 4 * per


class _Probe(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.costs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.costs.append((func._overloadpacket.__name__,
                           gpu_model.op_cost(func, args, kwargs or {}, out, None)))
        return out


def test_op_rules():
    a = torch.randn(8, 16, dtype=torch.bfloat16)
    b = torch.randn(16, 32, dtype=torch.bfloat16)
    with _Probe() as probe:
        a.t()
        a @ b
        a.float()
        torch.zeros(4)
    costs = dict(probe.costs)
    assert costs["t"].launches == 0 and costs["t"].bytes == 0
    mm = costs["mm"]
    assert (mm.launches, mm.flops, mm.half) == (1, 2 * 8 * 16 * 32, True)
    assert mm.bytes == (8 * 16 + 16 * 32 + 8 * 32) * 2
    assert costs["_to_copy"].launches == 1 and costs["_to_copy"].bytes == 8 * 16 * (2 + 4)
    # a broadcast dimension is read once
    assert gpu_model.footprint(torch.ones(5).expand(7, 5)) == 5 * 4


def test_multi_tensor_apply_launches():
    small = [torch.zeros(3) for _ in range(111)]
    assert gpu_model._mta_launches([small]) == 2  # 110 tensors per launch with one list
    assert gpu_model._mta_launches([small, small, small, small]) == 4  # 36 with four
    big = [torch.empty(0).new_empty(321 * gpu_model.MTA_CHUNK)]
    assert gpu_model._mta_launches([big]) == 2  # 320 blocks per launch


def test_calibration_file(tmp_path):
    f = tmp_path / "cal.json"
    f.write_text(json.dumps({"copy_tbps": 2.5, "launch_us_eager": 5}))
    gpu = gpu_model.load_calibration(f, gpu_model.GPUS["h100"])
    assert gpu.copy_tbps == 2.5 and gpu.launch_us_eager == 5.0
    assert gpu.bf16_tflops == gpu_model.GPUS["h100"].bf16_tflops
    f.write_text(json.dumps({"copy_bw": 2.5}))
    with pytest.raises(ValueError, match="unknown keys"):
        gpu_model.load_calibration(f, gpu_model.GPUS["h100"])
    f.write_text(json.dumps({"copy_tbps": -1}))
    with pytest.raises(ValueError, match="copy_tbps must be a positive number"):
        gpu_model.load_calibration(f, gpu_model.GPUS["h100"])


def test_measure_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        gpu_model.measure_calibration()
