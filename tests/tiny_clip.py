"""A tiny CLIP for tests: configs/clip.py:demo shrunk to about a second per step.

Arguments: the image tower, 'vit' (default, no batch norm), 'convnet' or 'efficientnet' (both
with batch statistics in the model state); 'retrieval' declares one retrieval evaluator on
'val' (it works for any source with captions, e.g. a manifest); otherwise no evaluators run.
'heads_replicated' keeps the attention heads (2 per layer) off the 'model' mesh axis, so a
4-wide 'model' axis splits only the MLP, vocabulary and embedding widths. E.g.
'tests/tiny_clip.py:convnet,retrieval'.
"""

import os

from big_contrast import config as bc

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "configs", "clip.py:demo")

_TOWERS = {
    "vit": {"model.image.type": "vit", "model.image.variant": "mu/8", "model.image.pool": "gap",
            "model.image.stem": "patch"},
    "convnet": {"model.image.type": "convnet", "model.image.variant": "8x1,16",
                "model.image.stem": "none", "model.image.norm": "batch",
                "model.image.pool": "gap"},
    "efficientnet": {"model.image.type": "efficientnet", "model.image.variant": "tiny",
                     "model.image.stem": "stride2", "model.image.pool": "gap"},
}


def get_config(arg=None):
    arg = bc.parse_arg(arg, tower="vit", retrieval=False, heads_replicated=False)
    if arg.tower not in _TOWERS:
        raise bc.ConfigError(f"tiny_clip tower must be one of {list(_TOWERS)}, got {arg.tower!r}")
    config = bc.load_config_file(_DEMO)
    config.evals = {}
    if arg.retrieval:
        config.evals = {"retrieval_val": {"type": "retrieval", "every": 0, "split": "val",
                                          "num_examples": 200}}
    config.eval_batch_size = 64
    if arg.heads_replicated:
        config.sharding_rules = [[name, None if name == "heads" else axis]
                                 for name, axis in config.sharding_rules]
    return bc.apply_overrides(config, {
        "batch_size": "16", "total_steps": "6", "log_every": "1", "checkpoint_every": "3",
        "optim.warmup_steps": "2", "data.image_size": "16", "data.prefetch": "1",
        **_TOWERS[arg.tower],
        "model.text.variant": "mu", "model.text.pool": "eos", "model.embed_dim": "16",
        "text.max_len": "12", "text.vocab_size": "256", "tensorboard": "false",
        "ema_decay": "0"})
