"""Generation of group-balanced synthetic data (``text2img.py``: group/cluster prompts, cross-group transfer)."""
