"""to_model_input: range, layout and a contiguous result (a channels-last strided input crashed oneDNN's
convolution backward with 2 threads in a 2,000-image probe training; the crash needs that workload to show, so
the guard here is the layout)."""

import numpy as np
import pytest
import torch

from raydebias.data.transforms import to_model_input


def test_to_model_input_range_layout_and_contiguity():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    x[0, ..., 0] = 255
    t = to_model_input(x)
    assert t.shape == (2, 3, 4, 4) and t.dtype == torch.float32 and t.is_contiguous()
    assert float(t[0, 0].min()) == 1.0 and float(t[0, 1].max()) == -1.0 and float(t[1].max()) == -1.0
    assert to_model_input(x[0]).shape == (1, 3, 4, 4)



def test_resize_uint8_keeps_same_size_and_averages_when_shrinking():
    from raydebias.data.transforms import resize_uint8

    x = np.zeros((2, 8, 8, 3), np.uint8)
    x[:, ::2] = 200  # alternate rows: a shrink by 2 averages them
    assert resize_uint8(x, 8) is x
    small = resize_uint8(x, 4)
    assert small.shape == (2, 4, 4, 3) and small.dtype == np.uint8
    assert np.all(small[:, 1:3] == 100) and abs(small.mean() - 100) < 1  # antialiased: rows averaged, not picked
    big = resize_uint8(np.full((1, 2, 2, 3), 77, np.uint8), 6)
    assert big.shape == (1, 6, 6, 3) and np.all(big == 77)


def test_pixels_of_the_wrong_size_name_their_row():
    from raydebias.data.transforms import pixels_from_column

    good, bad = bytes(4 * 4 * 3), bytes(2 * 2 * 3)
    assert pixels_from_column([good, good], 4).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="row 1: 12 bytes, expected 48"):
        pixels_from_column([good, bad, good], 4)
