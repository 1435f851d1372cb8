"""Config values checked before anything is built or compiled: every failure is one line that
names the key, the bad value and what would be accepted."""

from __future__ import annotations

from big_contrast import evaluators, optim
from big_contrast.config import ConfigError, closest_suggestion
from big_contrast.data import mixture, sources, synthetic, tokenizers
from big_contrast.models import (convnet, efficientnet, heads, image_layers, precision, resnet,
                                 stacks, transformer, two_tower)
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
        elif cfg.type == "resnet":
            resnet.spec(cfg.variant)
            _choice("model.image.stem", cfg.stem, resnet.STEMS)
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
            stages = len(efficientnet.B0_STAGES) if cfg.stages is None else cfg.stages
            _check("model.image.stages", cfg.stages, 1 <= stages <= len(efficientnet.B0_STAGES),
                   f"from 1 to {len(efficientnet.B0_STAGES)} (or None: all)")
            _check("model.image.fused_stages", cfg.fused_stages, 0 <= cfg.fused_stages <= stages,
                   "from 0 to the number of stages")
        if cfg.bn_momentum is not None:
            _check("model.image.bn_momentum", cfg.bn_momentum, 0 <= cfg.bn_momentum < 1,
                   "in [0, 1)")
    except ConfigError:
        raise  # already names its key (a ConfigError is a ValueError)
    except ValueError as e:
        raise ConfigError(f"model.image.variant {cfg.variant!r}: {e}") from None


def _layer_stack(key: str, cfg) -> None:
    """model.image's or model.text's remat_policy and scan (each checked where it applies)."""
    _choice(f"{key}.remat_policy", cfg.remat_policy, list(stacks.REMAT_POLICIES))
    if cfg.remat_policy != "nothing_saveable" and not cfg.remat:
        raise ConfigError(f"{key}.remat_policy is {cfg.remat_policy!r} but {key}.remat is "
                          f"False: set {key}.remat=True for the policy to apply")
    if cfg.scan and cfg.get("type") == "convnet":
        raise ConfigError(f"{key}.scan is for vit, efficientnet and resnet towers; a convnet "
                          "has no stack of identical blocks (set it to False)")


def _precision(model) -> None:
    for key in ("dtype", "param_dtype"):
        _choice(f"model.{key}", model[key], list(precision.DTYPES))


TEXT_EVALUATORS = ("zero_shot", "retrieval", "captioning")


def _probability(key: str, value) -> None:
    _check(key, value, 0 <= value <= 1, "a probability in [0, 1]")


def _synthetic_world(config) -> None:
    """The synthetic world's background and position names (typos named with a suggestion)."""
    world = config.data.synthetic
    for key, names, known in (("backgrounds", world.backgrounds, synthetic.BACKGROUNDS),
                              ("positions", world.positions, synthetic.POSITIONS)):
        if not names:
            raise ConfigError(f"data.synthetic.{key} is empty; choose from: {', '.join(known)}")
        for name in names:
            _choice(f"an entry of data.synthetic.{key}", name, known)


def _augmentation(config) -> None:
    augment = config.data.augment
    for name in ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
        _probability(f"data.augment.{name}", augment[name])
    _check("data.augment.colour_jitter", augment.colour_jitter,
           0 <= augment.colour_jitter <= 2.5, "in [0, 2.5] (its hue shift 0.2 s <= 0.5 turns)")
    _check("data.augment.hue_jitter", augment.hue_jitter,
           augment.hue_jitter is None or 0 <= augment.hue_jitter <= 0.5,
           "in [0, 0.5] turns (or None: 0.2 x colour_jitter)")
    for key in ("data.augment.crop_scale", "data.multicrop.global_scale",
                "data.multicrop.local_scale"):
        scale = tuple(_number(config, key))
        _check(key, scale, len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
               "(low, high) with 0 < low <= high <= 1")


