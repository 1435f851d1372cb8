"""Transformer building blocks shared by the image (ViT) and text towers.

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``) so a
rules table in the config maps them onto the mesh; activations are constrained to
``(batch, length, embed)`` at block boundaries.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_contrast.models import precision, stacks


@dataclasses.dataclass(frozen=True)
class TransformerSize:
    width: int
    depth: int
    mlp_dim: int
    heads: int


# Standard sizes by name (ViT paper plus big_vision's So400m / g / G), and tiny CPU sizes.
SIZES = {
    # Depth 0: token + position embeddings and a LayerNorm; with 'mean' pooling a text tower
    # of this size is a positioned bag of words, the fastest-learning text tower on a CPU.
    "bow": TransformerSize(128, 0, 512, 4),
    "mu": TransformerSize(32, 1, 128, 2),
    "pico": TransformerSize(64, 2, 256, 2),
    "nano": TransformerSize(128, 4, 512, 4),
    "micro": TransformerSize(192, 4, 768, 6),
    "Ti": TransformerSize(192, 12, 768, 3),
    "S": TransformerSize(384, 12, 1536, 6),
    "M": TransformerSize(512, 12, 2048, 8),
    "B": TransformerSize(768, 12, 3072, 12),
    "L": TransformerSize(1024, 24, 4096, 16),
    "So400m": TransformerSize(1152, 27, 4304, 16),
    "H": TransformerSize(1280, 32, 5120, 16),
    "g": TransformerSize(1408, 40, 6144, 16),
    "G": TransformerSize(1664, 48, 8192, 16),
}


def parse_variant(variant: str) -> tuple[TransformerSize, int | None]:
    """'B/32' -> (size B, patch 32); 'nano' -> (size nano, None)."""
    match = re.fullmatch(r"([A-Za-z0-9]+)(?:/(\d+))?", variant)
    if not match or match.group(1) not in SIZES:
        raise ValueError(f"unknown transformer variant {variant!r}; sizes are {list(SIZES)}, "
                         "optionally followed by /<patch>, e.g. 'B/32'")
    patch = int(match.group(2)) if match.group(2) else None
    return SIZES[match.group(1)], patch


def dense_init(names: tuple[str | None, ...], in_axis=-2, out_axis=-1, batch_axis=()):
    """Xavier-uniform (fans from the given axes) wrapped with logical axis names."""
    init = nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis)
    return nn.with_logical_partitioning(init, names)


def zeros_init(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_fn(x, scale, bias, epsilon: float, dtype):
    """LayerNorm over the last axis (statistics in float32 whatever x's dtype, the result in
    ``dtype``), with a hand-written backward pass.

    Autodiff of the plain formula keeps several full-size intermediates per call for the
    backward pass (on XLA:CPU even a materialised broadcast of ``scale``); this keeps the
    normalised input and one reciprocal standard deviation per row, and the backward pass is
    the closed form dx = rstd * (g' - mean(g') - xhat * mean(g' * xhat)), g' = g * scale.
    """
    return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centred = xf - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
    xhat = centred * rstd
    y = (xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32))
    # (a zero-size array carries x's dtype for dx)
    return y.astype(dtype), (xhat, rstd, scale, bias, x[..., :0])


def _layer_norm_bwd(epsilon, dtype, residuals, g):
    del epsilon, dtype
    xhat, rstd, scale, bias, x_like = residuals
    g = g.astype(jnp.float32)
    rows = tuple(range(g.ndim - 1))
    dscale = jnp.sum(g * xhat, axis=rows).astype(scale.dtype)
    dbias = jnp.sum(g, axis=rows).astype(bias.dtype)
    gx = g * scale.astype(jnp.float32)
    dx = rstd * (gx - jnp.mean(gx, axis=-1, keepdims=True)
                 - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True))
    return dx.astype(x_like.dtype), dscale, dbias


layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """nn.LayerNorm's parameters ('scale', 'bias', logically 'embed') and result, computed by
    layer_norm_fn (about 3% less CPU time per train step of the CPU-size ViT/text CLIP of
    benchmarks/compare_open_clip.py than nn.LayerNorm)."""

    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(
            nn.initializers.ones_init(), ("embed",)), (width,), self.param_dtype)
        bias = self.param("bias", zeros_init(("embed",)), (width,), self.param_dtype)
        return layer_norm_fn(x, scale, bias, self.epsilon, self.dtype)


def layer_norm(name: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32) -> LayerNorm:
    return LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu_tanh(x):
    """tanh-approximate GELU (= nn.gelu(x, approximate=True)) whose backward pass keeps only
    x and recomputes tanh, instead of autodiff's several saved full-size intermediates."""
    return 0.5 * x * (1.0 + jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, g):
    x2 = x * x
    t = jnp.tanh(_GELU_C * x * (1.0 + 0.044715 * x2))
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x2)
    return (g * slope,)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def attend(q, k, v, mask=None, causal: bool = False):
    """Softmax attention on heads-leading [B, heads, T, head_dim] q, k, v -> same layout.

    The computation of jax.nn.dot_product_attention's XLA implementation (float32 logits
    and softmax, scale 1/sqrt(head_dim)), with batch and heads in front, where XLA:CPU's
    batched matmuls take them without transposing. ``mask``: boolean, broadcastable to
    [B, heads, T_q, T_kv], True where a query may attend.
    """
    if causal:
        keep = jnp.tril(jnp.ones((q.shape[2], k.shape[2]), bool))
        mask = keep if mask is None else jnp.logical_and(mask, keep)
    if mask is None:
        mask = jnp.ones((1, 1, 1, 1), bool)
    return _attend(q, k, v, mask)


