"""DiffInject (docs/methods/diffinject.md), one package: ``stages`` declares the method, its config block
(``diffinject``) and its stages (``mine``, ``inject``, ``train/diffinject``); ``inject`` holds the tensor functions
(DDIM inversion, h-space recording and Slerp injection, the asymmetric step). Importing the package registers it."""

from raydebias.methods.diffinject.stages import DiffInjectConfig, plan_pairs

__all__ = ["DiffInjectConfig", "plan_pairs"]
