"""Row accounting of the Ray Data stages (generate, embed): exactly the planned rows, each once."""

import numpy as np
import pytest

from raydebias._internal.rows import exact_rows


def test_exact_rows_repairs_duplicates_and_extras():
    ids = np.array(["b", "a", "x", "a", "c", "b"], dtype=object)  # a retried batch wrote a and b twice; x is stale
    keep, repaired = exact_rows(ids, {"a", "b", "c"})
    assert sorted(ids[keep]) == ["a", "b", "c"] and len(keep) == 3
    assert repaired == {"duplicates": 2, "extra": 1}


def test_exact_rows_names_missing_rows():
    with pytest.raises(RuntimeError, match=r"2 planned rows are missing, e\.g\. \['d', 'e'\]"):
        exact_rows(np.array(["a", "b", "c"], dtype=object), {"a", "b", "c", "d", "e"})
