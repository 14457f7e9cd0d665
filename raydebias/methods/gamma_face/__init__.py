"""GAMMA-FACE (docs/methods/gamma_face.md), one package: ``stages`` declares the method, its config block
(``gamma_face``) and its stages (``gmm``, ``train/gamma_face``); ``gmm`` holds the latent collection, the GMM fit with
K chosen by BIC and the sampling per component. Importing the package registers it."""

from raydebias.methods.gamma_face.stages import GammaFaceConfig

__all__ = ["GammaFaceConfig"]
