"""One module per method; importing this package registers them all (README, "Add a method")."""

from raydebias.core import get_method, registered
from raydebias.methods import baselines, diffinject, diffusing_debias, gamma_face, harnessing, tiw  # noqa: F401

__all__ = ["get_method", "registered"]
