"""Compute and parameter dtypes. Every module has ``dtype`` (what it computes in) and
``param_dtype`` (what its parameters are stored in) and hands both to its children; float32
statistics (LayerNorm, BatchNorm, attention softmax) and float32 embeddings for the losses are
the modules' own business."""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def of(module) -> dict:
    """{'dtype', 'param_dtype'} of a module, to pass on to its children."""
    return {"dtype": module.dtype, "param_dtype": module.param_dtype}


def from_config(model_cfg) -> dict:
    """{'dtype', 'param_dtype'} named by config.model.dtype and config.model.param_dtype."""
    return {"dtype": DTYPES[model_cfg.dtype], "param_dtype": DTYPES[model_cfg.param_dtype]}
