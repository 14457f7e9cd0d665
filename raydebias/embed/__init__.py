"""CLIP: the bootstrap/pretrained CLIP model (``clip`` stage) and image embeddings as a Ray Data stage (``embed``)."""
