"""Classifier baselines trained on real data only (docs/methods/baselines.md): ERM and GroupDRO."""

from __future__ import annotations

from raydebias.core import Method, Stage, register
from raydebias.debias.train import run_train
from raydebias.methods.shared import TRAIN_READS

BASELINES = ("erm", "groupdro")


def _baseline(name: str) -> Method:
    def stages(cfg) -> list[Stage]:
        return [Stage(f"train/{name}", "train", ("data",), lambda ctx: run_train(ctx, name), reads=TRAIN_READS)]

    return register(Method(name, stages, doc="docs/methods/baselines.md"))


for _name in BASELINES:
    _baseline(_name)
