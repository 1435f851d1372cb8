"""CoCa (Yu et al. 2022): one forward pass, two losses. A contrastive loss between the
attention-pooled image embedding and the unimodal decoder's CLS embedding (softmax InfoNCE
over the global batch) plus a captioning loss on the multimodal decoder's next-token logits:
loss = contrastive_weight * contrastive + caption_weight * caption (paper: 1 and 2)."""

from __future__ import annotations

import jax.numpy as jnp

from big_contrast import decoding, losses
from big_contrast.config import ConfigError
from big_contrast.models import coca, precision, two_tower
from big_contrast.objectives.base import PerExampleObjective
from big_contrast.objectives.contrastive import global_contrastive_loss, image_text_spec


class CoCa(PerExampleObjective):
    """config.model: {image, text.{variant, remat, remat_policy, scan} (the decoder's),
    decoder.{unimodal_depth, multimodal_depth, queries, pooler_heads}, embed_dim, init_scale,
    max_scale, dtype, param_dtype}; config.loss: {block_size, label_smoothing,
    contrastive_weight, caption_weight, caption_label_smoothing}. Embeddings, logits and the
    logit scale reach the losses in float32 whatever model.dtype is."""

    can_caption = True

    def __init__(self, config, tokenizer):
        if not getattr(tokenizer, "can_decode", False):
            raise ConfigError(f"objective 'coca' generates captions, which the "
                              f"{config.text.tokenizer!r} tokenizer cannot decode; set "
                              "text.tokenizer to 'vocab' or 'sentencepiece'")
        decoder, text = config.model.decoder, config.model.text
        dtypes = precision.from_config(config.model)
        self.model = coca.CoCa(
            image_tower=two_tower.build_image_tower(config.model.image, **dtypes),
            vocab_size=tokenizer.vocab_size, max_len=config.text.max_len,
            text_variant=text.variant, unimodal_depth=decoder.unimodal_depth,
            multimodal_depth=decoder.multimodal_depth, decoder_queries=decoder.queries,
            pooler_heads=decoder.pooler_heads,
            embed_dim=config.model.embed_dim, init_scale=config.model.init_scale,
            remat=text.remat, remat_policy=text.remat_policy, scan=text.scan, **dtypes)
        self.pad_id, self.bos_id = tokenizer.pad_id, tokenizer.bos_id
        self.max_scale = config.model.max_scale
        loss = config.loss
        self.contrastive_loss = global_contrastive_loss(loss)
        self.weights = (loss.contrastive_weight, loss.caption_weight)
        self.caption_smoothing = loss.caption_label_smoothing
        self._spec = image_text_spec(config)

    @property
    def batch_spec(self):
        return self._spec

    def init_variables(self, rng, batch):
        return self.model.init({"params": rng}, batch["image"], batch["text"])

    def per_example_outputs(self, params, model_state, batch, rng, step):
        del rng, step  # no dropout, nothing scheduled
        text = batch["text"]
        out, new_state = self.model.apply({"params": params, **model_state}, batch["image"], text,
                                          train=True, mutable=list(model_state))
        targets = text[:, 1:]
        nll, tokens = losses.caption_token_losses(
            out["logits"][:, :-1], targets, targets != self.pad_id,
            label_smoothing=self.caption_smoothing)
        outputs = {"image": out["image"], "text": out["text"], "caption_nll": nll,
                   "caption_tokens": tokens}
        return outputs, dict(new_state)

    def loss_from_outputs(self, params, outputs, step):
        logit = {"scale": jnp.exp(params["log_scale"].astype(jnp.float32))}
        contrastive = self.contrastive_loss(outputs["image"], outputs["text"], logit)
        caption = losses.mean_token_loss(outputs["caption_nll"], outputs["caption_tokens"])
        loss = self.weights[0] * contrastive + self.weights[1] * caption
        metrics = {"loss": loss, "contrastive_loss": contrastive, "caption_loss": caption,
                   "temperature": 1.0 / logit["scale"]}
        return loss, metrics

    def postprocess_params(self, params):
        return two_tower.clamp_log_scale(params, self.max_scale)

    def _apply(self, params, model_state, method, *args):
        return self.model.apply({"params": params, **model_state}, *args, method=method)

    def embed_images(self, params, model_state, images):
        return self._apply(params, model_state, coca.CoCa.encode_image, images)

    def embed_texts(self, params, model_state, tokens):
        return self._apply(params, model_state, coca.CoCa.encode_text, tokens)

    def init_decoding(self, params, model_state, images):
        return self._apply(params, model_state, coca.CoCa.init_decoding, images)

    def decode_step(self, params, model_state, cache, token, position):
        log_probs, cache = self._apply(params, model_state, coca.CoCa.decode_step, cache, token,
                                       position)
        return self.mask_special_tokens(log_probs), cache

    def mask_special_tokens(self, log_probs):
        """Generation never emits PAD or BOS (neither is ever a training target)."""
        return log_probs.at[:, jnp.array([self.pad_id, self.bos_id])].set(decoding.NEG_INF)

    def score_captions(self, params, model_state, images, tokens):
        return self._apply(params, model_state, coca.CoCa.score_captions, images, tokens)
