"""Stage/method declarations: every configured method is registered and self-consistent, cache keys come from
the config models (resource fields left out), the graph sorts topologically."""

from pathlib import Path

import pytest

from raydebias.config import ConfigError, dump_config, load_config
from raydebias.core import Stage, config_key, get_method, registered, toposort
from raydebias.methods import get_method as get_registered
from raydebias.pipeline import build_graph


METHODS = ("erm", "groupdro", "vanilla", "lora", "dreambooth", "clustered_dreambooth", "diffusing_debias",
           "diffusing_debias_lff", "diffinject", "gamma_face", "tiw")


def test_every_configurable_method_is_registered_with_its_result_node():
    load_config(None, [])  # validating a config discovers every method module
    assert set(registered()) == set(METHODS)
    cfg = load_config(None, [])
    for name in METHODS:
        m = get_registered(name)
        stages = m.stages(cfg)
        names = [s.name for s in stages]
        assert len(names) == len(set(names)), name
        assert m.result_node in names, (name, names)
        assert set(m.shared) <= {"clip", "embed", "cluster", "diffusion", "class_diffusion"}


def test_unknown_method_is_a_clear_error():
    with pytest.raises(KeyError, match="no method 'nope' registered"):
        get_method("nope")


def _stage(cfg, name):
    return next(s for s in build_graph(cfg) if s.name == name)


def test_resource_fields_never_change_a_key_and_read_fields_do():
    base = load_config(None, ["method=clustered_dreambooth"])
    gen = _stage(base, "generate/clustered_dreambooth")
    key = gen.config_key(base)
    for resource in ("generate.num_actors=7", "generate.cpus_per_actor=0.5", "generate.batch_size=3"):
        assert gen.config_key(load_config(None, ["method=clustered_dreambooth", resource])) == key, resource
    for read in ("generate.guidance_scale=9", "seed=3", "finetune.identifier=xyz"):
        assert gen.config_key(load_config(None, ["method=clustered_dreambooth", read])) != key, read
    # the diffusion stage: checkpoint cadence and CPUs are resources, the guard is not
    diff = _stage(base, "diffusion")
    k = diff.config_key(base)
    assert diff.config_key(load_config(None, ["method=clustered_dreambooth", "diffusion.checkpoint_every=10",
                                              "diffusion.num_cpus=1"])) == k
    assert diff.config_key(load_config(None, ["method=clustered_dreambooth", "diffusion.guard_ratio=0.3"])) != k


def test_excluded_paths_are_removed_and_unknown_ones_rejected():
    cfg = load_config(None, [])
    k = config_key(cfg, ("train", "-train.epochs", "seed"))
    assert "epochs" not in k["train"] and "lr" in k["train"] and k["seed"] == 0
    with pytest.raises(KeyError, match="not inside any path"):
        config_key(cfg, ("seed", "-train.epochs"))
    with pytest.raises(KeyError, match="no field"):
        config_key(cfg, ("train", "-train.nonsense"))


def test_class_diffusion_ignores_the_base_model_schedule_but_amplifier_reads_the_classifier():
    cfg = load_config(None, ["method=diffusing_debias"])
    class_diffusion, amp = _stage(cfg, "class_diffusion"), _stage(cfg, "amplifier")
    changed = load_config(None, ["method=diffusing_debias", "diffusion.steps=7", "train.epochs=1"])
    assert class_diffusion.config_key(changed) == class_diffusion.config_key(cfg)  # it trains class_diffusion.steps
    assert amp.config_key(changed) == amp.config_key(cfg)  # the amplifier's epochs are its own
    own = load_config(None, ["method=diffusing_debias", "class_diffusion.steps=7"])
    assert class_diffusion.config_key(own) != class_diffusion.config_key(cfg)
    assert amp.config_key(own) == amp.config_key(cfg)  # the amplifier waits for the new model, its key is unchanged
    captions = load_config(None, ["method=diffusing_debias", "class_diffusion.prompt_template='a {class}'"])
    assert amp.config_key(captions) != amp.config_key(cfg)  # its prompts are the model's captions
    assert amp.config_key(load_config(None, ["method=diffusing_debias", "train.lr=0.1"])) != amp.config_key(cfg)


