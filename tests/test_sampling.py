"""sample_tokens and linear_sample_tokens: distribution, the shared random stream,
reproducibility across backends, temperature 0, log-probabilities against float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, DTYPES, assert_close_to_reference, available_backends

from dvae_kernels.linear_sample_tokens import linear_sample_tokens
from dvae_kernels.sample_tokens import sample_tokens, torch_gumbel, torch_row_keys

# The backends of these ops that run on the test device (DVAE_TEST_DEVICE: the CPU here, with
# Triton through its interpreter; CUDA on a GPU machine).
BACKENDS = [b for b in available_backends() if b in ("torch", "triton", "cpu")]

# The interpreter evaluates log(0) and inf - inf for the padding rows of a tile (masked out
# before the store); numpy warns about them.
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")]


def _gen(seed=1234):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _d(*tensors):
    out = tuple(t.to(DEVICE) for t in tensors)
    return out if len(out) > 1 else out[0]


def _binomial_ok(counts, probs, n, sigmas=5.0):
    """Each category's count within ``sigmas`` binomial standard deviations (+1 for rounding);
    at 5 sigma a correct sampler fails about once in 3.5 million categories."""
    expected = n * probs
    sd = (n * probs * (1 - probs)).sqrt()
    return ((counts - expected).abs() <= sigmas * sd + 1).all()


# --------------------------------------------------------------------------- the stream


def _mix_py(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x5BD1E995) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_stream_is_the_documented_formula():
    # The module docstring's definition, in plain Python integers, against the torch stream
    # (which the Triton kernels are checked against below through identical samples).
    seeds = torch.tensor([0xDEADBEEF, 0x0BADF00D], dtype=torch.int64)
    rows = torch.tensor([0, 1, 77, 2 ** 31 - 1], dtype=torch.int64)
    g = torch_gumbel(torch_row_keys(seeds, rows), 5)
    for i, r in enumerate(rows.tolist()):
        key = _mix_py(0xDEADBEEF ^ _mix_py((r + 0x0BADF00D) & 0xFFFFFFFF))
        for v in range(5):
            u = ((_mix_py(key ^ v) >> 9) + 0.5) * 2.0 ** -23
            assert abs(g[i, v].item() - (-math.log(-math.log(u)))) < 1e-5


def test_stream_is_standard_gumbel():
    g = torch_gumbel(torch_row_keys(torch.tensor([5, 9]), torch.arange(200)), 1000).double()
    n = g.numel()
    euler = 0.5772156649
    assert abs(g.mean().item() - euler) < 5 * (math.pi ** 2 / 6 / n) ** 0.5
    assert abs(g.var().item() - math.pi ** 2 / 6) < 0.02
    # Columns and rows are not correlated with their neighbours.
    assert abs(torch.corrcoef(torch.stack([g[:, :-1].flatten(), g[:, 1:].flatten()]))[0, 1]) \
        < 0.01
    assert abs(torch.corrcoef(torch.stack([g[:-1].flatten(), g[1:].flatten()]))[0, 1]) < 0.01


# --------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_frequencies_match_softmax(backend, temperature):
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, -3.0, 1.5])
    n = 20000
    tokens, logp = sample_tokens(_d(logits).expand(n, -1), generator=_gen(), temperature=temperature,
                                 backend=backend)
    probs = torch.softmax(logits.double() / temperature, -1)
    tokens, logp = tokens.cpu(), logp.cpu()
    counts = torch.bincount(tokens, minlength=7).double()
    assert _binomial_ok(counts, probs, n), (counts / n, probs)
    torch.testing.assert_close(logp.double(), probs.log()[tokens], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_frequencies_match_softmax(backend):
    hidden = torch.randn(1, 8).expand(6000, -1)
    weight = torch.randn(5, 8) * 0.5
    tokens, _ = linear_sample_tokens(*_d(hidden, weight), generator=_gen(), backend=backend)
    tokens = tokens.cpu()
    probs = torch.softmax(F.linear(hidden[0].double(), weight.double()), -1)
    counts = torch.bincount(tokens, minlength=5).double()
    assert _binomial_ok(counts, probs, 6000), (counts / 6000, probs)


# --------------------------------------------------------------------------- reproducibility


# V = 1, 3 (not powers of two), 1000 (several tiles); a batch of 1; an empty batch.
SHAPES = [((7,), 1), ((2, 5), 3), ((1,), 1000), ((0,), 4), ((30,), 257)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,V", SHAPES)
def test_same_seed_same_samples_on_each_backend(dtype, lead, V):
    logits = (torch.randn(*lead, V) * 2).to(DEVICE, dtype)
    results = {be: sample_tokens(logits, generator=_gen(7), backend=be) for be in BACKENDS}
    tokens, logp = results["torch"]
    assert tokens.shape == lead and tokens.dtype == torch.int64 and logp.dtype == torch.float32
    if V > 0 and tokens.numel():
        assert 0 <= tokens.min() and tokens.max() < V
    ref = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]
    assert_close_to_reference(logp, ref, ref, dtype, "torch logp")
    for be, (t, lp) in results.items():
        assert torch.equal(t, tokens), be
        assert_close_to_reference(lp, ref, logp, dtype, f"{be} logp")
    again = sample_tokens(logits, generator=_gen(7), backend="torch")
    assert torch.equal(again[0], tokens)


def test_seed_from_default_generator_and_fresh_draws():
    logits = torch.randn(64, 50, device=DEVICE)
    torch.manual_seed(3)
    a, _ = sample_tokens(logits)
    b, _ = sample_tokens(logits)  # the generator advanced: new seeds
    torch.manual_seed(3)
    c, _ = sample_tokens(logits)
    assert torch.equal(a, c) and not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    base = torch.randn(9, 40, device=DEVICE)
    logits = base[::2, ::2]  # strided rows and columns
    out = sample_tokens(logits, generator=_gen(), backend=backend)
    ref = sample_tokens(logits.contiguous(), generator=_gen(), backend="torch")
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_same_samples_as_materialised(backend, dtype, bias):
    # The fused op draws what sample_tokens draws on the materialised logits (same stream,
    # same rows); with float32 accumulation on both sides the logits agree to rounding.
    hidden = torch.randn(3, 11, 24).to(DEVICE, dtype)[:, ::2]  # non-contiguous leading dims
    weight = torch.randn(70, 24).to(DEVICE, dtype)
    b = torch.randn(70).to(DEVICE, dtype) if bias else None
    logits = F.linear(hidden.float(), weight.float(), b.float() if bias else None)
    for temperature in (1.0, 0.5, 0.0):
        ref_t, ref_lp = sample_tokens(logits, generator=_gen(11), temperature=temperature,
                                      backend="torch")
        t, lp = linear_sample_tokens(hidden, weight, b, generator=_gen(11),
                                     temperature=temperature, backend=backend)
        assert t.shape == (3, 6) and torch.equal(t, ref_t)
        torch.testing.assert_close(lp, ref_lp, atol=2e-5, rtol=0)


def test_linear_sample_empty_and_autocast():
    w = torch.randn(9, 4)
    t, lp = linear_sample_tokens(torch.randn(0, 4), w, backend="torch")
    assert t.shape == (0,) and lp.shape == (0,)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t, lp = linear_sample_tokens(torch.randn(5, 4), w, generator=_gen(), backend="torch")
    assert t.dtype == torch.int64 and lp.dtype == torch.float32


# --------------------------------------------------------------------------- temperature 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_zero_is_argmax(backend):
    logits = torch.randn(50, 37, device=DEVICE)
    tokens, logp = sample_tokens(logits, generator=_gen(), temperature=0.0, backend=backend)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.equal(logp.cpu(), torch.zeros(50))
    # Ties: the lowest index; logp = -log(number of maxima), the tempered limit.
    tied = _d(torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0]]))
    tokens, logp = sample_tokens(tied, temperature=0.0, backend=backend)
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logp.cpu(), torch.tensor([-math.log(2), -math.log(4)]))
    # A small temperature converges to the argmax.
    cold, _ = sample_tokens(logits, generator=_gen(), temperature=1e-4, backend=backend)
    assert torch.equal(cold, logits.argmax(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_temperature_zero_is_argmax(backend):
    hidden, weight = _d(torch.randn(20, 16), torch.randn(45, 16))
    tokens, logp = linear_sample_tokens(hidden, weight, temperature=0.0, backend=backend)
    assert torch.equal(tokens.cpu(), (hidden.cpu() @ weight.cpu().t()).argmax(-1))
    assert torch.equal(logp.cpu(), torch.zeros(20))


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_non_finite_rows(backend, temperature):
    inf = float("inf")
    logits = torch.tensor([
        [0.0, float("nan"), 1.0],  # NaN: logp NaN
        [-inf, -inf, -inf],  # all -inf: logp NaN, token 0
        [-inf, 3.0, -inf],  # one survivor: certain
        [1e4, -1e4, 1e4 - 1],  # extreme but finite
    ])
    tokens, logp = sample_tokens(_d(logits), generator=_gen(), temperature=temperature,
                                 backend=backend)
    tokens, logp = tokens.cpu(), logp.cpu()
    assert logp[0].isnan() and logp[1].isnan() and tokens[1] == 0
    assert tokens[2] == 1 and logp[2] == 0.0
    assert tokens[3] in (0, 2) and logp[3].isfinite()


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    seeds = _d(torch.tensor([123, 456], dtype=torch.int64))
    torch.library.opcheck(torch.ops.dvae_kernels.sample_tokens.default,
                          (_d(torch.randn(6, 10)), seeds, 1.0, backend))
    torch.library.opcheck(torch.ops.dvae_kernels.linear_sample_tokens.default,
                          (*_d(torch.randn(6, 16), torch.randn(10, 16), torch.randn(10)), seeds,
                           0.7, backend))


def test_torch_compile_fullgraph():
    def step(logits, hidden, weight):
        t1, lp1 = sample_tokens(logits, backend="torch")
        t2, lp2 = linear_sample_tokens(hidden, weight, temperature=0.0, backend="torch")
        return t1, lp1, t2, lp2

    logits, hidden, weight = torch.randn(4, 30), torch.randn(4, 8), torch.randn(30, 8)
    t1, lp1, t2, lp2 = torch.compile(step, fullgraph=True, backend="aot_eager")(
        logits, hidden, weight)
    ref = torch.log_softmax(logits, -1).gather(-1, t1[:, None])[:, 0]
    torch.testing.assert_close(lp1, ref)
    assert torch.equal(t2, (hidden @ weight.t()).argmax(-1))


def test_bad_input_messages():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        sample_tokens(x, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature must be finite"):
        sample_tokens(x, temperature=float("inf"))
    with pytest.raises(TypeError, match="temperature must be a float"):
        sample_tokens(x, temperature=torch.tensor(1.0))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample_tokens(x, generator=3)
    with pytest.raises(ValueError, match="V >= 1"):
        sample_tokens(torch.randn(3, 0))
    with pytest.raises(TypeError, match="logits must be float32"):
        sample_tokens(x.long())
    with pytest.raises(ValueError, match="weight must be \\[V, D\\]"):
        linear_sample_tokens(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="V >= 1"):
        linear_sample_tokens(torch.randn(3, 4), torch.randn(0, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_vocabulary_split_merges_like_one_pass(backend):
    # Few rows: the Triton kernel splits V = 1000 across programs (16 splits) and merges the
    # partial states; ties of the argmax across splits go to the lowest index, as in one pass.
    hidden = torch.randn(5, 32).to(DEVICE)
    weight = torch.randn(1000, 32).to(DEVICE)
    weight[900] = weight[5]  # equal logits in two splits
    hidden[0] = weight[5] * 3.0  # row 0's argmax is the tie 5 / 900
    logits = F.linear(hidden, weight)
    if backend == "triton":
        import importlib

        lst = importlib.import_module("dvae_kernels.linear_sample_tokens")
        assert lst._vocab_splits(5, 1000)[0] > 1
    for temperature in (1.0, 0.0):
        ref_t, ref_lp = sample_tokens(logits, generator=_gen(5), temperature=temperature,
                                      backend="torch")
        t, lp = linear_sample_tokens(hidden, weight, generator=_gen(5),
                                     temperature=temperature, backend=backend)
        assert torch.equal(t, ref_t)
        torch.testing.assert_close(lp, ref_lp, atol=2e-5, rtol=0)
    assert t[0] == 5 and lp[0] == pytest.approx(-math.log(2), abs=1e-6)
