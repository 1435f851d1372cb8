"""Text transformer tower: causal with end-of-text pooling (CLIP) or bidirectional with CLS
pooling (ALIGN's BERT). Token 0 is padding; tokenizers put BOS first and a sticky EOS last."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from big_contrast.models import precision, transformer


class TextTransformer(nn.Module):
    """Token + learned position embeddings -> pre-LN encoder -> pooled vector.

    Attributes:
      variant: a transformer size name (transformer.SIZES), e.g. 'M' for CLIP B/32's text tower.
      vocab_size: embedding rows; must cover every token id the tokenizer emits.
      causal: True for CLIP (each token sees only its past), False for BERT-style encoders.
      pool: 'eos' (the first ``eos_id`` token, CLIP), 'first' (position 0, BERT's [CLS]) or
        'mean' (average over non-padding tokens).
      eos_id: the end-of-text id used by 'eos' pooling.
      remat, remat_policy, scan: how the encoder runs its blocks (transformer.Encoder).
      dtype, param_dtype: compute and parameter dtypes (models/precision.py).
    Returns (pooled [B, width], tokens [B, T, width]) in dtype; tokens feed captioning decoders.
    """

    variant: str = "M"
    vocab_size: int = 32_000
    causal: bool = True
    pool: str = "eos"
    eos_id: int = 2
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        del train
        size, _ = transformer.parse_variant(self.variant)
        if self.pool not in ("eos", "first", "mean"):
            raise ValueError(f"text pool must be 'eos', 'first' or 'mean', got {self.pool!r}")
        embed = nn.Embed(self.vocab_size, size.width, name="token_embed",
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("vocab", "embed")),
                         **precision.of(self))
        x = embed(tokens)
        posemb = self.param("posemb", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, None, "embed")),
            (1, tokens.shape[1], size.width), self.param_dtype)
        x = nn.with_logical_constraint(x + posemb.astype(self.dtype), ("batch", "length", "embed"))
        # A causal mask already hides the padding that follows EOS from the pooled token;
        # bidirectional encoders need the padding masked explicitly.
        pad_mask = None if self.causal else tokens != 0
        x = transformer.Encoder(size.depth, size.heads, size.mlp_dim, causal=self.causal,
                                remat=self.remat, remat_policy=self.remat_policy, scan=self.scan,
                                name="encoder", **precision.of(self))(x, pad_mask)
        x = transformer.layer_norm("ln_final", **precision.of(self))(x)
        if self.pool == "first":
            pooled = x[:, 0]
        elif self.pool == "mean":  # over the non-padding tokens
            keep = (tokens != 0)[..., None].astype(x.dtype)
            pooled = (x * keep).sum(axis=1) / jnp.maximum(keep.sum(axis=1), 1.0)
        else:
            eos_position = jnp.argmax(tokens == self.eos_id, axis=1)
            pooled = jnp.take_along_axis(x, eos_position[:, None, None], axis=1)[:, 0]
        return pooled, x
