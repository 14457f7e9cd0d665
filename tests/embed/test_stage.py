"""The bootstrap CLIP trainer's streaming batch source (embed/stage.py)."""

import numpy as np

from raydebias.data.stream import write_parts
from raydebias.embed.stage import part_batches


def _parts(tmp_path, n=50, rows_per_part=7):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return x, write_parts(tmp_path / "train.parquet", {"x": x, "y": np.arange(n) % 3}, rows_per_part=rows_per_part)


def test_each_epoch_visits_every_row_once_in_full_batches_with_its_own_pixels(tmp_path):
    x, files = _parts(tmp_path)
    it = part_batches(files, 4, buffer_rows=20, seed=0)(8)
    epochs = []
    for _ in range(2):  # 50 rows, batches of 8: 6 full batches an epoch, the last 2 rows dropped
        seen = []
        for _ in range(6):
            idx, px = next(it)
            assert len(idx) == 8 and np.array_equal(px, x[idx])
            seen.extend(idx.tolist())
        assert len(set(seen)) == 48
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new shuffle each epoch
    again = part_batches(files, 4, buffer_rows=20, seed=0)(8)
    assert [next(again)[0].tolist() for _ in range(6)] == [epochs[0][i:i + 8] for i in range(0, 48, 8)]


def test_a_stream_source_trains_the_clip(tmp_path):
    """The trainer fed by the stream lowers the contrastive loss (4 captions, each a bright quadrant)."""
    from raydebias.config import ClipModelConfig
    from raydebias.models.clip import create_clip, train_bootstrap_clip

    rng = np.random.default_rng(1)
    y = np.arange(64) % 4
    x = np.zeros((64, 16, 16, 3), np.uint8)
    for i, c in enumerate(y):
        x[i, (c // 2) * 8:(c // 2) * 8 + 8, (c % 2) * 8:(c % 2) * 8 + 8] = 200
    x = np.clip(x.astype(int) + rng.integers(0, 30, x.shape), 0, 255).astype(np.uint8)
    files = write_parts(tmp_path / "t.parquet", {"x": x, "y": y}, rows_per_part=16)
    caps = [f"a photo of a {'abcd'[c]}" for c in y]
    enc = create_clip(ClipModelConfig(width=32, layers=1, patch_size=8, embed_dim=16), "bootstrap", 16)
    res = train_bootstrap_clip(enc, part_batches(files, 16, buffer_rows=64, seed=0), caps, steps=60, batch_size=16,
                               lr=2e-3, seed=0, log=None)
    assert res["loss_last"] < res["loss_first"] - 0.3, res
