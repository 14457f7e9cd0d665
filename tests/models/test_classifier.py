"""Classifier registry: every backbone builds and runs, unknown archs fail clearly, safetensors round trip."""

import json
import typing

import pytest
import torch

from raydebias._internal.io import save_weights
from raydebias.config import ClassifierModelConfig
from raydebias.models.classifier import Classifier, available, create_classifier, load_classifier

C = 5


def cfg(arch: str) -> ClassifierModelConfig:
    return ClassifierModelConfig(arch=arch, width=4)


def test_registry_matches_the_config_choices():
    """Every registered backbone must be selectable from a config, and every choice must be registered."""
    choices = set(typing.get_args(ClassifierModelConfig.model_fields["arch"].annotation))
    assert set(available()) == choices
    assert available() == sorted(available())
    assert {"resnet_small", "resnet18"} <= set(available())


@pytest.mark.parametrize("arch", available())
def test_forward_and_features_shapes(arch):
    torch.manual_seed(0)
    model = create_classifier(cfg(arch), C)
    assert isinstance(model, Classifier)
    model.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (2, C)
    assert feats.shape == (2, model.feat_dim)
    assert torch.isfinite(logits).all()
    # forward is exactly head ∘ features (what last-layer retraining relies on)
    torch.testing.assert_close(model.head(feats), logits)
    assert model.head.in_features == model.feat_dim and model.head.out_features == C


def test_resnet_small_trains_on_a_batch_of_two():
    """Train mode works on the smallest batch the train loop allows (BatchNorm) and gradients reach the stem."""
    torch.manual_seed(0)
    model = create_classifier(cfg("resnet_small"), C).train()
    model(torch.rand(2, 3, 32, 32) * 2 - 1).sum().backward()
    first = next(p for p in model.encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_resnet_small_width_sets_the_feature_dim():
    assert create_classifier(ClassifierModelConfig(arch="resnet_small", width=4), 2).feat_dim == 16
    assert create_classifier(ClassifierModelConfig(arch="resnet_small", width=8), 2).feat_dim == 32


def test_unknown_arch_names_the_available_ones():
    bad = ClassifierModelConfig.model_construct(arch="vit_huge", width=4)  # bypasses the Literal check
    with pytest.raises(ValueError, match="vit_huge") as exc:
        create_classifier(bad, 2)
    for name in available():
        assert name in str(exc.value)


@pytest.mark.parametrize("arch", available())
def test_safetensors_round_trip_gives_identical_outputs(arch, tmp_path):
    torch.manual_seed(1)
    model = create_classifier(cfg(arch), C)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))  # move the BatchNorm running stats away from their init
    model.eval()
    save_weights(tmp_path / "model.safetensors", model)  # as the train stage saves it, + meta.json
    (tmp_path / "meta.json").write_text(json.dumps({"classifier": cfg(arch).model_dump(), "num_classes": C}))

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(2)  # the fresh model built by load_classifier starts from a different init
    loaded, meta = load_classifier(tmp_path)
    assert not loaded.training
    assert meta["num_classes"] == C
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_cnn_keeps_a_4x4_map_at_any_image_size():
    """The ``cnn`` backbone flattens a 4×4 map (no global pooling): the feature size is 2w·16 for 32 px and for
    other sizes, and a pixel's position changes the features (global average pooling would not see a shift)."""
    torch.manual_seed(0)
    model = create_classifier(ClassifierModelConfig(arch="cnn", width=4), C).eval()
    assert model.feat_dim == 2 * 4 * 16
    for size in (32, 48, 28):
        assert model.features(torch.zeros(1, 3, size, size)).shape == (1, 128)
    a, b = torch.full((1, 3, 32, 32), -1.0), torch.full((1, 3, 32, 32), -1.0)
    a[..., 2:6, 2:6], b[..., 26:30, 26:30] = 1.0, 1.0
    with torch.no_grad():
        assert not torch.allclose(model.features(a), model.features(b))


def test_cnn_in_channels_last_computes_the_same_function():
    """The ``cnn`` backbone is built with channels_last conv weights (speed). The oracle is a float64 copy in the
    default layout: logits, features (flatten order) and every gradient agree to float32 precision."""
    import copy

    torch.manual_seed(0)
    model = create_classifier(ClassifierModelConfig(arch="cnn", width=8), C).train()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not all(m.weight.is_contiguous() for m in convs)
    ref = copy.deepcopy(model).to(memory_format=torch.contiguous_format).double()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    (logits, feats), (rl, rf) = model(x, return_features=True), ref(x.double(), return_features=True)
    torch.testing.assert_close(logits, rl.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats, rf.float(), rtol=1e-4, atol=1e-5)
    logits.square().sum().backward()
    rl.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert float((p.grad - q.grad.float()).norm() / q.grad.norm()) < 1e-4, name
