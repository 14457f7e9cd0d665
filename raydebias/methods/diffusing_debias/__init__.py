"""Diffusing DeBias (docs/methods/diffusing_debias.md), one package: ``stages`` declares Recipe I
(``diffusing_debias``) and Recipe II (``diffusing_debias_lff``), their config block (``ddb``) and the ``amplifier``
stage they share. Importing the package registers both."""

from raydebias.methods.diffusing_debias.stages import AMPLIFIED, DiffusingDebiasConfig

__all__ = ["AMPLIFIED", "DiffusingDebiasConfig"]
