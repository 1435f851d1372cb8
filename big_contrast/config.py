"""Config plumbing: config-string arguments, strict keys with suggestions, duration units.

Recipes in configs/ start from ``base_config()``, which declares every key the trainer reads,
so a locked config rejects any key that is not one of them, and a misspelt key is reported
with the closest valid one.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
    """A config key or value the trainer cannot use; the message says what to write instead."""


def closest_suggestion(name: str, candidates) -> str:
    """Returns "; did you mean 'x'?" for the closest candidate, or "" when none is close."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted keys of a (nested) ConfigDict, e.g. ['optim.lr', 'total_steps']."""
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, prefix + key + "."))
    return keys


def unknown_key_error(key: str, config: ml_collections.ConfigDict, where: str = "config") -> ConfigError:
    return ConfigError(f"unknown {where} key '{key}'{closest_suggestion(key, flat_keys(config))}")


def _typed(text: str, default):
    """Converts a config-string value to the type of its default."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"expected a boolean, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return type(default)(float(text)) if isinstance(default, int) and "e" in text.lower() \
            else type(default)(text)
    if isinstance(default, str) or default is None:
        return text
    return type(default)(ast.literal_eval(text))


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """Parses a config-string argument such as 'demo' or 'B/32,bs=4096,res=224'.

    ``spec`` gives every accepted key with its default (which fixes its type). Entries are
    comma-separated ``key=value`` pairs; a bare value binds to the first key in ``spec``
    (typically the variant name), or sets a boolean key of that name to True.
    """
    out = ml_collections.ConfigDict(spec)
    if not arg:
        return out
    first_key = next(iter(spec))
    for entry in arg.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if "=" in entry:
            key, value = (s.strip() for s in entry.split("=", 1))
        elif isinstance(spec.get(entry), bool):
            key, value = entry, "true"
        else:
            key, value = first_key, entry
        if key not in spec:
            raise ConfigError(f"unknown config argument '{key}' in {arg!r}{closest_suggestion(key, spec)}; "
                              f"accepted: {', '.join(spec)}")
        try:
            out[key] = _typed(value, spec[key])
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"config argument '{key}={value}': {e}") from None
    return out


def load_config_file(path_and_arg: str) -> ml_collections.ConfigDict:
    """Loads 'configs/clip.py:demo' the way --config does (without command-line overrides)."""
    path, _, arg = path_and_arg.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"big_contrast_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.lock()
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted keys in place from strings ({'optim.lr': '1e-3'}), typed like the current
    value; unknown keys raise with a suggestion."""
    for key, text in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise unknown_key_error(key, config)
            node = node[part]
        if leaf not in node:
            raise unknown_key_error(key, config)
        current = node[leaf]
        if current is None:  # a typed placeholder
            current = node.get_type(leaf)()
        try:
            node[leaf] = _typed(str(text), current)
        except (ValueError, SyntaxError, TypeError) as e:
            raise ConfigError(f"cannot set '{key}' to {text!r}: {e}") from None
    return config


def check_command_line_keys(config_arg: str, argv) -> None:
    """Names the first ``--config.<key>`` in argv that the loaded config does not have."""
    config = load_config_file(config_arg)
    valid = set(flat_keys(config))
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            if key not in valid:
                raise unknown_key_error(key, config)


def build_recipe(arg: str | None, recipe: str, variants: dict, shared=None):
    """What a recipe file's get_config does: parses 'variant[,bs=N]', starts from
    base_config(), applies ``shared`` (settings of every variant) and then the variant's own
    function; bs overrides the global batch size."""
    arg = parse_arg(arg, variant=next(iter(variants)), bs=0)
    if arg.variant not in variants:
        raise ConfigError(f"unknown {recipe} variant {arg.variant!r}; choose "
                          + " or ".join(repr(v) for v in variants))
    config = base_config()
    if shared is not None:
        shared(config)
    variants[arg.variant](config)
    if arg.bs:
        config.batch_size = arg.bs
    return config


# ----------------------------------------------------------------------------- durations


