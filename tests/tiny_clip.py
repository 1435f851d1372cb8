"""A tiny CLIP for tests: configs/clip.py:demo shrunk to about a second per step.

Arguments: 'retrieval' declares one retrieval evaluator on 'val' (it works for any source
with captions, e.g. a manifest); otherwise no evaluators run.
"""

import os

from big_contrast import config as bc

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "configs", "clip.py:demo")


def get_config(arg=None):
    arg = bc.parse_arg(arg, retrieval=False)
    config = bc.load_config_file(_DEMO)
    config.evals = {}
    if arg.retrieval:
        config.evals = {"retrieval_val": {"type": "retrieval", "every": 0, "split": "val",
                                          "num_examples": 200}}
    config.eval_batch_size = 64
    return bc.apply_overrides(config, {
        "batch_size": "16", "total_steps": "6", "log_every": "1", "checkpoint_every": "3",
        "optim.warmup_steps": "2", "data.image_size": "16", "data.prefetch": "1",
        "model.image.type": "vit", "model.image.variant": "mu/8", "model.image.pool": "gap",
        "model.image.stem": "patch",
        "model.text.variant": "mu", "model.text.pool": "eos", "model.embed_dim": "16",
        "text.max_len": "12", "text.vocab_size": "256", "tensorboard": "false"})