def _attention_probs(q, k, mask):
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k,
                        preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    logits = jnp.where(mask, logits * (1.0 / math.sqrt(q.shape[-1])),
                       -0.7 * jnp.finfo(logits.dtype).max)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _swap_last_axes(x):
    """x with its last two axes swapped in memory: the barrier keeps XLA from folding the
    transpose back into the matmul, whose transposed-operand form XLA:CPU runs on a
    slower path (about 20% less time for attention's backward pass at the CPU-size ViT)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@jax.custom_vjp
def _attend(q, k, v, mask):
    return _attend_fwd(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask):
    probs = _attention_probs(q, k, mask).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v), (q, k, v, mask, probs)


def _attend_bwd(residuals, g):
    """The softmax-attention gradients, every batched matmul contracting its left operand's
    last axis."""
    q, k, v, mask, probs = residuals
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    dprobs = jnp.einsum("bhqd,bhkd->bhqk", g, v, preferred_element_type=f32)
    dv = jnp.einsum("bhkq,bhqd->bhkd", _swap_last_axes(probs), g.astype(v.dtype))
    p = probs.astype(f32)
    dlogits = p * (dprobs - jnp.sum(dprobs * p, axis=-1, keepdims=True))
    dlogits = jnp.where(mask, dlogits * (1.0 / math.sqrt(q.shape[-1])), 0.0).astype(q.dtype)
    dq = jnp.einsum("bhqk,bhkd->bhqd", dlogits, k).astype(q.dtype)
    dk = jnp.einsum("bhkq,bhqd->bhkd", _swap_last_axes(dlogits), q).astype(k.dtype)
    return dq, dk, dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


class Attention(nn.Module):
    """Multi-head self-attention with logically named q/k/v/out projections."""

    heads: int
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, pad_mask=None, cache=None, position=None):
        """x [B, T, W] -> [B, T, W]. With ``cache`` ({'k', 'v'}: [B, L, heads, head_dim]) x is
        one token per sequence at ``position``: its keys and values are written into the cache
        there, it attends to positions <= ``position``, and (output, new cache) is returned."""
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"width {width} is not divisible by {self.heads} heads")
        head_dim = width // self.heads
        # Kernels are stored in their logical shapes (so axis names apply per dimension) and
        # flattened to 2-D for the matmuls, which XLA:CPU runs about 2x faster than the
        # equivalent multi-axis einsums. Heads lead the fused q/k/v axis so a 'model'-sharded
        # heads axis stays contiguous.
        qkv_kernel = self.param(
            "qkv_kernel", dense_init(("embed", "heads", None, "kv"), in_axis=0, out_axis=(1, 2, 3)),
            (width, self.heads, 3, head_dim), self.param_dtype)
        qkv_bias = self.param("qkv_bias", zeros_init(("heads", None, "kv")), (self.heads, 3, head_dim),
                              self.param_dtype)
        out_kernel = self.param(
            "out_kernel", dense_init(("heads", "kv", "embed"), in_axis=(0, 1), out_axis=2),
            (self.heads, head_dim, width), self.param_dtype)
        out_bias = self.param("out_bias", zeros_init(("embed",)), (width,), self.param_dtype)
        x, qkv_kernel, qkv_bias, out_kernel, out_bias = (
            a.astype(self.dtype) for a in (x, qkv_kernel, qkv_bias, out_kernel, out_bias))
        batch, length = x.shape[:2]
        # Tokens flattened to rows: XLA:CPU's weight gradients of a 2-D matmul avoid the
        # transposes it inserts for a 3-D one.
        qkv = x.reshape(-1, width) @ qkv_kernel.reshape(width, -1) + qkv_bias.reshape(-1)
        qkv = qkv.reshape(batch, length, self.heads, 3, head_dim)
        if cache is None:
            # One transpose to [3, B, heads, T, head_dim]: q, k and v come out contiguous and
            # heads-leading for the batched matmuls, instead of three strided slices and
            # transposes inside dot_product_attention (and their mirror images in the
            # backward pass): about 15% less CPU time per train step of the CPU-size CLIP
            # (benchmarks/compare_open_clip.py).
            q, k, v = qkv.transpose(3, 0, 2, 1, 4)
            mask = None if pad_mask is None else pad_mask[:, None, None, :]  # [B, 1, 1, T_kv]
            y = attend(q, k, v, mask, causal=self.causal).transpose(0, 2, 1, 3)
            y = y.reshape(-1, width) @ out_kernel.reshape(-1, width) + out_bias
            return y.reshape(batch, length, width)
        # A decoding step: one token per sequence; the caches stay [B, L, heads, head_dim].
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        start = (0, position, 0, 0)
        k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
        v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
        cache = {"k": k, "v": v}
        mask = (jnp.arange(k.shape[1]) <= position)[None, None, None, :]
        y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        out = y.reshape(batch, length, width) @ out_kernel.reshape(-1, width) + out_bias
        return out, cache


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape, width = x.shape, x.shape[-1]
        # Tokens flattened to rows, as in Attention.
        h = nn.Dense(self.mlp_dim, kernel_init=dense_init(("embed", "mlp")),
                     bias_init=zeros_init(("mlp",)), name="fc1",
                     **precision.of(self))(x.reshape(-1, width))
        h = nn.with_logical_constraint(h.reshape(shape[:-1] + (self.mlp_dim,)),
                                       ("batch", "length", "mlp"))
        # tanh-approximate GELU: about 25% faster than erf GELU on XLA:CPU at equal quality.
        h = gelu_tanh(h).reshape(-1, self.mlp_dim)
        y = nn.Dense(width, kernel_init=dense_init(("mlp", "embed")),
                     bias_init=zeros_init(("embed",)), name="fc2", **precision.of(self))(h)
        return y.reshape(shape)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)); x + mlp(ln(x))."""

    heads: int
    mlp_dim: int
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, pad_mask=None):
        dtypes = precision.of(self)
        attn = Attention(self.heads, self.causal, name="attn", **dtypes)
        x = x + attn(layer_norm("ln_attn", **dtypes)(x), pad_mask)
        x = x + MlpBlock(self.mlp_dim, name="mlp", **dtypes)(layer_norm("ln_mlp", **dtypes)(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Encoder(nn.Module):
    """A stack of pre-LN blocks, named block_00, block_01, ... or, with ``scan`` (and any
    blocks), one nn.scan over them named 'blocks' (parameters stacked on a leading 'layers'
    axis: one layer is traced and compiled for all). ``remat`` trades compute for activation
    memory, keeping what ``remat_policy`` (stacks.REMAT_POLICIES) allows."""

    depth: int
    heads: int
    mlp_dim: int
    causal: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, pad_mask=None):
        block_cls = stacks.remat_layer(EncoderBlock, self.remat, self.remat_policy,
                                       scanned=self.scan)
        block = functools.partial(block_cls, self.heads, self.mlp_dim, self.causal,
                                  **precision.of(self))
        if self.scan and self.depth:
            return stacks.scan_residual(block(name="blocks"), x, self.depth, pad_mask)
        for i in range(self.depth):
            x = block(name=f"block_{i:02d}")(x, pad_mask)
        return x