def test_toposort_keeps_declaration_order_and_rejects_cycles():
    def s(name, *deps):
        return Stage(name, "train", deps, run=lambda ctx: None)

    order = toposort([s("b", "a"), s("a"), s("c"), s("d", "b", "outside")])
    assert [x.name for x in order] == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="cycle"):
        toposort([s("x", "y"), s("y", "x")])


def test_a_stage_two_methods_share_runs_once():
    cfg = load_config(None, ["method=diffusing_debias", "baselines=[diffusing_debias_lff, erm]"])
    names = [s.name for s in build_graph(cfg)]
    assert names.count("amplifier") == 1 and names.count("class_diffusion") == 1
    assert names.index("amplifier") < names.index("train/diffusing_debias")


def test_the_edited_model_follows_the_model_source(tmp_path):
    """DiffInject and GAMMA-FACE edit the pretrained base model when there is one (the ``diffusion`` stage joins
    the graph as their dependency, no ``class_diffusion`` is trained) and the in-run ``class_diffusion`` model otherwise; Diffusing
    DeBias always trains its own."""
    (tmp_path / "sd").mkdir()
    base = ["method=diffinject", "baselines=[gamma_face, erm]", "gamma_face.labeler=erm",
            "stages=[data,diffusion,class_diffusion,amplifier,mine,inject,train,gmm,evaluate,report]"]
    deps = lambda cfg: {s.name: s.deps for s in build_graph(cfg)}  # noqa: E731
    boot = deps(load_config(None, base))
    assert "class_diffusion" in boot["inject"] and "class_diffusion" in boot["gmm"] and "diffusion" not in boot
    pre = deps(load_config(None, [*base, "models.source=pretrained", f"models.diffusion.pretrained={tmp_path}/sd"]))
    assert "diffusion" in pre["inject"] and "diffusion" in pre["gmm"] and "class_diffusion" not in pre
    ddb = deps(load_config(None, ["method=diffusing_debias", "baselines=[diffinject]", "models.source=pretrained",
                                  f"models.diffusion.pretrained={tmp_path}/sd", *base[-1:]]))
    assert "class_diffusion" in ddb["amplifier"] and "diffusion" in ddb["inject"]


def test_method_blocks_are_declared_by_their_methods_and_validated_there():
    from raydebias.core.registry import method_blocks
    from raydebias.methods.diffinject import DiffInjectConfig

    blocks = method_blocks()
    assert blocks["diffinject"] is DiffInjectConfig and get_method("diffinject").config == ("diffinject", DiffInjectConfig)
    assert blocks["ddb"] is get_method("diffusing_debias").config[1] is get_method("diffusing_debias_lff").config[1]
    with pytest.raises(ConfigError, match=r"diffinject\.gamma: Input should be less than or equal to 1"):
        load_config(None, ["diffinject.gamma=2"])
    with pytest.raises(ConfigError, match=r"diffinjekt: unknown key"):
        load_config(None, ["diffinjekt.gamma=0.3"])
    with pytest.raises(ConfigError, match=r"tiw\.steps: unknown key|tiw\.stepz: unknown key"):
        load_config(None, ["tiw.stepz=3"])
    cfg = load_config(None, ["method=diffinject", "diffinject.gamma=0.5"])
    assert isinstance(cfg.diffinject, DiffInjectConfig) and cfg.diffinject.gamma == 0.5
    # the resolved config (what the run dir's config.yaml holds) validates to the same config
    import yaml

    again = load_config(None, [])
    again = type(cfg).model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg and again.diffinject.gamma == 0.5


