"""Objectives by config name; adding one is a new module plus an entry here."""

from big_contrast.objectives.base import Objective
from big_contrast.objectives.coca import CoCa
from big_contrast.objectives.contrastive import Contrastive
from big_contrast.objectives.simclr import SimCLR
from big_contrast.objectives.swav import SwAV

OBJECTIVES = {"contrastive": Contrastive, "coca": CoCa, "simclr": SimCLR, "swav": SwAV}


def build_objective(config, tokenizer) -> Objective:
    if config.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {config.objective!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[config.objective](config, tokenizer)


__all__ = ["Objective", "OBJECTIVES", "build_objective"]
