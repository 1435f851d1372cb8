"""CoCa (Yu et al. 2022): an image tower, two attentional poolers over its tokens, and a text
decoder split into a unimodal half (its CLS output is the contrastive text embedding) and a
multimodal half that cross-attends to the pooled image tokens and predicts the next token.

The CLS token sits at a fixed slot after the last position (as open_clip places it), and
attends to every non-padding token and itself: the padding is masked, unlike open_clip's
legacy mask, which is shifted by one. Position embeddings are sized from ``max_len``, so the
decoder can run one token at a time with a cache (``init_decoding`` / ``decode_step``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_contrast.models import heads, transformer
from big_contrast.models.two_tower import l2_normalise


def _kernel(names, in_axis=0, out_axis=-1):
    return transformer.dense_init(names, in_axis=in_axis, out_axis=out_axis)


class KeyValueProjection(nn.Module):
    """Context tokens [B, S, C] -> (keys, values), each [B, S, heads, head_dim]: what a
    cross-attention reads, computed once per image when decoding."""

    heads: int
    head_dim: int

    @nn.compact
    def __call__(self, context):
        width = context.shape[-1]
        kernel = self.param("kv_kernel", _kernel(("embed", "heads", None, "kv"), 0, (1, 2, 3)),
                            (width, self.heads, 2, self.head_dim))
        bias = self.param("kv_bias", transformer.zeros_init(("heads", None, "kv")),
                          (self.heads, 2, self.head_dim))
        kv = context @ kernel.reshape(width, -1) + bias.reshape(-1)
        kv = kv.reshape(*context.shape[:2], self.heads, 2, self.head_dim)
        return kv[..., 0, :], kv[..., 1, :]


class CrossAttention(nn.Module):
    """Queries from x [B, T, W] attend to precomputed (keys, values) of a context."""

    heads: int

    @nn.compact
    def __call__(self, x, keys_values):
        keys, values = keys_values
        batch, length, width = x.shape
        head_dim = keys.shape[-1]
        q_kernel = self.param("q_kernel", _kernel(("embed", "heads", "kv"), 0, (1, 2)),
                              (width, self.heads, head_dim))
        q_bias = self.param("q_bias", transformer.zeros_init(("heads", "kv")), (self.heads, head_dim))
        q = (x @ q_kernel.reshape(width, -1) + q_bias.reshape(-1)).reshape(
            batch, length, self.heads, head_dim)
        y = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype))
        out_kernel = self.param("out_kernel", _kernel(("heads", "kv", "embed"), (0, 1), 2),
                                (self.heads, head_dim, width))
        out_bias = self.param("out_bias", transformer.zeros_init(("embed",)), (width,))
        return y.reshape(batch, length, -1) @ out_kernel.reshape(-1, width) + out_bias


class AttentionalPooler(nn.Module):
    """``num_queries`` learned queries attend to LayerNorm(tokens); output LayerNorm-ed,
    [B, num_queries, width]."""

    num_queries: int
    width: int
    heads: int

    @nn.compact
    def __call__(self, tokens):
        queries = self.param("queries", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (self.num_queries, self.width))
        context = transformer.layer_norm("ln_context")(tokens)
        keys_values = KeyValueProjection(self.heads, self.width // self.heads, name="kv")(context)
        q = jnp.broadcast_to(queries.astype(context.dtype), (tokens.shape[0], *queries.shape))
        pooled = CrossAttention(self.heads, name="attn")(q, keys_values)
        return transformer.layer_norm("ln_out")(pooled)


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

    def setup(self):
        self.ln_attn = transformer.layer_norm()
        self.attn = transformer.Attention(self.heads, causal=True)
        if self.cross:
            self.ln_image = transformer.layer_norm()
            self.image_kv = KeyValueProjection(self.heads, self.width // self.heads)
            self.ln_cross = transformer.layer_norm()
            self.cross_attn = CrossAttention(self.heads)
        self.ln_mlp = transformer.layer_norm()
        self.mlp = transformer.MlpBlock(self.mlp_dim)

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


class CoCa(nn.Module):
    """Image tower + poolers + split text decoder.

    Attributes:
      image_tower: returns (pooled, tokens [B, N, C]); only the tokens are used.
      vocab_size, max_len: the tokenizer's; positions are max_len + 1 (the CLS slot).
      text_variant: decoder size (transformer.SIZES); its depth is per half.
      decoder_queries: image tokens the multimodal half attends to (paper: 256).
      pooler_heads: attention heads of both poolers (None: the decoder's).
      embed_dim: contrastive embedding size; init_scale: initial logit scale (1 / temperature).
    ``__call__`` returns {'image', 'text' (L2-normalised), 'scale', 'logits' [B, T, V]};
    logits[:, t] predict token t + 1.
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

    def setup(self):
        size, _ = transformer.parse_variant(self.text_variant)
        width = size.width
        uni = size.depth if self.unimodal_depth is None else self.unimodal_depth
        multi = size.depth if self.multimodal_depth is None else self.multimodal_depth
        pooler_heads = self.pooler_heads or size.heads
        self.contrastive_pooler = AttentionalPooler(1, width, pooler_heads)
        self.decoder_pooler = AttentionalPooler(self.decoder_queries, width, pooler_heads)
        self.image_proj = heads.Projection(self.embed_dim, "linear")
        self.text_proj = heads.Projection(self.embed_dim, "linear")
        self.token_embed = nn.Embed(self.vocab_size, width, embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")))
        self.posemb = self.param("posemb", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, "embed")), (self.max_len + 1, width))
        self.cls = self.param("cls", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (width,))
        self.unimodal = [DecoderBlock(width, size.heads, size.mlp_dim, cross=False)
                         for _ in range(uni)]
        self.multimodal = [DecoderBlock(width, size.heads, size.mlp_dim, cross=True)
                           for _ in range(multi)]
        self.ln_cls = transformer.layer_norm()
        self.ln_final = transformer.layer_norm()
        self.vocab_head = nn.Dense(self.vocab_size, kernel_init=transformer.dense_init(("embed", "vocab")),
                                   bias_init=transformer.zeros_init(("vocab",)))
        init = math.log(self.init_scale)
        self.log_scale = self.param("log_scale", nn.with_logical_partitioning(
            lambda _: jnp.asarray(init, jnp.float32), ()))

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

    def unimodal_text(self, tokens):
        """(contrastive text embedding [B, D], unimodal token states [B, T, W])."""
        batch, length = tokens.shape
        x = self.token_embed(tokens)
        cls = jnp.broadcast_to(self.cls.astype(x.dtype), (batch, 1, x.shape[-1]))
        x = jnp.concatenate([x, cls], axis=1) + self.posemb[None, : length + 1]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        # Keys: the real tokens and the CLS itself. Causality does the rest: a real token never
        # sees the padding after it; the CLS, last, sees every real token.
        keys = jnp.concatenate([tokens != 0, jnp.ones((batch, 1), bool)], axis=1)
        for block in self.unimodal:
            x = block(x, pad_mask=keys)
        text = l2_normalise(self.text_proj(self.ln_cls(x[:, -1])))
        return text, x[:, :-1]

    def encode_text(self, tokens, train: bool = False):
        del train
        return self.unimodal_text(tokens)[0]

    def multimodal_logits(self, states, context):
        """Unimodal states [B, T, W] + image context [B, Q, W] -> next-token logits [B, T, V]."""
        x = states
        for block in self.multimodal:
            x = block(x, image_kv=block.image_keys_values(context))
        return self.vocab_head(self.ln_final(x)).astype(jnp.float32)

    def __call__(self, images, tokens, train: bool = False):
        image, context = self.image_features(images, train)
        text, states = self.unimodal_text(tokens)
        return {"image": image, "text": text, "scale": jnp.exp(self.log_scale),
                "logits": self.multimodal_logits(states, context)}

    # ------------------------------------------------------------------ decoding

    def init_decoding(self, images):
        """The decoding cache for a batch of images: cross-attention keys/values of the image
        context (computed once here) and empty self-attention caches of max_len positions."""
        context = self.image_context(images)
        batch = images.shape[0]

        def empty(block):
            shape = (batch, self.max_len, block.heads, block.width // block.heads)
            return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}

        return {"unimodal": [empty(b) for b in self.unimodal],
                "multimodal": [empty(b) for b in self.multimodal],
                "image": [b.image_keys_values(context) for b in self.multimodal]}

    def decode_step(self, cache, token, position):
        """One token per sequence [N] at ``position`` -> (next-token log-probs [N, V], cache)."""
        x = self.token_embed(token[:, None])
        x = x + jax.lax.dynamic_slice_in_dim(self.posemb, position, 1)[None]
        new = {"unimodal": [], "multimodal": [], "image": cache["image"]}
        for block, layer_cache in zip(self.unimodal, cache["unimodal"]):
            x, layer_cache = block(x, cache=layer_cache, position=position)
            new["unimodal"].append(layer_cache)
        for block, layer_cache, image_kv in zip(self.multimodal, cache["multimodal"], cache["image"]):
            x, layer_cache = block(x, image_kv=image_kv, cache=layer_cache, position=position)
            new["multimodal"].append(layer_cache)
        logits = self.vocab_head(self.ln_final(x[:, 0])).astype(jnp.float32)
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
