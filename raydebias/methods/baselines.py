"""Classifier baselines trained on real data only (docs/methods/baselines.md): ERM and GroupDRO."""

from __future__ import annotations

from raydebias.core import Method, Stage, ref, register
from raydebias.methods.shared import TRAIN_READS

BASELINES = ("erm", "groupdro")

_run_train = ref("raydebias.debias.train:run_train")


def stages(cfg, method: str) -> list[Stage]:
    return [Stage(f"train/{method}", "train", ("data",), lambda ctx: _run_train(ctx, method), reads=TRAIN_READS)]


for _name in BASELINES:
    register(Method(_name, lambda cfg, _m=_name: stages(cfg, _m), doc="docs/methods/baselines.md"))
