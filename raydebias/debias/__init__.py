"""Classifier recipes (objective + sampler) and the Ray Train stage that trains them."""

from raydebias.debias.erm import ERM
from raydebias.debias.groupdro import GroupDRO

RECIPES = {"erm": ERM, "groupdro": GroupDRO}

__all__ = ["ERM", "GroupDRO", "RECIPES"]