def test_a_method_key_no_method_of_the_run_reads_is_named(tmp_path, capsys):
    """A non-default key of a block that no method of the run reads would do nothing: given with ``--set`` it is
    an error naming it; coming from the config file (a multi-method config run with fewer methods) a warning."""
    from raydebias.cli import main
    from raydebias.pipeline import unused_method_keys

    assert unused_method_keys(load_config("raydebias/configs/demo.yaml", ["diffinject.gamma=0.5"])) == [
        "diffinject.gamma=0.5"]
    # the class-conditional model's keys left Diffusing DeBias's block: the error says where they are
    with pytest.raises(ConfigError, match=r"steps, lr: the class-conditional model's settings are in their own "
                                          r"block: class_diffusion\.steps, class_diffusion\.lr"):
        load_config("raydebias/configs/diffinject.yaml", ["ddb.steps=10", "ddb.lr=0.1"])
    # a resolved config spells every block out at its defaults: nothing to report
    import yaml

    cfg = load_config("raydebias/configs/demo.yaml")
    assert unused_method_keys(type(cfg).model_validate(yaml.safe_load(dump_config(cfg)))) == []
    run = ["--set", f"run_dir={tmp_path}"]
    assert main(["validate", "raydebias/configs/demo.yaml", "--set", "diffinject.gamma=0.5", *run]) == 2
    assert "--set diffinject.gamma=0.5: no method of this run (clustered_dreambooth, erm, groupdro)" in \
        capsys.readouterr().err
    # full.yaml (with a non-default amplifier guidance) run with DiffInject alone on a pretrained base model: no
    # class_diffusion model is trained, so the file's ddb.guidance_scale does nothing — a warning, the run goes on
    (tmp_path / "sd").mkdir()
    text = Path("raydebias/configs/full.yaml").read_text()
    assert "guidance_scale: 2.0, amplifier_epochs" in text
    (tmp_path / "full.yaml").write_text(text.replace("guidance_scale: 2.0, amplifier_epochs",
                                                     "guidance_scale: 3.0, amplifier_epochs"))
    assert main(["validate", str(tmp_path / "full.yaml"), "--set", "method=diffinject", "--set", "baselines=[erm]",
                 "--set", "models.source=pretrained", "--set", f"models.diffusion.pretrained={tmp_path}/sd",
                 "--set", "stages=[data,diffusion,mine,inject,train,evaluate,report]", *run]) == 0
    assert "# warning: no method of this run reads ddb.guidance_scale=3.0" in capsys.readouterr().err


