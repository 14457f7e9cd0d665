import numpy as np

from raydebias.evaluate.stage import headline_metric, method_row


def test_method_row_ignores_unknown_bias_for_groups_only():
    info = {"num_classes": 2, "num_bias": 2, "group_counts": {"train": [[8, 2], [1, 9]]}}
    y = np.array([0, 0, 1, 1, 0, 1])
    a = np.array([0, 1, 0, 1, -1, -1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9], [0.6, 0.4], [0.8, 0.2]])
    row = method_row(y, a, probs, info)
    # predictions 0,1,1,1,0,0 → overall 4/6 over all rows; groups: (0,0)=1, (0,1)=0, (1,0)=1, (1,1)=1
    assert abs(row["accuracy"] - 4 / 6) < 1e-9
    assert row["per_group"] == {"0,0": 1.0, "0,1": 0.0, "1,0": 1.0, "1,1": 1.0}
    assert row["wga"] == 0.0 and row["aga"] == 0.75
    assert row["conflicting_acc"] == 0.5 and row["aligned_acc"] == 1.0


def test_headline():
    assert headline_metric(4) == "wga" and headline_metric(100) == "aga"
