"""Per-(y, a) k-means of CLIP image embeddings (faiss)."""
