"""The autoregressive transformer encoder q_θ(z|x) of docs/algorithm.md (the DAPS "policy").

    patches(x) -> Dense(d) -> bidirectional transformer -> memory [N, P, d]
    [start, z_1 .. z_{L-1}] -> causal transformer (self-attn, cross-attn to memory) -> Dense(V)

Pre-LayerNorm blocks, fixed sinusoidal positions, no attention biases (as in the reference).
Token id 0 is an ordinary token: the start token has its own embedding row (index V).

Two ways through the causal stack, which must agree (tests/test_dvae_models.py):

* :meth:`ARTransformerEncoder.sample` draws K sequences per image with a KV cache, allocated
  once per call (k and v of a layer in one tensor, written in one copy); position t attends to
  the t + 1 slots written so far and reads nothing else (no mask). Every position's shapes are
  fixed by t alone, so the whole loop can be captured as one CUDA graph.
* :meth:`ARTransformerEncoder.teacher_forced` runs all L positions at once (differentiable).

The K samples of one image share its memory. Cross-attention is not causal, so the K·L queries
of an image are folded into one query axis against that image's P keys: the memory's keys and
values are computed and stored once per image, never K times.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dvae_kernels
from dvae_kernels import _dispatch, attention, decode_attention

from . import init
from .patches import Patcher


def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``x``'s device, else None."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def linear_add_layer_norm(a: torch.Tensor, linear: nn.Linear, x: torch.Tensor,
                          ln: nn.LayerNorm, out_dtype: torch.dtype | None,
                          cast: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + linear(a)`` and the LayerNorm ``ln`` of it (:func:`dvae_kernels.
    linear_add_layer_norm`), with ``cast`` the projection's ``(weight, bias)`` already in the
    compute dtype, or None."""
    weight, bias = cast if cast is not None else (linear.weight, linear.bias)
    return dvae_kernels.linear_add_layer_norm(a, weight, bias, x, ln.weight, ln.bias, ln.eps,
                                              out_dtype=out_dtype)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as it is when wider (float64 models in the tests)."""
    return t if t.dtype == torch.float64 else t.float()


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """``[length, dim]`` table: sines in the first half, cosines in the second (reference
    layout), frequencies geometric from 1 to 1/10000."""
    half = dim // 2
    position = torch.arange(length, dtype=torch.float64)[:, None]
    scale = -math.log(10000.0) / max(half - 1, 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float64) * scale)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, :half] = torch.sin(position * freq)
    table[:, half:2 * half] = torch.cos(position * freq)
    return table.float()


class MLP(nn.Module):
    def __init__(self, d: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(d, ratio * d)
        self.fc2 = nn.Linear(ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not in place: fc1's output of a 3-D input is a view, and autograd would copy the
        # slices back in the backward
        return self.fc2(F.relu(self.fc1(x)))


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """[B, T, h*dh] -> [B, h, T, dh]"""
    B, T, D = x.shape
    return x.view(B, T, h, D // h).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, h, T, dh] -> [B, T, h*dh]"""
    B, h, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, h * dh)


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        y = attention(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads),
                      causal)
        return self.out(_merge(y))

    def step(self, x: torch.Tensor, kv_cache: torch.Tensor, t: int,
             t_device: torch.Tensor | None = None, project: bool = True) -> torch.Tensor:
        """One position: x [B, 1, d]; kv_cache [2, B, h, L, dh] gets slot t (k and v in one
        write); attention reads only the t + 1 written slots (no mask, nothing else read):
        :func:`dvae_kernels.decode_attention`, one Triton kernel on CUDA that reads the
        position from ``t_device``."""
        B, _, d = x.shape
        h = self.heads
        qkv = self.qkv(x)
        y = decode_attention(qkv[..., :d].view(B, h, d // h),
                             qkv[..., d:].view(B, 2, h, d // h), kv_cache, t, t_device)
        y = y.reshape(B, 1, d)
        return self.out(y) if project else y


class CrossAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return _heads(k, self.heads), _heads(v, self.heads)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x [N, S, d] (S = the folded queries of one image), k/v [N, h, P, dh]."""
        return self.out(self.attend(x, k, v))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention before the output projection, heads merged: [N, S, d]."""
        return _merge(attention(_heads(self.q(x), self.heads), k, v))


class EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal=False)
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.self_attn = SelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.cross_attn = CrossAttention(d, heads)
        self.ln3 = nn.LayerNorm(d)
        self.mlp = MLP(d, ratio)

    def forward(self, x: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor
                ) -> torch.Tensor:
        """x [N*K, T, d] -> [N*K, T, d]; mem_k/mem_v [N, h, P, dh]."""
        NK, T, d = x.shape
        N = mem_k.shape[0]
        x = x + self.self_attn(self.ln1(x), causal=True)
        y = self.cross_attn(self.ln2(x).view(N, (NK // N) * T, d), mem_k, mem_v)
        x = x + y.view(NK, T, d)
        return x + self.mlp(self.ln3(x))

    def step(self, x: torch.Tensor, xn: torch.Tensor, mem_k: torch.Tensor,
             mem_v: torch.Tensor, kv_cache: torch.Tensor, t: int, next_ln: nn.LayerNorm,
             out_dtype: torch.dtype | None, t_device: torch.Tensor | None = None,
             casts: tuple | None = None, next_dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One position. ``x`` [B, 1, d] is the residual stream and ``xn = ln1(x)``; returns
        the block's output and ``next_ln`` of it (the next block's ln1, or the final norm).
        Each output projection, the residual add and the LayerNorm after them run as one
        kernel on CUDA (:func:`linear_add_layer_norm`); ``casts`` are this block's projection
        weights already in the compute dtype (``(weight, bias)`` of the two attention outputs,
        fc2 and fc1) or None (then fc1 and its ReLU are two kernels). ``next_dtype`` is the
        dtype of ``next_ln``'s output when it differs from ``out_dtype`` (the final norm feeds
        the float32 head)."""
        NK, _, d = x.shape
        N = mem_k.shape[0]
        c = casts or (None, None, None, None)
        y = self.self_attn.step(xn, kv_cache, t, t_device, project=False)
        x, xn = linear_add_layer_norm(y, self.self_attn.out, x, self.ln2, out_dtype, c[0])
        y = self.cross_attn.attend(xn.view(N, NK // N, d), mem_k, mem_v)
        x, xn = linear_add_layer_norm(y.view(NK, 1, d), self.cross_attn.out, x, self.ln3,
                                      out_dtype, c[1])
        if c[3] is not None:  # fc1 + bias + ReLU in one cuBLASLt call (its epilogue)
            w1, b1 = c[3]
            hidden = torch._addmm_activation(b1, xn.view(NK, d), w1.t()).view(NK, 1, -1)
        else:
            hidden = F.relu(self.mlp.fc1(xn), inplace=True)  # no gradient here
        return linear_add_layer_norm(hidden, self.mlp.fc2, x, next_ln,
                                     next_dtype or out_dtype, c[2])


class ARTransformerEncoder(nn.Module):
    """q_θ(z|x): images [N, C, H, W] -> categorical distributions over z in {0..V-1}^L.

    Args:
        image_shape: ``(C, H, W)``.
        latent_len: L, tokens per image.
        vocab_size: V.
        d_model, num_heads, enc_layers, dec_layers, mlp_ratio: transformer sizes.
        num_patches: P patches per image (a near-square grid; the reference uses P = L).
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_len: int, vocab_size: int,
                 d_model: int = 64, num_heads: int = 4, enc_layers: int = 1,
                 dec_layers: int = 1, mlp_ratio: int = 4, num_patches: int | None = None):
        super().__init__()
        C, H, W = image_shape
        self.latent_len = latent_len
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.num_heads = num_heads
        self.patcher = Patcher(H, W, C, num_patches or latent_len)
        P = self.patcher.num_patches
        self.patch_proj = nn.Linear(self.patcher.patch_dim, d_model)
        self.enc_blocks = nn.ModuleList(
            [EncoderBlock(d_model, num_heads, mlp_ratio) for _ in range(enc_layers)])
        self.enc_ln = nn.LayerNorm(d_model)
        # V + 1 rows: row V is the start token, so that token 0 keeps its own meaning.
        self.tok_embed = nn.Embedding(vocab_size + 1, d_model)
        self.dec_blocks = nn.ModuleList(
            [DecoderBlock(d_model, num_heads, mlp_ratio) for _ in range(dec_layers)])
        self.dec_ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("patch_pos", sinusoidal_positions(P, d_model), persistent=False)
        self.register_buffer("tok_pos", sinusoidal_positions(latent_len, d_model),
                             persistent=False)
        # the head (sampling, log q) in float32 under autocast; build_model sets it from
        # Config.fp32_outputs
        self.fp32_head = True
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's init (see :mod:`dvae.models.init`): Xavier-uniform transformer
        layers with q, k, v as separate (d, d) projections, a lecun-normal patch projection,
        N(0, 1) token embeddings, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, SelfAttention):
                init.xavier_per_projection_(m.qkv.weight, 3)
            elif isinstance(m, CrossAttention):
                init.xavier_per_projection_(m.kv.weight, 2)
        init.lecun_normal_(self.patch_proj)
        nn.init.normal_(self.tok_embed.weight, std=1.0)

    # -- the bidirectional part ----------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] -> patch encodings (the memory) [N, P, d]."""
        h = self.patch_proj(self.patcher.patchify(x)) + self.patch_pos
        for block in self.enc_blocks:
            h = block(h)
        return self.enc_ln(h)

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [block.cross_attn.memory_kv(memory) for block in self.dec_blocks]

    # -- the causal part -----------------------------------------------------------------------

    def teacher_forced(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states before the output layer, all positions at once.

        Args:
            memory: ``[N, P, d]`` from :meth:`encode`.
            tokens: ``[N, K, L]`` int64, K sampled sequences per image.

        Returns:
            ``[N, K, L, d]``; ``self.head`` of it are the logits of each z_l given z_<l.
        """
        N, K, L = tokens.shape
        flat = tokens.reshape(N * K, L)
        start = flat.new_full((N * K, 1), self.vocab_size)
        inp = torch.cat([start, flat[:, :-1]], dim=1)
        h = self.tok_embed(inp) + self.tok_pos[:L]
        for block, (mk, mv) in zip(self.dec_blocks, self.memory_kv(memory)):
            h = block(h, mk, mv)
        return self.dec_ln(h).view(N, K, L, self.d_model)

    @torch.no_grad()
    def sample(self, memory: torch.Tensor, num_samples: int, *,
               generator: torch.Generator | None = None, temperature: float = 1.0,
               sampler=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw K sequences per image autoregressively with a KV cache (no gradient).

        Args:
            memory: ``[N, P, d]``.
            num_samples: K.
            generator: the random stream (a checkpoint saves it, so a resumed run draws the
                same tokens).
            sampler: ``f(hidden [B, d], generator) -> (tokens [B], logp [B])``; the default
                applies ``self.head`` and samples from its softmax at ``temperature``.

        Returns:
            ``tokens [N, K, L]`` int64 and ``logp [N, K, L]`` float32, the log-probability of
            each drawn token under q (temperature 1), which equals the teacher-forced value.
        """
        N = memory.shape[0]
        K, L, V = num_samples, self.latent_len, self.vocab_size
        B = N * K
        h_, dh = self.num_heads, self.d_model // self.num_heads
        dtype = memory.dtype if not torch.is_autocast_enabled(memory.device.type) else (
            torch.get_autocast_dtype(memory.device.type))
        mem_kv = self.memory_kv(memory)
        # One [2, B, h, L, dh] cache per layer (k and v); slot t is written before it is read,
        # and no slot beyond t is ever read, so the cache needs no initialisation.
        caches = [memory.new_empty(2, B, h_, L, dh, dtype=dtype) for _ in self.dec_blocks]
        prev = torch.full((B,), V, dtype=torch.long, device=memory.device)
        if sampler is None:
            sampler = self._default_sampler(temperature)
        drawn, logps = [], []
        blocks = list(self.dec_blocks)
        norms = [b.ln1 for b in blocks[1:]] + [self.dec_ln]
        out_dtype = compute_dtype(memory)  # LayerNorm outputs in the matmuls' dtype
        # the positions on the device, made once: decode attention reads its t from here
        positions = torch.arange(L, dtype=torch.int32, device=memory.device)
        casts = [self._projection_casts(b, out_dtype, memory) for b in blocks]
        for t in range(L):
            ln = blocks[0].ln1 if blocks else self.dec_ln
            x, xn = dvae_kernels.embed_add_layer_norm(prev, self.tok_embed.weight,
                                                      self.tok_pos[t], ln.weight, ln.bias,
                                                      ln.eps, out_dtype=out_dtype)
            x, xn = x[:, None, :], xn[:, None, :]
            for i, (block, (mk, mv), kv, norm, cast) in enumerate(
                    zip(blocks, mem_kv, caches, norms, casts)):
                # the final norm's output feeds the head, which runs in float32 (log q as the
                # teacher-forced pass computes it, whose final LayerNorm is float32 too)
                last = torch.float32 if i == len(blocks) - 1 and self.fp32_head else None
                x, xn = block.step(x, xn, mk, mv, kv, t, norm, out_dtype, positions[t], cast,
                                   next_dtype=last)
            prev, lp = sampler(xn[:, 0], generator)
            drawn.append(prev)
            logps.append(lp)
        # one stack at the end, not two copies per position
        tokens = torch.stack(drawn, dim=1)
        logp = _float(torch.stack(logps, dim=1))
        return tokens.view(N, K, L), logp.view(N, K, L)

    @staticmethod
    def _projection_casts(block: DecoderBlock, dtype: torch.dtype | None,
                          like: torch.Tensor) -> tuple | None:
        """The block's four projections of the fused path (three into
        :func:`linear_add_layer_norm`, fc1 into its ReLU epilogue), cast to the
        compute dtype once per sampling call (None when nothing needs casting or the fused
        kernel is not used)."""
        if dtype is None or (_dispatch.OPS["linear_add_layer_norm"].first_available(like.device)
                             != "triton"):
            return None
        lins = (block.self_attn.out, block.cross_attn.out, block.mlp.fc2, block.mlp.fc1)
        return tuple((lin.weight.detach().to(dtype),
                      lin.bias.detach().to(dtype) if lin.bias is not None else None)
                     for lin in lins)

    def _default_sampler(self, temperature: float):
        return gumbel_max_sampler(self.head, self.fp32_head, temperature)

    # -- the differentiable loop of the relaxed baselines (Gumbel, GR-MCK) ---------------------

    def relaxed_sample(self, memory: torch.Tensor, relax) -> tuple[torch.Tensor, ...]:
        """One relaxed sequence per image, differentiable through every position: the input
        at position t is the relaxed one-hot of t-1 times the token table (the reference's
        autoregressive Gumbel-softmax), so gradients flow back along the whole chain.

        Args:
            memory: ``[N, P, d]`` from :meth:`encode`.
            relax: ``f(logits [N, V] float32) -> (onehot [N, V], index [N])``: the
                straight-through sample of one position.

        Returns:
            ``logits [N, L, V]`` float32 (q along the sampled prefix), ``onehots [N, L, V]``
            (differentiable) and ``tokens [N, L]``. With hard one-hots in the forward value
            (straight-through) the logits equal :meth:`teacher_forced`'s for those tokens.
        """
        N = memory.shape[0]
        L, V = self.latent_len, self.vocab_size
        mem_kv = self.memory_kv(memory)
        caches: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.dec_blocks]
        x_in = self.tok_embed.weight[V].expand(N, 1, self.d_model)
        table = self.tok_embed.weight[:V]
        all_logits, onehots, tokens = [], [], []
        for t in range(L):
            x = x_in + self.tok_pos[t]
            for block, (mk, mv), cache in zip(self.dec_blocks, mem_kv, caches):
                x = self._relaxed_block(block, x, mk, mv, cache)
            h = self.dec_ln(x)[:, 0]
            with torch.autocast(h.device.type, enabled=False):
                logits = (self.head(at_least_fp32(h)) if self.fp32_head
                          else at_least_fp32(self.head(h)))
            onehot, tok = relax(logits)
            all_logits.append(logits)
            onehots.append(onehot)
            tokens.append(tok)
            x_in = (onehot.to(table.dtype) @ table)[:, None]
        return torch.stack(all_logits, 1), torch.stack(onehots, 1), torch.stack(tokens, 1)

    def _relaxed_block(self, block: DecoderBlock, x: torch.Tensor, mem_k: torch.Tensor,
                       mem_v: torch.Tensor, cache: list) -> torch.Tensor:
        """:meth:`DecoderBlock.forward` for the newest position alone (x [N, 1, d]),
        keeping the keys and values of the earlier ones in ``cache`` with their gradients."""
        h = block.self_attn.heads
        q, k, v = block.self_attn.qkv(block.ln1(x)).chunk(3, dim=-1)
        cache.append((_heads(k, h), _heads(v, h)))
        keys = torch.cat([c[0] for c in cache], dim=2)
        values = torch.cat([c[1] for c in cache], dim=2)
        y = attention(_heads(q, h), keys, values)
        x = x + block.self_attn.out(_merge(y))
        x = x + block.cross_attn(block.ln2(x), mem_k, mem_v)
        return x + block.mlp(block.ln3(x))


def _float(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for a float64 model."""
    return t if t.dtype == torch.float64 else t.float()


def gumbel_max_sampler(head: nn.Linear, fp32_head: bool, temperature: float = 1.0):
    """``f(hidden [B, d], generator) -> (tokens [B], log q [B])``: ``head`` then one exact
    categorical draw per row by Gumbel-max, log q at temperature 1 (float32)."""
    def sample(hidden: torch.Tensor, generator: torch.Generator | None):
        if fp32_head:  # log q in float32 (a float64 model's in float64)
            with torch.autocast(hidden.device.type, enabled=False):
                logits = head(_float(hidden))
        else:
            logits = _float(head(hidden))
        logq = torch.log_softmax(logits, dim=-1)
        scaled = logq if temperature == 1.0 else torch.log_softmax(logits / temperature, -1)
        # Gumbel-max: argmax(log p + G) ~ Categorical(p), one uniform draw per entry.
        u = torch.rand(scaled.shape, device=scaled.device, generator=generator)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        tok = torch.argmax(scaled + gumbel, dim=-1)
        return tok, logq.gather(-1, tok[:, None])[:, 0]
    return sample
