"""to_model_input: range, layout and a contiguous result (a channels-last strided input crashed oneDNN's
convolution backward with 2 threads in a 2,000-image probe training; the crash needs that workload to show, so
the guard here is the layout)."""

import numpy as np
import torch

from raydebias.data.transforms import to_model_input


def test_to_model_input_range_layout_and_contiguity():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    x[0, ..., 0] = 255
    t = to_model_input(x)
    assert t.shape == (2, 3, 4, 4) and t.dtype == torch.float32 and t.is_contiguous()
    assert float(t[0, 0].min()) == 1.0 and float(t[0, 1].max()) == -1.0 and float(t[1].max()) == -1.0
    assert to_model_input(x[0]).shape == (1, 3, 4, 4)

