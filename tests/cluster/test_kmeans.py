import numpy as np
import pyarrow as pa
from sklearn.metrics import adjusted_rand_score

from raydebias.cluster.kmeans import k_rule, kmeans
from raydebias.cluster.stage import _cluster_group


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


def group_table(x, group, order):
    ids = [f"r{i:04d}" for i in range(len(x))]
    return pa.table({"id": pa.array(ids).take(order), "group": pa.array(np.full(len(x), group), pa.int64()).take(order),
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]).take(order)})


def test_a_group_is_clustered_whatever_order_its_rows_arrive_in():
    x, truth = blobs()
    rng = np.random.default_rng(1)
    a = _cluster_group(group_table(x, 4, np.arange(len(x))), k=3, min_images=10, seed=0, niter=25)
    b = _cluster_group(group_table(x, 4, rng.permutation(len(x))), k=3, min_images=10, seed=0, niter=25)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()  # sorted by id
    assert a.column("cluster").to_pylist() == b.column("cluster").to_pylist()
    assert adjusted_rand_score(truth, a.column("cluster").to_numpy()) == 1.0
    assert set(a.column("group").to_pylist()) == {4}
    small = _cluster_group(group_table(x[:5], 7, np.arange(5)), k=3, min_images=10, seed=0, niter=25)
    assert small.column("cluster").to_pylist() == [0] * 5  # below min_images: one cluster
