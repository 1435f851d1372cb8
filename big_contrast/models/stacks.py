"""Stacks of identical layers: rematerialisation under a named policy, and nn.scan, which
traces and compiles one layer for the whole stack (compile time no longer grows with depth).

A scanned stack stores each variable once with a leading axis of one entry per layer, named
LAYERS for the sharding rules (mapped to no mesh axis: every device holds every layer).
"""

from __future__ import annotations

import flax.linen as nn
import jax

LAYERS = "layers"

# What the backward pass may keep from a rematerialised layer's forward pass, by the names of
# jax.checkpoint_policies; 'nothing_saveable' (recompute the whole layer) is nn.remat's default.
REMAT_POLICIES = {
    "nothing_saveable": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_layer(layer_cls, remat: bool, policy: str = "nothing_saveable", static_argnums=(),
                scanned: bool = False):
    """``layer_cls``, or with ``remat`` its nn.remat under the named policy. Inside a scan the
    loop already keeps XLA from merging the recomputation away (prevent_cse is unneeded)."""
    if not remat:
        return layer_cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {list(REMAT_POLICIES)}")
    return nn.remat(layer_cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums,
                    prevent_cse=not scanned)


def scan_layers(body, length: int, in_axes=(), out_axes=0,
                collections=("params",)):
    """nn.scan of ``body(layer, carry, *args) -> (carry, out)`` over ``length`` layers whose
    ``collections`` are stacked on a leading LAYERS axis; parameter and dropout rngs differ
    per layer. ``in_axes``: per argument after the carry, nn.broadcast or the axis scanned."""
    return nn.scan(body, variable_axes={name: 0 for name in collections},
                   split_rngs={"params": True, "dropout": True}, in_axes=in_axes,
                   out_axes=out_axes, length=length,
                   metadata_params={nn.PARTITION_NAME: LAYERS})


def _residual_body(layer, carry, *args):
    return layer(carry, *args), None


def scan_residual(layer, x, length: int, *args, collections=("params",)):
    """Applies ``layer`` (an instance whose variables hold ``length`` stacked layers) that many
    times to x; the other ``args`` are the same for every layer."""
    scanned = scan_layers(_residual_body, length, in_axes=(nn.broadcast,) * len(args),
                          collections=collections)
    return scanned(layer, x, *args)[0]
