"""Filtering of synthetic images: CLIP score (``clip_score.py``) and near-duplicates of real images (``dedup.py``)."""
