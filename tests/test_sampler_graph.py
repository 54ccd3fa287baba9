"""sampler_graph: the sampling loop as one CUDA graph. On the CPU: the config, the auto/off/on
paths, the fallback when capture fails, and the warm-up that leaves the random stream
untouched; on a GPU (marked gpu): capture, fresh draws per replay, and a resumed run that
redraws the same tokens."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dvae.config import load_config
from dvae.models import build_model
from dvae.train_step import GraphedSampler, TrainStep


def _step(device="cpu", **over):
    cfg = load_config("digits", [f"{k}={v}" for k, v in over.items()])
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(cfg.batch_size, 1, 8, 8, device=device)
    return TrainStep(model, cfg, generator=g), x, g


def test_config_validates_sampler_graph():
    assert load_config("digits").sampler_graph == "auto"
    with pytest.raises(ValueError, match="sampler_graph must be auto, on or off, got 'yes'"):
        load_config("digits", ["sampler_graph=yes"])


def test_sampler_graph_words_survive_yaml(tmp_path):
    """YAML 1.1 reads on/off as booleans; for this field they are the words."""
    assert load_config("digits", ["sampler_graph=on"]).sampler_graph == "on"
    assert load_config("digits", ["sampler_graph=off"]).sampler_graph == "off"
    f = tmp_path / "run.yaml"
    f.write_text("preset: digits\nsampler_graph: off\n")
    assert load_config(str(f)).sampler_graph == "off"


def test_on_needs_cuda_and_auto_is_eager_on_cpu():
    with pytest.raises(ValueError, match="sampler_graph='on' needs a CUDA device"):
        _step(sampler_graph="on")
    step, x, g = _step(sampler_graph="auto")
    assert step.graph_mode == "off"
    tokens, logq = step.sample(x)
    assert logq.shape == tokens.shape and logq.dtype == torch.float32
    assert step.graphed is None and tokens.shape == (x.shape[0], 8, 4)


def test_warmup_leaves_the_stream_where_it_was():
    step, x, g = _step()
    state = g.get_state()
    sampler = GraphedSampler(step._sample_eager, g)
    sampler._warmup(x)
    assert torch.equal(g.get_state(), state)
    first = step._sample_eager(x)[0]
    g.set_state(state)
    assert torch.equal(step._sample_eager(x)[0], first)


def test_auto_falls_back_to_eager_with_one_warning():
    step, x, g = _step()
    state = g.get_state()
    expected = step._sample_eager(x)[0]
    g.set_state(state)

    @contextlib.contextmanager
    def failing_capture(graph):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    step.graph_mode = "auto"  # as on CUDA
    step.graphed = GraphedSampler(step._sample_eager, g,
                                  capture=failing_capture, make_graph=object)
    with pytest.warns(UserWarning, match="capturing the sampling loop failed"):
        tokens, _ = step.sample(x)
    # the warm-up drew nothing: the eager fallback draws what an eager step would have
    assert torch.equal(tokens, expected)
    assert step.graph_mode == "off" and step.graphed is None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step.sample(x)  # eager from now on, no second warning


def test_on_raises_when_capture_fails():
    step, x, g = _step()

    @contextlib.contextmanager
    def failing_capture(graph):
        raise RuntimeError("capture failed")
        yield

    step.graph_mode = "on"
    step.graphed = GraphedSampler(step._sample_eager, g,
                                  capture=failing_capture, make_graph=object)
    with pytest.raises(RuntimeError, match="capture failed"):
        step.sample(x)


@pytest.mark.gpu
def test_captured_sampler_on_cuda():
    """Captured = eager for the same stream state; each replay draws fresh tokens; a run
    resumed from a saved stream state redraws the same tokens."""
    step, x, g = _step("cuda", sampler_graph="on", fused_linear="always")
    state = g.get_state()
    eager = step._sample_eager(x)[0]
    g.set_state(state)
    first = step.sample(x)[0]
    assert step.graphed is not None and len(step.graphed.graphs) == 1
    assert torch.equal(first, eager)
    after_first = g.get_state()
    second = step.sample(x)[0]
    assert not torch.equal(first, second)
    g.set_state(after_first)  # resume
    assert torch.equal(step.sample(x)[0], second)
    metrics = step(x, 0)  # a whole step through the captured sampler
    assert torch.isfinite(metrics["loss"]).item()
