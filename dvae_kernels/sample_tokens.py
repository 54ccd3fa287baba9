"""sample_tokens: one categorical sample per row of logits, and its log-probability, in one pass.

    tokens[...] ~ Categorical(softmax(logits / temperature))
    logp[...]   = log_softmax(logits.float() / temperature, -1)[tokens]

Read top to bottom: the random stream (shared by every backend and by linear_sample_tokens),
torch backend, Triton kernel and launcher, the registered op, the public function.

Gumbel-max: ``argmax_v(z_v + G_v)`` with ``z = logits / temperature`` and independent standard
Gumbel ``G_v`` is a sample of ``softmax(z)``. It needs one read of each logit, no prefix sum
and no second pass, and fuses with the log-sum-exp that gives ``logp``. Temperature 0 is the
argmax of the logits (the Gumbel term is dropped; ties go to the lowest index).

The random stream (identical on every backend, so a seed gives the same samples everywhere):

    seeds   = torch.randint(0, 2**32, (2,), generator=generator, device=logits.device)
    mix(x)  = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x5BD1E995; x ^= x >> 16
              (32-bit unsigned, products mod 2^32; both multipliers are odd and below 2^31
              so that the torch version's int64 products never overflow)
    key[r]  = mix(seeds[0] ^ mix((r + seeds[1]) mod 2^32))        r: the flattened row
    bits    = mix(key[r] ^ v)                                     v: the column
    u       = ((bits >> 9) + 0.5) · 2^-23                          in (0, 1), exact in float32
    G[r, v] = -log(-log(u))                                        float32

A counter-based stream: each (row, column) value is a pure function of the two seed words, so
rows can be split across programs, chunks or devices in any order. The seed words are drawn
from the torch generator by a device-side ``torch.randint`` (advancing it like any random op);
the kernel reads them from device memory, so there is no host synchronisation and a
CUDA-graph capture replays with fresh seeds from the captured generator. Resolution: ``u`` has
23 bits, so ``G`` is clipped to [-2.81, 16.6]; each tail it drops has probability 6e-8.
Backends agree exactly on the stream's integers and on ``u``; ``log`` may differ by a float32
ulp or two between libraries (the Triton kernels use the GPU's ``lg2.approx`` for ``G``), which
can change a sample only when two candidates' scores are that close.
"""

from __future__ import annotations

import math

import torch

from . import _csrc, _dispatch, _validate
from ._triton import HAS_TRITON, ROW_WARPS, row_tile, tl, triton, vec16

if HAS_TRITON:
    from ._triton import LN2, log2_fast, online_softmax_step
from .token_logprobs import _acc_dtype, log_softmax_parts

# ---------------------------------------------------------------------------------------------
# The random stream, in torch ops (int64 holding uint32 values).
# ---------------------------------------------------------------------------------------------