def _image_only(config) -> None:
    """The multi-crop views and the SimCLR / SwAV settings."""
    crops = config.data.multicrop
    _check("data.multicrop.global_crops", crops.global_crops, crops.global_crops >= 1, ">= 1")
    _check("data.multicrop.local_crops", crops.local_crops, crops.local_crops >= 0, ">= 0")
    _check("data.multicrop.local_size", crops.local_size, crops.local_size > 0, "> 0")
    _check("loss.temperature", config.loss.temperature, config.loss.temperature > 0, "> 0")
    _check("model.head.layers", config.model.head.layers, config.model.head.layers >= 1, ">= 1")
    _check("model.head.hidden_dim", config.model.head.hidden_dim,
           config.model.head.hidden_dim > 0, "> 0")
    if config.objective == "simclr":
        _check("data.multicrop.global_crops", crops.global_crops, crops.global_crops == 2,
               "2 for simclr (two views per image)")
        _check("data.multicrop.local_crops", crops.local_crops, crops.local_crops == 0,
               "0 for simclr")
        _choice("simclr.loss", config.simclr.loss, ("ntxent", "dcl"))
        mixing = config.simclr.hard_negatives
        for name in ("top_n", "pair_mixes", "anchor_mixes"):
            _check(f"simclr.hard_negatives.{name}", mixing[name], mixing[name] >= 0, ">= 0")
        if mixing.top_n:
            _check("simclr.hard_negatives", mixing.to_dict(),
                   mixing.pair_mixes + mixing.anchor_mixes > 0,
                   "given pair_mixes or anchor_mixes > 0 when top_n > 0")
            _check("simclr.hard_negatives.max_anchor_weight", mixing.max_anchor_weight,
                   0 < mixing.max_anchor_weight <= 1, "in (0, 1]")
    if config.objective == "swav":
        swav = config.swav
        # With K <= D every embedding can sit orthogonal to all K prototypes: equal scores,
        # uniform codes and predictions, a zero gradient, and a loss stuck at ln K.
        _check("model.num_prototypes", config.model.num_prototypes,
               config.model.num_prototypes > config.model.embed_dim,
               f"> model.embed_dim ({config.model.embed_dim}), or embeddings orthogonal to "
               "every prototype are a fixed point (the loss stays at ln K)")
        _check("swav.assign_crops", swav.assign_crops, 1 <= swav.assign_crops <= crops.global_crops,
               f"between 1 and data.multicrop.global_crops ({crops.global_crops})")
        _check("data.multicrop", f"{crops.global_crops} + {crops.local_crops} crops",
               crops.global_crops + crops.local_crops >= 2, "at least 2 crops in all")
        _check("swav.epsilon", swav.epsilon, swav.epsilon > 0, "> 0")
        _check("swav.sinkhorn_iterations", swav.sinkhorn_iterations,
               swav.sinkhorn_iterations >= 1, ">= 1")
        for name in ("queue_length", "queue_start_step", "freeze_prototypes_steps"):
            _check(f"swav.{name}", swav[name], swav[name] >= 0, ">= 0")
        _check("swav.queue_length", swav.queue_length, swav.queue_length % config.batch_size == 0,
               f"a multiple of batch_size ({config.batch_size}): the queue holds whole batches")


def _contrastive_loss(config) -> None:
    loss = config.loss
    _choice("loss.contrastive", loss.contrastive, ("softmax", "sigmoid"))
    if loss.contrastive == "sigmoid":
        if config.objective != "contrastive":
            raise ConfigError(f"loss.contrastive 'sigmoid' is for the 'contrastive' objective, "
                              f"not {config.objective!r}")
        if config.model.init_bias is None:
            raise ConfigError("loss.contrastive 'sigmoid' needs a logit bias: set "
                              "model.init_bias (SigLIP: -10)")
        if loss.block_size:
            raise ConfigError("loss.block_size is for the softmax loss; the sigmoid loss "
                              "already scores one device's block at a time (set it to 0)")
    _check("loss.block_size", loss.block_size, loss.block_size >= 0,
           ">= 0 (0: the dense softmax loss)")
    micro = config.grad_cache.micro_batches
    _check("grad_cache.micro_batches", micro, micro >= 1, ">= 1 (1: off)")


def validate(config) -> None:
    """Raises ConfigError for the first config value the trainer cannot use."""
    _choice("objective", config.objective, sorted(OBJECTIVES))
    _image_tower(config.model.image)
    _layer_stack("model.image", config.model.image)
    _layer_stack("model.text", config.model.text)
    _precision(config.model)
    text_size = config.model.text.variant
    _choice("model.text.variant", text_size, list(transformer.SIZES))
    _choice("model.text.pool", config.model.text.pool, ("eos", "first", "mean"))
    _choice("model.projection", config.model.projection, heads.PROJECTIONS)
    _choice("text.tokenizer", config.text.tokenizer, tokenizers.TOKENIZERS)
    _choice("data.source", config.data.source, sources.SOURCES)
    _synthetic_world(config)
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
        if spec.get("type") in TEXT_EVALUATORS and not objective.embeds_text:
            raise ConfigError(f"evals.{name} ({spec.get('type')}) compares images with text, "
                              f"but {objective.__name__} is image-only; use 'knn' or "
                              f"'linear_probe'")
        if spec.get("scorer") == "generative" and not objective.can_caption:
            raise ConfigError(f"evals.{name}.scorer 'generative' needs a captioning objective "
                              f"(e.g. coca), not {objective.__name__}")
    _image_only(config)
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
    _contrastive_loss(config)
    _check("model.decoder.queries", config.model.decoder.queries,
           config.model.decoder.queries > 0, "> 0")
    for key in ("model.decoder.unimodal_depth", "model.decoder.multimodal_depth"):
        value = _number(config, key)
        _check(key, value, value is None or value > 0, "> 0 (or None: the text variant's depth)")
    _check("data.max_corrupt_fraction", config.data.max_corrupt_fraction,
           0 <= config.data.max_corrupt_fraction <= 1, "in [0, 1]")
    for key in ("optim.b1", "optim.b2"):
        _check(key, _number(config, key), 0 <= _number(config, key) < 1, "in [0, 1)")
    _augmentation(config)
    _check("optim.momentum", config.optim.momentum, 0 <= config.optim.momentum < 1, "in [0, 1)")
    _check("optim.trust_coefficient", config.optim.trust_coefficient,
           config.optim.trust_coefficient > 0, "> 0")
