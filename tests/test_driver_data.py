"""Architecture guard for the data path: no stage function decodes a pixel column in the driver or whole in a task.

Pixel columns are decoded by the streaming readers (``data/stream.py``: a part, a shuffle window, the rows a sampler
asked for), by Ray Data UDFs and actors (classes: ``__call__`` runs in a Ray worker) or by the Ray Train loop. A call
to :func:`load_split` (a whole split as arrays) or :func:`pixels_from_column` (a decoded pixel column) anywhere else
fails this test: in a stage function it would load a whole set in the driver, in a ``*_task`` function it would
move the whole set into one Ray task (the memory moved, it did not stream)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "raydebias"
CALLS = {"load_split", "pixels_from_column"}
# where the readers themselves live
DEFINITIONS = {"data/splits.py", "data/stream.py", "data/transforms.py"}
# functions that run in Ray workers: the Ray Train loop and Ray Data function UDFs
WORKER_FUNCTIONS = {("debias/train.py", "train_loop"), ("evaluate/predict.py", "_predict_parts")}


def _driver_calls() -> set[tuple[str, str]]:
    """(module, enclosing top-level function) of every pixel-reading call outside classes and worker functions."""
    found = set()
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(PKG))
        if rel in DEFINITIONS:
            continue
        tree = ast.parse(path.read_text())
        for top in tree.body:
            if isinstance(top, ast.ClassDef):  # Ray Data UDFs and actors: their methods run in Ray workers
                continue
            name = getattr(top, "name", "<module>")
            if (rel, name) in WORKER_FUNCTIONS:
                continue
            for node in ast.walk(top):
                if isinstance(node, ast.Call):
                    f = node.func
                    called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                    if called in CALLS:
                        found.add((rel, name))
    return found


def test_no_stage_decodes_a_pixel_column_outside_the_streaming_readers_and_workers():
    calls = _driver_calls()
    assert not calls, f"pixel columns read in the driver or whole in a task (stream them: data/stream.py, a Ray " \
                      f"Data UDF or actor): {sorted(calls)}"


def test_the_guard_sees_a_driver_side_read(tmp_path):
    """The scan flags a stage function that loads a split, and not the same call inside a UDF class."""
    mod = tmp_path / "raydebias"
    (mod / "toy").mkdir(parents=True)
    (mod / "toy" / "stage.py").write_text(
        "def run_toy(ctx):\n    return load_split(ctx.path, 32)\n\n"
        "class Udf:\n    def __call__(self, b):\n        return pixels_from_column(b, 32)\n")
    global PKG
    old, PKG = PKG, mod
    try:
        assert _driver_calls() == {("toy/stage.py", "run_toy")}
    finally:
        PKG = old
