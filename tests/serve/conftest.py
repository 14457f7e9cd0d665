import json

import numpy as np
import pytest
import torch

from raydebias._internal.io import save_weights
from raydebias.config import ClassifierModelConfig, ColoredMNISTConfig
from raydebias.data.builtin.colored_mnist import CLASS_NAMES, build_colored_mnist
from raydebias.data.transforms import decode_image, to_model_input
from raydebias.models.classifier import create_classifier


@pytest.fixture(scope="session")
def served_run(tmp_path_factory):
    """A run directory with a (briefly trained) classifier, metrics.json and config.yaml — what serve reads."""
    run_dir = tmp_path_factory.mktemp("served") / "demo"
    mdir = run_dir / "stages" / "train" / "groupdro"
    mdir.mkdir(parents=True)
    t = build_colored_mnist(ColoredMNISTConfig(n_train=256, n_val=10, n_test=10)).to_pydict()
    x = np.stack([decode_image(b, 32, 10**6) for b in t["image"][:256]])
    y = torch.as_tensor(t["label"][:256])
    torch.manual_seed(0)
    cfg = ClassifierModelConfig(width=8)
    model = create_classifier(cfg, 10)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(to_model_input(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_weights(mdir / "model.safetensors", model)  # as the train stage saves it
    (mdir / "meta.json").write_text(json.dumps({
        "method": "groupdro", "classifier": cfg.model_dump(), "num_classes": 10, "class_names": CLASS_NAMES,
        "image_size": 32, "best_epoch": 1}))
    (run_dir / "config.yaml").write_text("method: groupdro\n")
    (run_dir / "metrics.json").write_text(json.dumps({
        "run_id": "demo", "headline": "aga",
        "rows": [{"method": "groupdro", "accuracy": 0.5, "wga": 0.1, "aga": 0.45, "per_group": {"0,0": 0.9}}]}))
    return run_dir


@pytest.fixture(scope="session")
def sample_pngs():
    t = build_colored_mnist(ColoredMNISTConfig(n_train=10, n_val=10, n_test=10)).to_pydict()
    return t["image"][-20:]
