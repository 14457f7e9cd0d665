"""The diffusion stages' helpers: which images the conditioning guard measures on."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias.diffusion.base import guard_set

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
    train, val = _split(30, 0, 0), _split(12, 1, 100)
    _write(tmp_path / "stages" / "data" / "val.parquet", val)
    full = guard_set(tmp_path, INFO, "a {bias} {class}", True, 8, 0, train)
    assert full["split"] == "val" and len(full["x"]) == 8 and all("green" in c for c in full["captions"])
    assert any((full["x"][0] == v).all() for v in val["x"])
    # class-only captions of a biased split: val (group-balanced) contradicts them by design → train
    cls = guard_set(tmp_path, INFO, "a {class}", False, 8, 0, train)
    assert cls["split"] == "train" and any((cls["x"][0] == t).all() for t in train["x"])
    # val without bias labels cannot caption "{bias}" → train
    _write(tmp_path / "stages" / "data" / "val.parquet", {**val, "a": np.full(12, -1)})
    assert guard_set(tmp_path, INFO, "a {bias} {class}", True, 8, 0, train)["split"] == "train"
