from pathlib import Path

import pytest
import yaml

from raydebias.cli import main
from raydebias.config import ConfigError, RunConfig, apply_overrides, dump_config, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "raydebias" / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"demo", "full", "diffusing_debias", "diffinject", "gamma_face", "tiw"}


def test_every_method_has_its_config():
    from raydebias.core import registered

    METHODS = registered()

    methods = {m for p in CONFIGS for m in load_config(p).methods}
    assert set(METHODS) - {"vanilla", "lora", "dreambooth"} <= methods  # those three: one switch of CDB's config


def test_gamma_face_labeler_must_be_trained_in_the_run():
    with pytest.raises(ConfigError, match="gamma_face.labeler"):
        load_config(None, ["method=gamma_face", "baselines=[groupdro]"])
    assert load_config(None, ["method=gamma_face", "baselines=[groupdro]", "gamma_face.labeler=groupdro"])


def test_graph_orders_gamma_face_after_its_labeler_and_tiw_has_no_classifier():
    from raydebias.pipeline import build_graph

    cfg = load_config(None, ["method=gamma_face", "baselines=[tiw, diffinject, erm]"])
    names = [n.name for n in build_graph(cfg)]
    assert names.index("train/erm") < names.index("gmm") < names.index("train/gamma_face")
    assert names.count("class_diffusion") == 1 and "train/tiw" not in names and "tiw" in names
    assert names.index("mine") < names.index("inject") < names.index("train/diffinject")
    evaluate = next(n for n in build_graph(cfg) if n.name == "evaluate")
    assert "tiw" in evaluate.deps and "train/gamma_face" in evaluate.deps


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # Round trip: the resolved YAML written to the run dir loads back to the same config.
    again = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_defaults_are_complete():
    cfg = load_config(None)
    assert cfg.stages[0] == "data" and cfg.stages[-2:] == ["evaluate", "report"]
    assert cfg.methods == ["erm", "groupdro"]


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epoch: 3\nmodels:\n  classifer: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.epoch: unknown key" in msg
    assert "models.classifer: unknown key" in msg


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(None, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, ["stages=[data, trian]"])
    with pytest.raises(ConfigError, match="unknown method"):
        load_config(None, ["method=magic"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="5000"):
        load_config(None, ["data.builtin.n_train=4900"])


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.epochs=3", "train.lr=0.01", "data.uri=s3://b/x.parquet",
                             "data.class_names=[a, b]", "ray.address=auto", "stages=[evaluate, data]"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.01
    assert cfg.data.uri == "s3://b/x.parquet" and cfg.data.class_names == ["a", "b"]
    assert cfg.ray.address == "auto"
    assert cfg.stages == ["data", "evaluate"]  # put in dependency order
    assert apply_overrides({}, ["a.b.c=null"]) == {"a": {"b": {"c": None}}}


def test_validate_cli(tmp_path, capsys):
    assert main(["validate", str(CONFIGS[0])]) == 0
    out = capsys.readouterr().out
    assert "run_dir:" in out and "train:" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense_key: 1\n")
    assert main(["validate", str(bad)]) == 2
    assert "nonsense_key: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("override,key", [
    ("train.epochs=true", "train.epochs"),  # no bool → int coercion
    ("train.epochs='3'", "train.epochs"),  # no str → int coercion
    ("train.lr='0.1'", "train.lr"),
    ("cluster.k=0", "cluster.k"),
    ("cluster.k=-5", "cluster.k"),
    ("models.diffusion.resolution=0", "models.diffusion.resolution"),
    ("models.diffusion.block_out_channels=[]", "models.diffusion.block_out_channels"),
    ("models.diffusion.block_out_channels=[12, 32]", "models.diffusion.block_out_channels"),
    ("models.clip.width=0", "models.clip.width"),
    ("seed=-1", "seed"),
    ("run_dir=''", "run_dir"),
    ("data.prompt_template='a photo of a {bias} thing'", "data.prompt_template"),
    ("data.prompt_template='a {colour} {class}'", "data.prompt_template"),
    ("class_diffusion.prompt_template='a photo'", "class_diffusion.prompt_template"),
    ("filter.label_prompt='a photo'", "filter.label_prompt"),
])
def test_meaningless_values_are_rejected(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS[0].parent / "demo.yaml", [override])
    assert key in str(e.value)


def test_filter_bias_check_needs_the_group_prompt():
    demo = CONFIGS[0].parent / "demo.yaml"
    with pytest.raises(ConfigError, match=r"filter(.|\n)*needs \{bias\} in label_prompt"):
        load_config(demo, ["filter.bias_check=true", "filter.label_prompt='a photo of a {class}'"])
    assert load_config(demo, ["filter.bias_check=true"]).filter.bias_check


def test_pretrained_source_needs_existing_weights(tmp_path):
    demo = CONFIGS[0].parent / "demo.yaml"
    with pytest.raises(ConfigError, match="models.diffusion.pretrained is required"):
        load_config(demo, ["models.source=pretrained"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(demo, ["models.source=pretrained", f"models.diffusion.pretrained={tmp_path}/nope",
                           "models.clip.pretrained=laion2b_s34b_b79k"])
    (tmp_path / "sd").mkdir()
    cfg = load_config(demo, ["models.source=pretrained", f"models.diffusion.pretrained={tmp_path}/sd",
                             "models.clip.pretrained=org/a-hub-id"])  # hub ids resolve from the local cache later
    assert cfg.models.diffusion.pretrained == f"{tmp_path}/sd"
    # a run without a generative method needs no weights
    assert load_config(demo, ["models.source=pretrained", "method=groupdro"]).models.source == "pretrained"


def test_validate_builds_the_graph(tmp_path, capsys):
    demo = CONFIGS[0].parent / "demo.yaml"
    severe = CONFIGS[0].parent / "colored_mnist_severe.yaml"  # stages [data, train, evaluate, report]
    assert main(["validate", str(severe), "--set", "method=diffinject", "--set", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "'train/diffinject' needs 'inject'" in err and "add 'inject' to `stages`" in err
    assert main(["validate", str(demo), "--set", f"run_dir={tmp_path}"]) == 0
