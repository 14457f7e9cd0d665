import numpy as np
from sklearn.metrics import adjusted_rand_score

from raydebias.cluster.kmeans import cluster_groups, k_rule, kmeans


def test_k_rule():
    assert k_rule({0: 400, 1: 100, 2: 3}, min_images=10) == 5  # smallest eligible group 100 → 100 // 20
    assert k_rule({0: 400, 1: 1000}, k_max=4, min_images=10) == 4
    assert k_rule({0: 5}, min_images=10) == 1
    assert k_rule({0: 400}, k=3) == 3


def blobs(n_per=40, k=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(d)[:k] * 5
    x = np.concatenate([c + rng.normal(0, 0.3, (n_per + 10 * i, d)) for i, c in enumerate(centers)])
    truth = np.concatenate([[i] * (n_per + 10 * i) for i in range(k)])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def test_kmeans_recovers_separated_clusters_largest_first():
    x, truth = blobs()
    ids = kmeans(x, 3, seed=0)
    assert adjusted_rand_score(truth, ids) == 1.0  # sklearn as an oracle for the partition
    assert np.bincount(ids).tolist() == sorted(np.bincount(truth).tolist(), reverse=True)


def test_cluster_groups_is_per_group():
    x, truth = blobs()
    groups = np.where(np.arange(len(x)) % 2 == 0, 0, 1)
    groups[:5] = 7  # a tiny group: no clustering
    out = cluster_groups(x, groups, k=3, min_images=10, seed=0)
    assert (out[groups == 7] == 0).all()
    for g in (0, 1):
        assert adjusted_rand_score(truth[groups == g], out[groups == g]) == 1.0