def steps_from_duration(config: ml_collections.ConfigDict, name: str, batch_size: int,
                        examples_per_epoch: int | None = None) -> int | None:
    """Resolves ``{name}_steps | {name}_examples | {name}_epochs`` (at most one set) to steps."""
    keys = [f"{name}_{unit}" for unit in ("steps", "examples", "epochs")]
    present = [k for k in keys if k in config]
    given = {k: config[k] for k in present if config[k] is not None}
    if len(given) > 1:
        raise ConfigError(f"set only one of {', '.join(present)}; got {given}")
    if not given:
        return None
    key, value = next(iter(given.items()))
    if key.endswith("_steps"):
        return int(value)
    if key.endswith("_examples"):
        return max(1, int(round(value / batch_size)))
    if examples_per_epoch is None:
        raise ConfigError(f"{key} needs a finite training source; use {name}_steps")
    return max(1, int(round(value * examples_per_epoch / batch_size)))


def placeholder(kind):
    """A typed None field: it can be set later from the command line."""
    return config_dict.placeholder(kind)


# ----------------------------------------------------------------------------- the base config


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults. Recipes (configs/*.py) start from this."""
    c = ml_collections.ConfigDict()
    c.objective = "contrastive"
    c.seed = 0
    c.batch_size = 256  # global, over all processes and devices
    # Training length: set exactly one of these.
    c.total_steps = placeholder(int)
    c.total_examples = placeholder(int)
    c.total_epochs = placeholder(float)
    c.log_every = 50  # steps between progress lines / metric records (the only host syncs)
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.eval_batch_size = 500
    c.tensorboard = True
    # Exponential moving average of the weights (0 = off). With EMA on, evaluators report both
    # the averaged weights ('ema/<eval>/<metric>') and the online ones ('<eval>/<metric>').
    c.ema_decay = 0.0
    c.eval_weights = "both"  # both | online | ema: which weights evaluators see (EMA if on)

    # Mesh axes (one may be -1: all remaining devices) and logical -> mesh axis rules.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    c.sharding_rules = [
        ["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["mlp", "model"], ["heads", "model"],
        ["vocab", "model"], ["kv", None], ["length", None], ["layers", None],
    ]

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | lamb | adafactor | lars
    c.optim.lr = 5e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.2
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 disables
    c.optim.decay = "cosine"  # cosine | linear, after a linear warmup
    c.optim.end_lr_fraction = 0.0  # the schedule ends at lr * this
    c.optim.warmup_steps = placeholder(int)
    c.optim.warmup_examples = placeholder(int)
    c.optim.warmup_epochs = placeholder(float)
    c.optim.momentum = 0.9  # lars
    c.optim.trust_coefficient = 0.001  # lars: eta in eta * |w| / |g + wd * w|
    # Parameter groups (named by the objective; by default 'vectors': biases, norm scales and
    # scalars, and 'weights') spared weight decay and LARS trust-ratio scaling, and parameters
    # matching these regexes, which get no weight decay either.
    c.optim.exclude_groups = ["vectors"]
    c.optim.no_decay = ["posemb", "/cls$", "log_scale"]

    # contrastive: the image-text loss, 'softmax' (CLIP's InfoNCE) or 'sigmoid' (SigLIP's
    # pairwise loss: needs model.init_bias; contrastive objective only). block_size > 0
    # computes the softmax loss in blocks of that many columns (online log-sum-exp: memory
    # O(local batch x block_size) instead of O(local x global batch)); 0: dense.
    # label_smoothing: of the softmax targets. Captioning objectives (coca) add
    # contrastive_weight * contrastive + caption_weight * caption (the paper: 1 and 2).
    # temperature: of the image-only objectives' softmaxes (simclr, swav).
    c.loss = ml_collections.ConfigDict(
        {"contrastive": "softmax", "block_size": 0, "label_smoothing": 0.0,
         "contrastive_weight": 1.0, "caption_weight": 2.0, "caption_label_smoothing": 0.0,
         "temperature": 0.1})
    # GradCache (Gao et al. 2021): micro_batches > 1 runs the towers over that many slices of
    # each device's batch, first without gradients to get every embedding, then again with the
    # loss's gradients for them, so the loss still sees every negative of the global batch while
    # activations are held for one slice at a time. Needs towers without batch norm.
    c.grad_cache = ml_collections.ConfigDict({"micro_batches": 1})
    # SwAV: codes from the first assign_crops crops (Sinkhorn: epsilon, iterations; with
    # hard_assignment each rounded to a one-hot of its largest code); a queue of
    # queue_length past embeddings (a multiple of batch_size; 0: none), filled from
    # queue_start_step and used once full; prototypes frozen for the first
    # freeze_prototypes_steps optimizer steps.
    c.swav = ml_collections.ConfigDict(
        {"assign_crops": 2, "epsilon": 0.05, "sinkhorn_iterations": 3, "hard_assignment": False,
         "queue_length": 0, "queue_start_step": 0, "freeze_prototypes_steps": 0})
    # SimCLR: loss 'ntxent' (NT-Xent) or 'dcl' (decoupled: the positive left out of the
    # denominator); hard_negatives: MoCHi mixing (top_n > 0 turns it on) of each anchor's
    # top_n hardest negatives into pair_mixes synthetic negatives, and of the anchor with
    # them into anchor_mixes more (anchor weight below max_anchor_weight).
    c.simclr = ml_collections.ConfigDict(
        {"loss": "ntxent", "hard_negatives": {"top_n": 0, "pair_mixes": 0, "anchor_mixes": 0,
                                              "max_anchor_weight": 0.5}})

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # what the towers compute in: float32 | bfloat16 (losses: float32)
    c.model.param_dtype = "float32"  # dtype of the parameters (and so of the optimizer state)
    c.model.image = ml_collections.ConfigDict(
        {"type": "vit", "variant": "B/32", "pool": "cls", "stem": "patch", "norm": "batch",
         "bn_momentum": placeholder(float), "drop_connect": 0.2, "max_stride": placeholder(int),
         "stages": placeholder(int), "fused_stages": 0,
         "remat": False, "remat_policy": "nothing_saveable", "scan": False})
    # type: vit | convnet | efficientnet | resnet. variant: resnet 18 | 34 | 50 | 101 | 152, or
    # tiny | small for 32x32 images (models/resnet.py); efficientnet B0..B7 | L2, or tiny |
    # small for 32x32 images (models/efficientnet.py). pool: vit cls | gap; convnet,
    # efficientnet and resnet gap | max | gap_max. stem: vit patch | conv; convnet none |
    # space_to_depth; efficientnet stride2 (the paper) | stride1 (small images); resnet
    # imagenet (7x7 conv + max-pool) | cifar (3x3 conv, no pool).
    # norm: convnet only. bn_momentum: running-statistics decay (None: the tower's default).
    # drop_connect, max_stride: efficientnet's stochastic-depth rate and cap on the total stride.
    # stages, fused_stages: efficientnet's number of B0 stages built (None: all 7) and how many
    # of the first use EfficientNetV2's Fused-MBConv blocks.
    # remat: recompute each block's activations in the backward pass (vit, efficientnet, resnet).
    # remat_policy: what remat may keep: nothing_saveable | dots_saveable |
    # dots_with_no_batch_dims_saveable (jax.checkpoint_policies).
    # scan: one nn.scan over the identical blocks (vit: all; efficientnet, resnet: each stage's
    # after the first), parameters stacked on a 'layers' axis: compiles in a fraction of the time.
    c.model.text = ml_collections.ConfigDict(
        {"variant": "M", "causal": True, "pool": "eos", "remat": False,
         "remat_policy": "nothing_saveable", "scan": False})
    # model.text.remat, remat_policy and scan: as model.image's, for the text encoder's blocks
    # (coca: the decoder's).
    # The text decoder of captioning objectives (coca): model.text.variant sets its width;
    # depths per half (None: the variant's depth), the image tokens it attends to, and the
    # attention heads of the two poolers that make them (None: the variant's).
    c.model.decoder = ml_collections.ConfigDict(
        {"unimodal_depth": placeholder(int), "multimodal_depth": placeholder(int), "queries": 256,
         "pooler_heads": placeholder(int)})
    c.model.embed_dim = 512
    # Image-only objectives (simclr, swav): the projection MLP after the image tower
    # ((Dense-BN-ReLU) x (layers - 1), Dense to embed_dim) and SwAV's prototypes.
    c.model.head = ml_collections.ConfigDict({"hidden_dim": 2048, "layers": 2})
    c.model.num_prototypes = 3000
    c.model.projection = "linear"  # linear | mlp | none
    c.model.init_scale = 1 / 0.07  # CLIP's initial logit scale
    c.model.learn_scale = True
    c.model.max_scale = 100.0  # CLIP clamps the logit scale at 100
    c.model.init_bias = placeholder(float)  # a learnable logit bias (SigLIP: -10); None: none

    c.text = ml_collections.ConfigDict()
    c.text.tokenizer = "words"  # words (hashed) | vocab (word list) | bytes | sentencepiece
    c.text.max_len = 32
    c.text.vocab_size = 32_000  # for 'words'; others define their own
    # 'sentencepiece': the .model file; 'vocab': a JSON word list (VocabularyTokenizer.save),
    # optional for the synthetic source (its caption language is built in).
    c.text.model_path = ""

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic | manifest | image_folder | tfds | array_record
    c.data.train_split = "train"
    c.data.image_size = 32
    c.data.shuffle = True
    c.data.num_workers = 0  # grain worker processes (0: decode in the main process)
    c.data.read_threads = 0  # reader threads per process; >0 helps when reading remote files
    c.data.worker_buffer_size = 2  # x16 decoded examples buffered per worker
    c.data.prefetch = 2  # batches prepared ahead on the device-transfer thread
    c.data.path = ""  # manifest / ArrayRecord path ('{split}' is replaced), or TFDS data_dir
    c.data.tfds_name = ""
    c.data.image_key = "image"
    c.data.caption_key = "caption"
    # Corrupt records (missing, undecodable or oversized images, empty or non-UTF-8 captions)
    # are skipped and counted; above this fraction of the records read, the run stops.
    c.data.max_corrupt_fraction = 0.1
    c.data.max_image_pixels = 89_478_485  # larger images are refused before decoding
    c.data.synthetic = ml_collections.ConfigDict(
        {"seed": 0, "num_records": 10_000_000, "two_object_prob": 0.3, "grey_prob": 0.15,
         "backgrounds": ("plain", "noisy", "striped", "checkered", "shaded", "mottled"),
         "positions": ("top left", "top", "top right", "left", "centre", "right",
                       "bottom left", "bottom", "bottom right")})
    # Per-view augmentation: random-resized-crop area range, flips, colour jitter of strength s
    # (brightness, contrast, saturation 0.8 s, hue 0.2 s or hue_jitter turns, with probability
    # jitter_prob),
    # grayscale, Gaussian blur (its sigma range in pixels at 224 px, scaled with the view's
    # size) and solarisation (the second global view only) probabilities.
    c.data.augment = ml_collections.ConfigDict(
        {"crop_scale": (1.0, 1.0), "flip": False, "colour_jitter": 0.0,
         "hue_jitter": placeholder(float), "jitter_prob": 0.8,
         "grayscale_prob": 0.0, "blur_prob": 0.0, "blur_sigma": (0.1, 2.0),
         "solarize_prob": 0.0})
    # Image-only objectives' views: global_crops at data.image_size with area in global_scale,
    # then local_crops at local_size with area in local_scale (SwAV: 2 x 224 + 6 x 96).
    c.data.multicrop = ml_collections.ConfigDict(
        {"global_crops": 2, "global_scale": (0.14, 1.0), "local_crops": 0, "local_size": 96,
         "local_scale": (0.05, 0.14)})
    # Training on a weighted mixture of sources instead of data.source alone (empty: data.source):
    # data.mixture.<name> = {weight (> 0, relative), source, path, tfds_name, image_key,
    # caption_key, synthetic (some data.synthetic keys); each not given is data.<key>'s}. A part
    # with label_key has its class names rendered as captions: templates (one '{}' each; default:
    # the source's prompts) and class_names or class_names_file (default: the source's). Evaluators
    # still read data.source.
    c.data.mixture = ml_collections.ConfigDict()

    c.evals = ml_collections.ConfigDict()

    # Fault injection for tests: overwrite 'loss', 'grads' or 'params' with poison_value at
    # optimizer step poison_step (0 = never).
    c.debug = ml_collections.ConfigDict(
        {"poison_step": 0, "poison_where": "", "poison_value": float("nan")})
    return c


def from_record(recorded: dict) -> ml_collections.ConfigDict:
    """The config a run recorded in its workdir (config.json), typed like base_config()."""
    config = base_config()
    _update(config, recorded, "")
    config.lock()
    return config


def _update(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
            _update(node[key], value, f"{prefix}{key}.")
        elif isinstance(node.get(key), tuple) and isinstance(value, list):
            node[key] = tuple(value)
        else:
            try:
                node[key] = value
            except TypeError as e:
                raise ConfigError(f"recorded config key '{prefix}{key}': {e}") from None
