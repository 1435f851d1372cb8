"""Tiny image-only objectives for tests: configs/swav.py:demo and configs/simclr.py:demo
shrunk to well under a second per step.

Arguments: the objective, 'swav' (default: 2 x 16 px + 2 x 8 px crops, a queue of two batches
from step 2, prototypes frozen for 3 steps, the paper's soft codes) or 'simclr'; 'mochi' turns
on hard-negative mixing (simclr); 'evals' declares small kNN and linear-probe evaluators. E.g.
'tests/tiny_ssl.py:swav,evals'.
"""

import os

from big_contrast import config as bc

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def get_config(arg=None):
    arg = bc.parse_arg(arg, objective="swav", mochi=False, evals=False)
    if arg.objective not in ("swav", "simclr"):
        raise bc.ConfigError(f"tiny_ssl objective must be 'swav' or 'simclr', got {arg.objective!r}")
    config = bc.load_config_file(os.path.join(_CONFIGS, f"{arg.objective}.py:demo"))
    config.evals = {}
    if arg.evals:
        common = {"every": 0, "splits": ("val",), "label_key": "shape",
                  "where": {"num_objects": 1}, "num_examples": 64}
        config.evals = {"knn": {"type": "knn", "bank_examples": 128, "k": 20, **common},
                        "linear_probe": {"type": "linear_probe", "train_examples": 128,
                                         **common}}
    overrides = {
        "batch_size": "16", "total_steps": "6", "log_every": "1", "checkpoint_every": "3",
        "optim.lr": "2e-3", "optim.warmup_steps": "2", "data.image_size": "16",
        "data.prefetch": "1",
        "model.image.variant": "tiny", "model.head.hidden_dim": "32", "model.embed_dim": "16",
        "eval_batch_size": "64", "tensorboard": "false", "ema_decay": "0"}
    if arg.objective == "swav":
        overrides.update({"model.num_prototypes": "32", "data.multicrop.local_crops": "2",
                          "data.multicrop.local_size": "8", "swav.queue_length": "32",
                          "swav.queue_start_step": "1", "swav.freeze_prototypes_steps": "3",
                          "swav.hard_assignment": "false",
                          # the crops these tests were tuned on, whatever the demo's: the
                          # eight-device test's tolerance holds Sinkhorn's amplification of
                          # rounding differences on these batches
                          "data.multicrop.global_scale": "(0.3, 1.0)"})
    if arg.mochi:
        overrides.update({"simclr.hard_negatives.top_n": "4",
                          "simclr.hard_negatives.pair_mixes": "3",
                          "simclr.hard_negatives.anchor_mixes": "2"})
    return bc.apply_overrides(config, overrides)