def test_a_method_is_one_module(monkeypatch, tmp_path, capsys):
    """What "add a method" means: a module that declares a block and registers a method — nothing else edited —
    and the config accepts, validates and dumps its block, and builds its graph."""
    from pydantic import Field

    import raydebias.core.registry as registry
    from raydebias.config import Block
    from raydebias.core import Method, register
    from raydebias.methods.shared import TRAIN_READS

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # registered for this test only

    class ToyConfig(Block):
        strength: float = Field(0.5, ge=0, le=1)

    def stages(cfg):  # a new kind of stage ("distill") feeding the method's classifier
        return [Stage("distill", "distill", ("data",), run=lambda ctx: None, reads=("toy",)),
                Stage("train/toy", "train", ("distill", "data"), run=lambda ctx: None, reads=(*TRAIN_READS, "toy"))]

    register(Method("toy", stages, kinds=("distill", "train"), config=("toy", ToyConfig),
                    console=lambda metrics: [f"toy strength {metrics['toy']}"] if "toy" in metrics else []))
    cfg = load_config(None, ["method=toy", "baselines=[erm]", "toy.strength=0.9"])
    assert cfg.toy.strength == 0.9 and "toy" in dump_config(cfg)
    assert "distill" in cfg.stages  # the default runs every declared kind
    assert [s.name for s in build_graph(cfg)] == ["data", "distill", "train/toy", "train/erm", "evaluate", "report"]
    only_train = load_config(None, ["method=toy", "baselines=[erm]", "stages=[data, distill, train]"])
    assert [s.name for s in build_graph(only_train)] == ["data", "distill", "train/toy", "train/erm"]
    with pytest.raises(ConfigError, match=r"toy\.strength"):
        load_config(None, ["method=toy", "toy.strength=3"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, ["method=toy", "stages=[data, distil]"])
    # its console lines come under the results table without an edit of the CLI
    import json

    from raydebias.cli import _print_table

    (tmp_path / "metrics.json").write_text(json.dumps({"headline": "aga", "headline_description": "d", "rows": [],
                                                      "toy": 0.9}))
    _print_table(tmp_path)
    assert "toy strength 0.9" in capsys.readouterr().out


def test_a_stage_of_an_undeclared_kind_is_an_error_not_dropped(monkeypatch):
    import raydebias.core.registry as registry
    from raydebias.core import Method, register
    from raydebias.methods.shared import TRAIN_READS

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    register(Method("toy2", lambda cfg: [Stage("sketch", "sketch", ("data",), run=lambda ctx: None),
                                         Stage("train/toy2", "train", ("sketch", "data"), run=lambda ctx: None,
                                               reads=TRAIN_READS)]))
    with pytest.raises(ValueError, match="sketch"):
        build_graph(load_config(None, ["method=toy2", "baselines=[]"]))


def test_every_stage_kind_is_declared():
    """Each method's stages use only the building blocks' kinds and the kinds it declares."""
    from raydebias.core.registry import BUILDING_BLOCKS, FINAL_KINDS

    cfg = load_config(None, [])
    for name in METHODS:
        m = get_method(name)
        assert {s.kind for s in m.stages(cfg)} <= set(m.kinds) | set(BUILDING_BLOCKS) | set(FINAL_KINDS), name


def test_validating_a_config_and_building_its_graph_import_no_algorithm_code():
    """Every Ray worker that receives the run's config validates it, which registers every method (their blocks),
    and ``raydebias validate`` builds the graph: neither may import torch, Ray, the diffusion, CLIP, clustering or
    plotting stacks, or any stage's code (seconds per process) — only the config, the core and the methods'
    declarations."""
    import subprocess
    import sys

    code = ("import sys\nfrom raydebias.config import RunConfig, load_config\nfrom raydebias.pipeline import check_graph\n"
            "c = load_config('raydebias/configs/full.yaml')\nRunConfig.model_validate_json(c.model_dump_json())\n"
            "check_graph(c)\n"
            "print(sorted(m for m in ('torch', 'ray', 'sklearn', 'transformers', 'peft', 'open_clip', 'faiss', "
            "'matplotlib', 'diffusers') if m in sys.modules))\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith('raydebias.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__import__("pathlib").Path(__file__).parents[2])
    heavy, ours = out.stdout.strip().splitlines()
    assert heavy == "[]", out.stdout + out.stderr
    light = ("raydebias._internal", "raydebias._internal.io", "raydebias._internal.ray_utils", "raydebias.config", "raydebias.core",
             "raydebias.core.context", "raydebias.core.registry", "raydebias.methods", "raydebias.methods.shared",
             "raydebias.methods.baselines", "raydebias.pipeline")
    loaded = ours.split(",")
    assert [m for m in loaded if m not in light and not (m.startswith("raydebias.methods.")
                                                          and m.count(".") == 2 or m.endswith(".config"))] == []
    assert "raydebias.methods.diffinject.config" in loaded and "raydebias.methods.diffinject.stages" not in loaded


def test_a_ref_imports_its_function_when_called():
    """``ref("module:function")``: equal refs for one function (evaluate runs a shared function once), the module
    imported at the first call, a malformed target refused at declaration."""
    import subprocess
    import sys

    from raydebias.core import ref

    assert ref("json:dumps") == ref("json:dumps") and len({ref("json:dumps"), ref("json:dumps")}) == 1
    assert ref("json:dumps")([1]) == "[1]"
    with pytest.raises(ValueError, match="package.module:function"):
        ref("json.dumps")
    code = ("import sys\nfrom raydebias.core import ref\nr = ref('raydebias.methods.tiw.stages:console_lines')\n"
            "print('raydebias.methods.tiw.stages' in sys.modules, r({}) == [], "
            "'raydebias.methods.tiw.stages' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"], out.stdout + out.stderr


def test_the_graph_builds_after_the_stage_modules_are_imported():
    """A package's ``__init__`` that named its graph function after its ``stages`` submodule would lose it to the
    submodule once that is imported (Python binds ``package.stages``): build the graph of every method with all
    stage modules loaded."""
    import importlib

    from raydebias.core.registry import stage_kinds
    from raydebias.pipeline import build_graph

    for pkg in ("harnessing", "diffinject", "gamma_face", "tiw", "diffusing_debias"):
        importlib.import_module(f"raydebias.methods.{pkg}.stages")
    cfg = load_config("raydebias/configs/full.yaml", ["baselines=[diffusing_debias_lff, diffinject, gamma_face, "
                                                      "erm, groupdro, tiw, vanilla, clustered_dreambooth]",
                                                      f"stages=[{', '.join(stage_kinds())}]"])
    names = [s.name for s in build_graph(cfg)]
    assert {"amplifier", "mine", "inject", "gmm", "tiw", "generate/clustered_dreambooth"} <= set(names)
