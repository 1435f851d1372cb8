"""A tiny CoCa for tests: configs/coca.py:demo shrunk to well under a second per step.

'captioning' declares a small captioning evaluator and a generative zero-shot one on 'val';
otherwise no evaluators run. E.g. 'tests/tiny_coca.py:captioning'.
"""

import os

from big_contrast import config as bc

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "configs", "coca.py:demo")


def get_config(arg=None):
    arg = bc.parse_arg(arg, captioning=False)
    config = bc.load_config_file(_DEMO)
    config.evals = {}
    if arg.captioning:
        config.evals = {
            "captioning_val": {"type": "captioning", "split": "val", "num_examples": 64},
            "generative_val": {"type": "zero_shot", "split": "val", "label_key": "shape",
                               "num_examples": 64, "scorer": "generative"}}
    config.eval_batch_size = 32
    return bc.apply_overrides(config, {
        "batch_size": "16", "total_steps": "6", "log_every": "1", "checkpoint_every": "3",
        "optim.warmup_steps": "2", "data.image_size": "16", "data.prefetch": "1",
        "model.image.variant": "8x1,16", "model.text.variant": "mu",
        "model.decoder.queries": "4", "model.embed_dim": "16", "text.max_len": "16",
        "tensorboard": "false", "ema_decay": "0"})
