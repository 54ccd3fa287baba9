"""Each script in examples/ runs at tiny shapes and its numbers agree with the float64 or
materialised reference it computes (the checks are the examples' own outputs, bounded here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    scripts = {p.stem for p in EXAMPLES.glob("*.py")}
    assert scripts == {"categorical_head", "codebook_vq", "maskgit_weighted_ce",
                       "gpt2_policy_logprobs", "grpo_vs_daps_sort"}


def test_categorical_head_example():
    out = _load("categorical_head").main(["--tiny"])
    for key in ("logp_err", "entropy_err", "sample_logp_err", "loss_err"):
        assert out[key] < 1e-5, (key, out[key])
    assert out["grad_weight_err"] < 1e-6 and out["grad_bias_err"] < 1e-6
    assert out["trunk_grad_norm"] > 0  # the gradient reached the layers below the head
    assert out["logits_equal"] == 1  # head(h) is exactly the nn.Linear it replaced


def test_codebook_vq_example():
    out = _load("codebook_vq").main(["--tiny"])
    for key in ("logp_err", "sample_logq_err", "entropy_err", "loss_err"):
        assert out[key] < 5e-5, (key, out[key])
    assert out["grad_codebook_err"] < 1e-5
    assert out["encoder_grad_norm"] > 0 and out["codes_used"] > 1


def test_maskgit_example():
    out = _load("maskgit_weighted_ce").main(["--tiny"])
    assert out["fused_head_loss_err"] < 1e-5 and out["weighted_token_nll_err"] < 1e-5
    assert out["grad_weight_err"] < 1e-6
    assert 0 < out["mask_fraction"] < 1 and out["embed_grad_norm"] > 0


def test_gpt2_example():
    pytest.importorskip("transformers")
    out = _load("gpt2_policy_logprobs").main(["--tiny"])
    assert out["logp_vs_model_logits_err"] < 2e-5
    assert out["logp_vs_float64_err"] < 2e-5 and out["entropy_vs_float64_err"] < 2e-5
    assert out["grad_lm_head_rel_err"] < 1e-5 and out["grad_hidden_rel_err"] < 1e-5
    assert out["grad_lm_head_norm"] > 0 and out["grad_hidden_norm"] > 0
    assert out["masked_positions_zero"] == 1
    # At V = 50257 even 254 tokens' logits dominate the step: the fused step holds less.
    assert 0 < out["mem_fused_MiB"] < out["mem_materialised_MiB"]


def test_grpo_vs_daps_example(tmp_path):
    """Both methods train the same tiny LM for the same steps; curves come out as CSV and PNG."""
    out = _load("grpo_vs_daps_sort").main(["--tiny", "--out", str(tmp_path)])
    for m in ("grpo", "daps"):
        assert out[f"{m}_step"] == 6
        assert 0 <= out[f"{m}_mean_reward"] <= 1 and 0 <= out[f"{m}_greedy_accuracy"] <= 1
    rows = (tmp_path / "curves.csv").read_text().splitlines()
    assert rows[0] == "method,step,seconds,mean_reward,greedy_accuracy" and len(rows) == 13
    assert (tmp_path / "curves.png").stat().st_size > 1000
