"""TIW (docs/methods/tiw.md), one package: ``stages`` declares the method, its config block (``tiw``) and its
``tiw`` stage with the measurement; ``objectives`` holds the time-dependent discriminator, the density ratio and the
DSM / TIW-DSM losses (the 2-D proof runs on them); ``train`` the image models and their Ray Train loop. Importing the
package registers it."""

from raydebias.methods.tiw.stages import TIWConfig, console_lines

__all__ = ["TIWConfig", "console_lines"]
