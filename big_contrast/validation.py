"""Config values checked before anything is built or compiled: every failure is one line that
names the key, the bad value and what would be accepted."""

from __future__ import annotations

from big_contrast import evaluators, optim
from big_contrast.config import ConfigError, closest_suggestion
from big_contrast.data import mixture, sources, tokenizers
from big_contrast.models import convnet, efficientnet, heads, image_layers, transformer, two_tower
from big_contrast.objectives import OBJECTIVES

EVAL_WEIGHTS = ("both", "online", "ema")
POISON_TARGETS = ("", "loss", "grads", "params")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} is {value!r}{closest_suggestion(str(value), choices)}; "
                          f"choose one of: {', '.join(map(str, choices))}")


def _check(key: str, value, ok: bool, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {requirement}, got {value!r}")


def _number(config, key: str) -> float:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _image_tower(cfg) -> None:
    _choice("model.image.type", cfg.type, two_tower.IMAGE_TOWERS)
    try:
        if cfg.type == "vit":
            _, patch = transformer.parse_variant(cfg.variant)
            if patch is None:
                raise ValueError(f"a ViT variant needs a patch size, e.g. '{cfg.variant}/16'")
            _choice("model.image.pool", cfg.pool, ("cls", "gap"))
            _choice("model.image.stem", cfg.stem, ("patch", "conv"))
        elif cfg.type == "convnet":
            convnet.parse_stages(cfg.variant)
            _choice("model.image.stem", cfg.stem, ("none", "space_to_depth"))
            _choice("model.image.norm", cfg.norm, ("batch", "none"))
            _choice("model.image.pool", cfg.pool, image_layers.POOLS)
        else:
            efficientnet.scaling(cfg.variant)
            _choice("model.image.stem", cfg.stem, ("stride2", "stride1"))
            _choice("model.image.pool", cfg.pool, image_layers.POOLS)
            _check("model.image.drop_connect", cfg.drop_connect, 0 <= cfg.drop_connect < 1,
                   "in [0, 1)")
            _check("model.image.max_stride", cfg.max_stride,
                   cfg.max_stride is None or cfg.max_stride in (1, 2, 4, 8, 16, 32),
                   "a power of two up to 32 (or None)")
        if cfg.bn_momentum is not None:
            _check("model.image.bn_momentum", cfg.bn_momentum, 0 <= cfg.bn_momentum < 1,
                   "in [0, 1)")
    except ValueError as e:
        raise ConfigError(f"model.image.variant {cfg.variant!r}: {e}") from None


def validate(config) -> None:
    """Raises ConfigError for the first config value the trainer cannot use."""
    _choice("objective", config.objective, sorted(OBJECTIVES))
    _image_tower(config.model.image)
    text_size = config.model.text.variant
    _choice("model.text.variant", text_size, list(transformer.SIZES))
    _choice("model.text.pool", config.model.text.pool, ("eos", "first", "mean"))
    _choice("model.projection", config.model.projection, heads.PROJECTIONS)
    _choice("text.tokenizer", config.text.tokenizer, tokenizers.TOKENIZERS)
    _choice("data.source", config.data.source, sources.SOURCES)
    mixture.check(config.data)
    if config.data.mixture:
        for key in ("total_epochs", "optim.warmup_epochs"):
            if _number(config, key) is not None:
                raise ConfigError(f"{key} is set, but a data.mixture has no epochs (its parts "
                                  f"run out at different times): use {key[:-len('epochs')]}steps "
                                  f"or {key[:-len('epochs')]}examples")
    _choice("optim.name", config.optim.name, optim.OPTIMIZERS)
    _choice("optim.decay", config.optim.decay, optim.DECAYS)
    for name, spec in config.evals.items():
        _choice(f"evals.{name}.type", spec.get("type"), sorted(evaluators.EVALUATORS))
        objective = OBJECTIVES[config.objective]
        if spec.get("type") == "captioning" and not objective.can_caption:
            raise ConfigError(f"evals.{name} (captioning) needs a captioning objective (e.g. "
                              f"coca), not {objective.__name__}")
        if spec.get("scorer") == "generative" and not objective.can_caption:
            raise ConfigError(f"evals.{name}.scorer 'generative' needs a captioning objective "
                              f"(e.g. coca), not {objective.__name__}")
    _choice("eval_weights", config.eval_weights, EVAL_WEIGHTS)
    if config.eval_weights == "ema" and not config.ema_decay:
        raise ConfigError("eval_weights is 'ema' but ema_decay is 0 (no averaged weights)")
    _choice("debug.poison_where", config.debug.poison_where, POISON_TARGETS)

    for key in ("optim.lr", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                "eval_batch_size", "data.max_image_pixels", "model.embed_dim"):
        _check(key, _number(config, key), _number(config, key) > 0, "> 0")
    for key in ("optim.weight_decay", "optim.clip_norm", "optim.end_lr_fraction",
                "data.num_workers", "data.read_threads"):
        _check(key, _number(config, key), _number(config, key) >= 0, ">= 0")
    for key in ("total_steps", "total_examples", "total_epochs"):
        value = config[key]
        _check(key, value, value is None or value > 0, "> 0")
    _check("ema_decay", config.ema_decay, 0 <= config.ema_decay < 1, "in [0, 1)")
    for key in ("loss.label_smoothing", "loss.caption_label_smoothing"):
        _check(key, _number(config, key), 0 <= _number(config, key) < 1, "in [0, 1)")
    for key in ("loss.contrastive_weight", "loss.caption_weight"):
        _check(key, _number(config, key), _number(config, key) >= 0, ">= 0")
    _check("model.decoder.queries", config.model.decoder.queries,
           config.model.decoder.queries > 0, "> 0")
    for key in ("model.decoder.unimodal_depth", "model.decoder.multimodal_depth"):
        value = _number(config, key)
        _check(key, value, value is None or value > 0, "> 0 (or None: the text variant's depth)")
    _check("data.max_corrupt_fraction", config.data.max_corrupt_fraction,
           0 <= config.data.max_corrupt_fraction <= 1, "in [0, 1]")
    for key in ("optim.b1", "optim.b2"):
        _check(key, _number(config, key), 0 <= _number(config, key) < 1, "in [0, 1)")
    scale = tuple(config.data.augment.crop_scale)
    _check("data.augment.crop_scale", scale,
           len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "(low, high) with 0 < low <= high <= 1")
