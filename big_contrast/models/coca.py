"""CoCa (Yu et al. 2022): an image tower, two attentional poolers over its tokens, and a text
decoder split into a unimodal half (its CLS output is the contrastive text embedding) and a
multimodal half that cross-attends to the pooled image tokens and predicts the next token.

The CLS token sits at a fixed slot after the last position (as open_clip places it), and
attends to every non-padding token and itself: the padding is masked, unlike open_clip's
legacy mask, which is shifted by one. Position embeddings are sized from ``max_len``, so the
decoder can run one token at a time with a cache (``init_decoding`` / ``decode_step``).

Each half of the decoder is a stack of equal blocks: with ``scan`` each half runs as one
nn.scan (parameters stacked on a leading 'layers' axis), and its decoding caches hold every
layer on the axis after the batch: [B, layers, ...].
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_contrast.models import heads, precision, stacks, transformer
from big_contrast.models.two_tower import l2_normalise


def _kernel(names, in_axis=0, out_axis=-1):
    return transformer.dense_init(names, in_axis=in_axis, out_axis=out_axis)


class KeyValueProjection(nn.Module):
    """Context tokens [B, S, C] -> (keys, values), each [B, S, heads, head_dim]: what a
    cross-attention reads, computed once per image when decoding."""

    heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, context):
        width = context.shape[-1]
        kernel = self.param("kv_kernel", _kernel(("embed", "heads", None, "kv"), 0, (1, 2, 3)),
                            (width, self.heads, 2, self.head_dim), self.param_dtype)
        bias = self.param("kv_bias", transformer.zeros_init(("heads", None, "kv")),
                          (self.heads, 2, self.head_dim), self.param_dtype)
        context, kernel, bias = (a.astype(self.dtype) for a in (context, kernel, bias))
        kv = context @ kernel.reshape(width, -1) + bias.reshape(-1)
        kv = kv.reshape(*context.shape[:2], self.heads, 2, self.head_dim)
        return kv[..., 0, :], kv[..., 1, :]


class CrossAttention(nn.Module):
    """Queries from x [B, T, W] attend to precomputed (keys, values) of a context."""

    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, keys_values):
        keys, values = keys_values
        batch, length, width = x.shape
        head_dim = keys.shape[-1]
        q_kernel = self.param("q_kernel", _kernel(("embed", "heads", "kv"), 0, (1, 2)),
                              (width, self.heads, head_dim), self.param_dtype)
        q_bias = self.param("q_bias", transformer.zeros_init(("heads", "kv")), (self.heads, head_dim),
                            self.param_dtype)
        x, q_kernel, q_bias = (a.astype(self.dtype) for a in (x, q_kernel, q_bias))
        q = (x @ q_kernel.reshape(width, -1) + q_bias.reshape(-1)).reshape(
            batch, length, self.heads, head_dim)
        # (softmax in float32 whatever the dtype: jax.nn.dot_product_attention's XLA form)
        y = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype))
        out_kernel = self.param("out_kernel", _kernel(("heads", "kv", "embed"), (0, 1), 2),
                                (self.heads, head_dim, width), self.param_dtype)
        out_bias = self.param("out_bias", transformer.zeros_init(("embed",)), (width,),
                              self.param_dtype)
        out_kernel, out_bias = out_kernel.astype(self.dtype), out_bias.astype(self.dtype)
        return y.reshape(batch, length, -1) @ out_kernel.reshape(-1, width) + out_bias


class AttentionalPooler(nn.Module):
    """``num_queries`` learned queries attend to LayerNorm(tokens); output LayerNorm-ed,
    [B, num_queries, width]."""

    num_queries: int
    width: int
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        dtypes = precision.of(self)
        queries = self.param("queries", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (self.num_queries, self.width),
            self.param_dtype)
        context = transformer.layer_norm("ln_context", **dtypes)(tokens)
        keys_values = KeyValueProjection(self.heads, self.width // self.heads, name="kv",
                                         **dtypes)(context)
        q = jnp.broadcast_to(queries.astype(context.dtype), (tokens.shape[0], *queries.shape))
        pooled = CrossAttention(self.heads, name="attn", **dtypes)(q, keys_values)
        return transformer.layer_norm("ln_out", **dtypes)(pooled)


class DecoderBlock(nn.Module):
    """Pre-LN causal self-attention (+ cross-attention to the image when ``cross``) + MLP.

    ``__call__`` runs a whole sequence; with ``cache`` it runs one token at ``position`` and
    returns (x, new cache). ``image_keys_values`` projects the pooled image tokens, once per
    image when decoding.
    """

    width: int
    heads: int
    mlp_dim: int
    cross: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        dtypes = precision.of(self)
        self.ln_attn = transformer.layer_norm(**dtypes)
        self.attn = transformer.Attention(self.heads, causal=True, **dtypes)
        if self.cross:
            self.ln_image = transformer.layer_norm(**dtypes)
            self.image_kv = KeyValueProjection(self.heads, self.width // self.heads, **dtypes)
            self.ln_cross = transformer.layer_norm(**dtypes)
            self.cross_attn = CrossAttention(self.heads, **dtypes)
        self.ln_mlp = transformer.layer_norm(**dtypes)
        self.mlp = transformer.MlpBlock(self.mlp_dim, **dtypes)

    def image_keys_values(self, image_tokens):
        return self.image_kv(self.ln_image(image_tokens))

    def __call__(self, x, pad_mask=None, image_kv=None, cache=None, position=None):
        if cache is None:
            x = x + self.attn(self.ln_attn(x), pad_mask)
        else:
            y, cache = self.attn(self.ln_attn(x), cache=cache, position=position)
            x = x + y
        if self.cross:
            x = x + self.cross_attn(self.ln_cross(x), image_kv)
        x = x + self.mlp(self.ln_mlp(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x if cache is None else (x, cache)


# What one decoder block does in each pass over a half, as body(block, carry, *args) ->
# (carry, per-block output): the form nn.scan takes, also looped over unscanned blocks.


def _unimodal_body(block, x, pad_mask):
    return block(x, pad_mask=pad_mask), None


def _multimodal_body(block, x, context):
    return block(x, image_kv=block.image_keys_values(context)), None


def _image_kv_body(block, carry, context):
    return carry, block.image_keys_values(context)


def _decode_body(block, x, layer_cache, image_kv, position):
    return block(x, image_kv=image_kv, cache=layer_cache, position=position)


class CoCa(nn.Module):
    """Image tower + poolers + split text decoder.

    Attributes:
      image_tower: returns (pooled, tokens [B, N, C]); only the tokens are used.
      vocab_size, max_len: the tokenizer's; positions are max_len + 1 (the CLS slot).
      text_variant: decoder size (transformer.SIZES); its depth is per half.
      decoder_queries: image tokens the multimodal half attends to (paper: 256).
      pooler_heads: attention heads of both poolers (None: the decoder's).
      embed_dim: contrastive embedding size; init_scale: initial logit scale (1 / temperature).
      remat, remat_policy: rematerialise each decoder block (stacks.remat_layer).
      scan: run each decoder half as one nn.scan ('unimodal', 'multimodal': parameters stacked
        on a leading 'layers' axis) instead of blocks 'unimodal_0', ..., 'multimodal_0', ....
      dtype, param_dtype: compute and parameter dtypes (models/precision.py).
    ``__call__`` returns {'image', 'text' (L2-normalised), 'scale', 'logits' [B, T, V]}, all
    float32; logits[:, t] predict token t + 1.
    """

    image_tower: nn.Module
    vocab_size: int
    max_len: int
    text_variant: str = "B"
    unimodal_depth: int | None = None
    multimodal_depth: int | None = None
    decoder_queries: int = 256
    pooler_heads: int | None = None
    embed_dim: int = 512
    init_scale: float = 1 / 0.07
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        size, _ = transformer.parse_variant(self.text_variant)
        width = size.width
        dtypes = precision.of(self)
        uni = size.depth if self.unimodal_depth is None else self.unimodal_depth
        multi = size.depth if self.multimodal_depth is None else self.multimodal_depth
        self.depths = {"unimodal": uni, "multimodal": multi}
        pooler_heads = self.pooler_heads or size.heads
        self.contrastive_pooler = AttentionalPooler(1, width, pooler_heads, **dtypes)
        self.decoder_pooler = AttentionalPooler(self.decoder_queries, width, pooler_heads, **dtypes)
        self.image_proj = heads.Projection(self.embed_dim, "linear", **dtypes)
        self.text_proj = heads.Projection(self.embed_dim, "linear", **dtypes)
        self.token_embed = nn.Embed(self.vocab_size, width, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), **dtypes)
        self.posemb = self.param("posemb", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, "embed")), (self.max_len + 1, width),
            self.param_dtype)
        self.cls = self.param("cls", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (width,), self.param_dtype)
        block_cls = stacks.remat_layer(DecoderBlock, self.remat, self.remat_policy,
                                       scanned=self.scan)
        block = functools.partial(block_cls, width, size.heads, size.mlp_dim, **dtypes)
        self.unimodal = (block(cross=False) if self._scanned("unimodal")
                         else [block(cross=False) for _ in range(uni)])
        self.multimodal = (block(cross=True) if self._scanned("multimodal")
                           else [block(cross=True) for _ in range(multi)])
        self.ln_cls = transformer.layer_norm(**dtypes)
        self.ln_final = transformer.layer_norm(**dtypes)
        self.vocab_head = nn.Dense(self.vocab_size, kernel_init=transformer.dense_init(("embed", "vocab")),
                                   bias_init=transformer.zeros_init(("vocab",)), **dtypes)
        init = math.log(self.init_scale)
        self.log_scale = self.param("log_scale", nn.with_logical_partitioning(
            lambda _, dtype: jnp.asarray(init, dtype), ()), self.param_dtype)

    # ------------------------------------------------------------------ image side

    def image_features(self, images, train: bool = False):
        """(contrastive image embedding [B, D], decoder context tokens [B, Q, W])."""
        _, tokens = self.image_tower(images, train=train)
        pooled = self.contrastive_pooler(tokens)[:, 0]
        return l2_normalise(self.image_proj(pooled)), self.decoder_pooler(tokens)

    def image_context(self, images):
        """Only the decoder's context tokens [B, Q, W] (decoding and caption scoring)."""
        return self.decoder_pooler(self.image_tower(images, train=False)[1])

    def encode_image(self, images, train: bool = False):
        return self.image_features(images, train)[0]

    # ------------------------------------------------------------------ text side

    def _scanned(self, half: str) -> bool:
        """Whether a decoder half runs as a scan (a half of no blocks never does)."""
        return self.scan and self.depths[half] > 0

    def _run_half(self, half: str, body, x, *args):
        """x through one decoder half: ``body(block, x, *args) -> (x, None)`` per block, as a
        scan or block by block."""
        if not self._scanned(half):
            for block in getattr(self, half):
                x, _ = body(block, x, *args)
            return x
        scanned = stacks.scan_layers(body, self.depths[half], in_axes=(nn.broadcast,) * len(args))
        return scanned(getattr(self, half), x, *args)[0]

    def unimodal_text(self, tokens):
        """(contrastive text embedding [B, D], unimodal token states [B, T, W])."""
        batch, length = tokens.shape
        x = self.token_embed(tokens)
        cls = jnp.broadcast_to(self.cls.astype(x.dtype), (batch, 1, x.shape[-1]))
        x = jnp.concatenate([x, cls], axis=1) + self.posemb[None, : length + 1].astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        # Keys: the real tokens and the CLS itself. Causality does the rest: a real token never
        # sees the padding after it; the CLS, last, sees every real token.
        keys = jnp.concatenate([tokens != 0, jnp.ones((batch, 1), bool)], axis=1)
        x = self._run_half("unimodal", _unimodal_body, x, keys)
        text = l2_normalise(self.text_proj(self.ln_cls(x[:, -1])))
        return text, x[:, :-1]

    def encode_text(self, tokens, train: bool = False):
        del train
        return self.unimodal_text(tokens)[0]

    def multimodal_logits(self, states, context):
        """Unimodal states [B, T, W] + image context [B, Q, W] -> next-token logits [B, T, V]."""
        x = self._run_half("multimodal", _multimodal_body, states, context)
        return self.vocab_head(self.ln_final(x)).astype(jnp.float32)

    def __call__(self, images, tokens, train: bool = False):
        image, context = self.image_features(images, train)
        text, states = self.unimodal_text(tokens)
        return {"image": image, "text": text, "scale": jnp.exp(self.log_scale.astype(jnp.float32)),
                "logits": self.multimodal_logits(states, context)}

    # ------------------------------------------------------------------ decoding

    def init_decoding(self, images):
        """The decoding cache for a batch of images: cross-attention keys/values of the image
        context (computed once here) and empty self-attention caches of max_len positions.
        Unscanned: a list per half, one entry per block; scanned: [B, layers, ...] arrays."""
        context = self.image_context(images)
        batch = images.shape[0]
        size, _ = transformer.parse_variant(self.text_variant)
        head_dim = size.width // size.heads

        def empty(*layers):
            shape = (batch, *layers, self.max_len, size.heads, head_dim)
            return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

        cache = {half: empty(self.depths[half]) if self._scanned(half)
                 else [empty() for _ in getattr(self, half)]
                 for half in ("unimodal", "multimodal")}
        if not self._scanned("multimodal"):
            return {**cache, "image": [b.image_keys_values(context) for b in self.multimodal]}
        image_kv = stacks.scan_layers(_image_kv_body, self.depths["multimodal"],
                                      in_axes=(nn.broadcast,), out_axes=1)
        return {**cache, "image": image_kv(self.multimodal, None, context)[1]}

    def _decode_half(self, half: str, x, caches, image_kvs, position):
        """One token through a decoder half with its caches: (x, new caches)."""
        if not self._scanned(half):
            new = []
            for block, layer_cache, image_kv in zip(getattr(self, half), caches, image_kvs):
                x, layer_cache = _decode_body(block, x, layer_cache, image_kv, position)
                new.append(layer_cache)
            return x, new
        scanned = stacks.scan_layers(_decode_body, self.depths[half],
                                     in_axes=(1, 1, nn.broadcast), out_axes=1)
        return scanned(getattr(self, half), x, caches, image_kvs, position)

    def decode_step(self, cache, token, position):
        """One token per sequence [N] at ``position`` -> (next-token log-probs [N, V], cache)."""
        x = self.token_embed(token[:, None])
        x = x + jax.lax.dynamic_slice_in_dim(self.posemb, position, 1)[None].astype(x.dtype)
        no_image = None if self._scanned("unimodal") else [None] * len(cache["unimodal"])
        x, unimodal = self._decode_half("unimodal", x, cache["unimodal"], no_image, position)
        x, multimodal = self._decode_half("multimodal", x, cache["multimodal"], cache["image"],
                                          position)
        logits = self.vocab_head(self.ln_final(x[:, 0])).astype(jnp.float32)
        new = {"unimodal": unimodal, "multimodal": multimodal, "image": cache["image"]}
        return jax.nn.log_softmax(logits), new

    def score_captions(self, images, tokens):
        """Log-likelihood [B, K] of each of K captions [K, T] given each image: the unimodal
        half runs once per caption, the multimodal half once per (image, caption) pair."""
        context = self.image_context(images)
        _, states = self.unimodal_text(tokens)
        num_images, num_texts = context.shape[0], tokens.shape[0]
        states = jnp.broadcast_to(states[None], (num_images, *states.shape)).reshape(
            num_images * num_texts, *states.shape[1:])
        context = jnp.repeat(context, num_texts, axis=0)
        logits = self.multimodal_logits(states, context)[:, :-1]
        targets = jnp.tile(tokens[:, 1:], (num_images, 1))
        log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(log_probs * (targets != 0), axis=-1).reshape(num_images, num_texts)