_M1 = 0x7FEB352D
_M2 = 0x5BD1E995
_MASK32 = 0xFFFFFFFF
_U_SCALE = 2.0 ** -23


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def torch_row_keys(seeds: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-row stream keys for int64 row indices ``rows`` (values < 2^32)."""
    s0 = seeds[0] & _MASK32
    s1 = seeds[1] & _MASK32
    return _mix32(s0 ^ _mix32((rows + s1) & _MASK32))


def torch_gumbel(keys: torch.Tensor, V: int) -> torch.Tensor:
    """[C] keys -> [C, V] float32 standard Gumbel noise of the stream."""
    cols = torch.arange(V, dtype=torch.int64, device=keys.device)
    bits = _mix32(keys[:, None] ^ cols[None, :])
    u = ((bits >> 9).to(torch.float32) + 0.5) * _U_SCALE
    return -torch.log(-torch.log(u))


def draw_seeds(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Two 32-bit seed words as an int64 [2] tensor on ``device`` (no host round trip)."""
    return torch.randint(0, 2 ** 32, (2,), generator=generator, device=device,
                         dtype=torch.int64)


def check_sampling_args(device: torch.device, generator, temperature) -> float:
    """Validate ``generator`` and ``temperature``; return the temperature as a float."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator must be on the inputs' device type ({device.type}), "
                             f"got a generator on {generator.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float (a tensor would need a host read), got "
                        f"{type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    return t


# ---------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------

# Rows per chunk: bounds the [chunk, V] int64 temporaries of the stream to a few tens of MiB.
CHUNK_ELEMENTS = 1 << 22


def torch_sample_rows(x: torch.Tensor, seeds: torch.Tensor, row0: int, temperature: float):
    """Sample rows ``row0 .. row0 + C`` of the stream from logits ``x`` [C, V] (float32 or
    float64) -> (tokens int64 [C], logp [C] in x's dtype)."""
    C, V = x.shape
    nan_row = x.isnan().any(-1)
    if temperature == 0.0:
        m = x.amax(-1) if V > 0 else x.new_full((C,), float("-inf"))
        tokens = x.argmax(-1) if V > 0 else torch.zeros(C, dtype=torch.int64, device=x.device)
        count = (x == m[:, None]).sum(-1).to(x.dtype)
        logp = torch.where(m == float("-inf"), float("nan"), -torch.log(count))
    else:
        z = x * torch.tensor(1.0 / temperature, dtype=torch.float32).to(x.dtype)
        rows = torch.arange(row0, row0 + C, dtype=torch.int64, device=x.device)
        score = z + torch_gumbel(torch_row_keys(seeds, rows), V).to(x.dtype)
        tokens = score.argmax(-1) if V > 0 else torch.zeros(C, dtype=torch.int64,
                                                                device=x.device)
        shifted, log_s, _ = log_softmax_parts(z)
        picked = shifted.gather(-1, tokens[:, None])[:, 0] - log_s if V > 0 else log_s
        logp = picked  # (z - m) - log s, never z - lse
    logp = torch.where(nan_row, float("nan"), logp)
    return tokens, logp


def _torch_forward(logits: torch.Tensor, seeds: torch.Tensor, temperature: float):
    R, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    tokens = torch.empty(R, dtype=torch.int64, device=logits.device)
    logp = torch.empty(R, dtype=acc, device=logits.device)
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for r0 in range(0, R, step):
        t, lp = torch_sample_rows(logits[r0:r0 + step].to(acc), seeds, r0, temperature)
        tokens[r0:r0 + step] = t
        logp[r0:r0 + step] = lp
    return tokens, logp


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _mix32_tl(x):
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x5BD1E995
        x ^= x >> 16
        return x

    @triton.jit
    def row_keys_tl(seed_ptr, rows):
        """uint32 stream keys of ``rows`` (int32 or int64 row indices)."""
        s0 = tl.load(seed_ptr).to(tl.uint32)
        s1 = tl.load(seed_ptr + 1).to(tl.uint32)
        return _mix32_tl(s0 ^ _mix32_tl(rows.to(tl.uint32) + s1))

    @triton.jit
    def gumbel_tl(keys, cols):
        """-log(-log u) as -ln2·log2(-ln2·log2 u): two MUFU.LG2 on a GPU (tl.log is
        libdevice's logf, about twenty instructions each)."""
        bits = _mix32_tl(keys[:, None] ^ cols.to(tl.uint32)[None, :])
        u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
        return log2_fast(log2_fast(u) * (-LN2)) * (-LN2)

    @triton.jit
    def sample_init(BLOCK_R: tl.constexpr):
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)  # running max of z
        m_safe = tl.zeros([BLOCK_R], tl.float32)  # finite shift
        s = tl.zeros([BLOCK_R], tl.float32)  # Σ exp(z - m_safe), or the count of maxima
        best = tl.full([BLOCK_R], float("-inf"), tl.float32)  # best score so far
        bidx = tl.zeros([BLOCK_R], tl.int32)  # its column
        bz = tl.full([BLOCK_R], float("-inf"), tl.float32)  # its z
        nans = tl.zeros([BLOCK_R], tl.int32)  # NaNs seen in the row
        return m, m_safe, s, best, bidx, bz, nans

    @triton.jit
    def sample_step(x, v0, cols, keys, inv_t, m, m_safe, s, best, bidx, bz, nans,
                    GREEDY: tl.constexpr, BLOCK_V: tl.constexpr):
        """Fold one [BLOCK_R, BLOCK_V] tile of logits (-inf outside the row) into the state."""
        nans += tl.sum((x != x).to(tl.int32), axis=1)
        if GREEDY:
            z = x
            score = x
            tm = tl.max(z, axis=1)
            tc = tl.sum((z == tm[:, None]).to(tl.float32), axis=1)
            s = tl.where(tm > m, tc, tl.where(tm == m, s + tc, s))
            m = tl.maximum(m, tm)
        else:
            z = x * inv_t
            score = z + gumbel_tl(keys, cols)
            m, m_safe, s, _ = online_softmax_step(z, m, m_safe, s, s, False)
        tmax = tl.max(score, axis=1)
        targ = tl.argmax(score, axis=1)  # first maximum within the tile
        local = tl.arange(0, BLOCK_V)
        zsel = tl.sum(tl.where(local[None, :] == targ[:, None], z, 0.0), axis=1)
        better = tmax > best  # strict: an earlier tile wins ties
        best = tl.where(better, tmax, best)
        bidx = tl.where(better, v0 + targ, bidx)
        bz = tl.where(better, zsel, bz)
        return m, m_safe, s, best, bidx, bz, nans

    @triton.jit
    def sample_finish(m, m_safe, s, bz, nans, GREEDY: tl.constexpr):
        if GREEDY:
            logp = tl.where(m == float("-inf"), float("nan"), -tl.log(s))
        else:
            logp = (bz - m_safe) - tl.log(s)  # never z - lse: lse is rounded at z's magnitude
        return tl.where(nans > 0, float("nan"), logp)

    @triton.jit
    def _sample_tokens_kernel(
        logits_ptr, seed_ptr, tokens_ptr, logp_ptr, R, V, stride_row, inv_t,
        GREEDY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
        VEC: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        if VEC > 1:  # 16-byte rows: vector loads (as in token_logprobs)
            V = (V // VEC) * VEC
            stride_row = (stride_row // VEC) * VEC
        row_off = rows.to(tl.int64) * stride_row
        keys = row_keys_tl(seed_ptr, rows)
        m, m_safe, s, best, bidx, bz, nans = sample_init(BLOCK_R)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols[None, :] < V)
            x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=mask,
                        other=float("-inf")).to(tl.float32)
            m, m_safe, s, best, bidx, bz, nans = sample_step(
                x, v0, cols, keys, inv_t, m, m_safe, s, best, bidx, bz, nans,
                GREEDY, BLOCK_V)
        logp = sample_finish(m, m_safe, s, bz, nans, GREEDY)
        tl.store(tokens_ptr + rows, bidx.to(tl.int64), mask=row_ok)
        tl.store(logp_ptr + rows, logp, mask=row_ok)


def _triton_forward(logits: torch.Tensor, seeds: torch.Tensor, temperature: float):
    R, V = logits.shape
    tokens = torch.zeros(R, dtype=torch.int64, device=logits.device)
    logp = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R == 0:
        return tokens, logp
    block_r, block_v = row_tile(V)
    greedy = temperature == 0.0
    _sample_tokens_kernel[(triton.cdiv(R, block_r),)](
        logits, seeds, tokens, logp, R, V, logits.stride(0),
        1.0 if greedy else 1.0 / temperature,
        GREEDY=greedy, BLOCK_R=block_r, BLOCK_V=block_v, VEC=vec16(logits),
        num_warps=ROW_WARPS,
    )
    return tokens, logp


# The stream's row and column counters are 32-bit.
MAX_ROWS = 2 ** 31 - 1


def _supports_triton(logits: torch.Tensor) -> str | None:
    if logits.dtype == torch.float64:
        return "float64 logits are served by the torch backend only"
    if logits.numel() // max(logits.shape[-1], 1) > MAX_ROWS:
        return f"more than {MAX_ROWS} rows"
    return None


def _native_forward(logits: torch.Tensor, seeds: torch.Tensor, temperature: float):
    """The cpu backend: the C++ kernel of csrc/, one pass per row (the torch backend's tokens
    up to the log's last ulp). On CUDA the Triton kernel serves."""
    return _csrc.ops().sample_tokens_fwd(logits, None, seeds, temperature, 0)


def _supports_native(logits: torch.Tensor) -> str | None:
    return _csrc.refuse_float64("logits", logits)


OP = _dispatch.Op("sample_tokens")
OP.register("torch", _torch_forward)
OP.register("triton", _triton_forward, supports=_supports_triton,
            limits=f"no float64, at most {MAX_ROWS} rows")
OP.register("cpu", _native_forward, supports=_supports_native, limits="no float64")


# ---------------------------------------------------------------------------------------------
# Registered op: logits [R, V] with unit column stride, seeds int64 [2]. A pure function of its
# inputs (the randomness is in ``seeds``), so it can be traced, replayed and opchecked.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("dvae_kernels::sample_tokens", mutates_args=())
def _op(logits: torch.Tensor, seeds: torch.Tensor, temperature: float, backend: str
        ) -> tuple[torch.Tensor, torch.Tensor]:
    return OP.forward(backend)(logits, seeds, temperature)


@_op.register_fake
def _(logits, seeds, temperature, backend):
    tokens = logits.new_empty(logits.shape[:1], dtype=torch.int64)
    return tokens, logits.new_empty(logits.shape[:1], dtype=_acc_dtype(logits.dtype))


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def sample_tokens(logits: torch.Tensor, *, generator: torch.Generator | None = None,
                  temperature: float = 1.0, backend: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per position from ``softmax(logits / temperature)``, with its log-prob.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16 (float64: torch backend only), V >= 1.
        generator: the torch generator to draw the two seed words from (default: the device's
            default generator, so ``torch.manual_seed`` makes runs reproducible).
        temperature: a float >= 0; 0 takes the argmax (ties: the lowest index).
        backend: ``"torch"``, ``"triton"`` or ``None``/``"auto"``.

    Returns:
        ``(tokens[...] int64, logp[...] float32)``. ``logp`` is the log-probability of the
        token under the distribution it was drawn from, ``log_softmax(logits / temperature)``:
        at temperature 1 (DAPS samples at 1) it is ``log q``; at another temperature call
        :func:`token_logprobs` for the untempered value; at temperature 0 it is
        ``-log(number of maxima)`` (0 for a unique maximum), the limit of the tempered
        value. Not differentiable. A row with a NaN gives NaN ``logp`` and an unspecified
        token; a row of all -inf gives NaN ``logp`` and token 0.

    Equivalent PyTorch (in distribution; the samples themselves follow the stream documented
    in this module, identical on every backend)::

        z = logits.float() / temperature
        tokens = torch.distributions.Categorical(logits=z).sample()
        logp = torch.log_softmax(z, -1).gather(-1, tokens[..., None])[..., 0]

    The same generator state gives the same samples on every backend, on any device count
    and in any row order. No host synchronisation: safe under CUDA-graph capture.
    """
    _validate.check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got {_validate.describe(logits)}")
    t = check_sampling_args(logits.device, generator, temperature)
    _validate.refuse_sampling_under_transform("sample_tokens")
    name = OP.select(backend, logits.device, logits=logits)
    lead = logits.shape[:-1]
    x = logits.detach().reshape(-1, logits.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    seeds = draw_seeds(logits.device, generator)
    tokens, logp = _op(x, seeds, t, name)
    return tokens.view(lead), logp.view(lead)
