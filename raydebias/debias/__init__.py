"""Classifier recipes (objective + sampler) and the Ray Train stage that trains them."""

from raydebias.debias.erm import ERM
from raydebias.debias.groupdro import GroupDRO
from raydebias.debias.lff import GCE, FrozenBiasLfF
from raydebias.debias.two_stage import SupConCE

RECIPES = {"erm": ERM, "groupdro": GroupDRO, "supcon_ce": SupConCE, "gce": GCE, "lff_frozen": FrozenBiasLfF}

__all__ = ["ERM", "GroupDRO", "SupConCE", "GCE", "FrozenBiasLfF", "RECIPES"]
