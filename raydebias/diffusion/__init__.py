"""Training of diffusion models (the bootstrap base text-to-image model: ``base.py``)."""
