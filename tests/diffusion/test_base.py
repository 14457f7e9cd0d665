"""The diffusion stages' helpers: which images the conditioning guard measures on, group-balanced word dropout."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias.debias.groupdro import group_mixture_probs
from raydebias.diffusion.base import balanced_dropout_scale, guard_set, word_dropout

INFO = {"image_size": 4, "class_names": ["zero", "one"], "bias_names": ["red", "green"]}


def _split(n: int, bias: int, offset: int) -> dict:
    rng = np.random.default_rng(offset)
    return {"id": np.array([f"r{offset + i}" for i in range(n)], dtype=object), "y": rng.integers(0, 2, n),
            "a": np.full(n, bias), "x": rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)}


def _write(path, s: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": s["id"].tolist(), "label": s["y"], "bias": s["a"],
                             "pixels": [x.tobytes() for x in s["x"]]}), path)


def test_guard_measures_on_val_only_when_the_captions_name_every_factor(tmp_path):
    from raydebias.data.stream import PartSet

    train, val = _split(30, 0, 0), _split(12, 1, 100)
    _write(tmp_path / "stages" / "data" / "train.parquet", train)
    _write(tmp_path / "stages" / "data" / "val.parquet", val)
    train_set = PartSet.open([str(tmp_path / "stages" / "data" / "train.parquet")])
    full = guard_set(tmp_path, INFO, "a {bias} {class}", True, 8, 0, train_set)
    assert full["split"] == "val" and len(full["x"]) == 8 and all("green" in c for c in full["captions"])
    assert any((full["x"][0] == v).all() for v in val["x"])
    # class-only captions of a biased split: val (group-balanced) contradicts them by design → train
    cls = guard_set(tmp_path, INFO, "a {class}", False, 8, 0, train_set)
    assert cls["split"] == "train" and any((cls["x"][0] == t).all() for t in train["x"])
    # val without bias labels cannot caption "{bias}" → train
    _write(tmp_path / "stages" / "data" / "val.parquet", {**val, "a": np.full(12, -1)})
    assert guard_set(tmp_path, INFO, "a {bias} {class}", True, 8, 0, train_set)["split"] == "train"


def test_balanced_word_dropout_keeps_the_rate_and_draws_dropped_captions_group_balanced():
    # 99 % aligned: group 0·2+0 and 1·2+1 hold 99 rows each, the two conflicting groups 1 row each
    y = np.array([0] * 100 + [1] * 100)
    a = np.array([0] * 99 + [1] + [1] * 99 + [0])
    groups = y * 2 + a
    draw = group_mixture_probs(groups, 0.5)
    scale = balanced_dropout_scale(groups, draw)
    m = {g: draw[groups == g].sum() for g in scale}
    assert abs(sum(m[g] * scale[g] for g in scale) - 1.0) < 1e-9  # same average rate
    assert scale[1] > 1.9 and scale[0] < 0.7  # the rare pairing drops words more often, the common one less
    fn = word_dropout("a {bias} {class}", INFO["class_names"], INFO["bias_names"], 0.0, 0.0, p_bias=0.3,
                      group_scale=scale)
    rng = np.random.default_rng(0)
    draws = rng.choice(len(groups), 20_000, p=draw)
    dropped = np.array([fn(f"a {INFO['bias_names'][a[i]]} {INFO['class_names'][y[i]]}", rng, int(y[i]), int(a[i]))
                        == f"a {INFO['class_names'][y[i]]}" for i in draws])
    assert abs(dropped.mean() - 0.3) < 0.02
    # the captions that lost the bias word: each of the 4 groups a quarter of the time (plain dropout: the two rare
    # groups together ≈ 0.26, their share of the draws)
    share = np.bincount(groups[draws[dropped]], minlength=4) / dropped.sum()
    assert np.allclose(share, 0.25, atol=0.03)
    plain = word_dropout("a {bias} {class}", INFO["class_names"], INFO["bias_names"], 0.0, 0.0, p_bias=0.3)
    lost = np.array([plain(f"a {INFO['bias_names'][a[i]]} {INFO['class_names'][y[i]]}", rng, int(y[i]), int(a[i]))
                     == f"a {INFO['class_names'][y[i]]}" for i in draws])
    assert np.bincount(groups[draws[lost]], minlength=4)[[1, 2]].sum() / lost.sum() < 0.3
