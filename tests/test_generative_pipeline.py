"""Two-step end-to-end runs of every "Harnessing diffusion" variant on tiny Colored MNIST, sharing one run
(data, CLIP, embeddings, clusters and the base model are computed once), plus resume of ``generate``."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydebias.config import load_config
from raydebias.pipeline import run_pipeline

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m "not slow"` is the fast loop

VARIANTS = ["clustered_dreambooth", "vanilla", "lora", "dreambooth"]
VARIANT_OVERRIDES = ["method=clustered_dreambooth", "baselines=[vanilla, lora, dreambooth]"]


def manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def gen_run(ray_module, tmp_path_factory, tiny_generative):
    run_dir = tmp_path_factory.mktemp("genrun")
    run_pipeline(load_config(None, [*tiny_generative, *VARIANT_OVERRIDES, f"run_dir={run_dir}"]), log=lambda m: None)
    return run_dir


def test_every_variant_has_a_metrics_row(gen_run):
    report = json.loads((gen_run / "metrics.json").read_text())
    assert [r["method"] for r in report["rows"]] == VARIANTS
    for r in report["rows"]:
        assert len(r["per_group"]) > 0 and r["aga"] == pytest.approx(np.mean(list(r["per_group"].values())))
    m = manifest(gen_run)
    for v in VARIANTS:
        for stage in ("finetune", "generate", "filter", "train"):
            assert m["stages"][f"{stage}/{v}"]["status"] == "completed", (stage, v)
    for shared in ("clip", "embed", "cluster", "diffusion"):
        assert m["stages"][shared]["status"] == "completed"
    fid = report["generation"]["fidelity"]
    assert set(fid["probes"]["probe_test_accuracy"]) == {"class", "bias"}
    for v in VARIANTS:  # every generated and every kept set is measured; CAS on the set the classifier trained on
        gen, kept = fid["sets"][f"generate/{v}"], fid["sets"][f"filter/{v}"]
        assert gen["images"] == 10 * 10 * 2 and len(gen["per_group"]) == 100 and "cas" not in gen
        assert kept["images"] <= gen["images"] and 0 <= kept["cas"]["aga"] <= 1
        for k in ("class", "bias"):  # the summaries are the unweighted means of the per-group fidelities
            for kind in ("aligned", "conflicting"):
                groups = [g[k] for g in gen["per_group"].values() if g["kind"] == kind]
                assert len(groups) == (10 if kind == "aligned" else 90)  # one aligned colour per digit (train)
                assert gen[f"{k}_{kind}"] == pytest.approx(np.mean(groups))
            assert all(g[k] in (0.0, 0.5, 1.0) for g in gen["per_group"].values())  # 2 images a group
        row = next(r for r in report["rows"] if r["method"] == v)
        assert row["synthetic_cas"] == kept["cas"]["aga"]
        # the phase the loop reports for the val-selected epoch is the one that epoch belongs to
        meta = json.loads((gen_run / "stages" / "train" / v / "meta.json").read_text())
        epochs = [p["name"] for p in meta["phases"] for _ in range(p["epochs"])]
        assert meta["best_phase"] == epochs[meta["best_epoch"] - 1] == row["selected_phase"]


def test_adapters_round_trip_and_units(gen_run):
    from raydebias.diffusion.base import load_base
    from raydebias.finetune.dreambooth_lora import adapter_names, load_lora

    units = json.loads((gen_run / "stages" / "finetune" / "clustered_dreambooth" / "units.json").read_text())
    assert units and all((gen_run / "stages" / "finetune" / "clustered_dreambooth" / u["name"]
                          / "pytorch_lora_weights.safetensors").exists() for u in units)
    assert json.loads((gen_run / "stages" / "finetune" / "vanilla" / "units.json").read_text()) == []
    bundle = load_base(gen_run)
    load_lora(bundle, gen_run / "stages" / "finetune" / "clustered_dreambooth" / units[0]["name"], "x")
    assert "x" in adapter_names(bundle)


def test_generated_rows_are_group_balanced_and_unique(gen_run):
    t = pq.read_table(gen_run / "stages" / "generate" / "lora" / "synthetic.parquet")
    ids = t.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 100 * 2  # 10 × 10 groups × 2 images
    groups = t.column("label").to_numpy() * 10 + t.column("bias").to_numpy()
    assert (np.bincount(groups, minlength=100) == 2).all()
    stats = json.loads((gen_run / "stages" / "filter" / "lora" / "stats.json").read_text())
    assert stats["kept"] == pq.read_table(gen_run / "stages" / "filter" / "lora" / "synthetic.parquet").num_rows
    assert stats["kept_by_score"] == 200  # ceil(0.75 · 2) = 2 per group, 100 groups


def test_generated_rows_carry_their_clip_embeddings(gen_run):
    """The generate actors encode their images with the run's CLIP (the filter reads them): equal to encoding the
    stored pixels again here, row by row."""
    from raydebias.data.transforms import pixels_from_column
    from raydebias.embed.stage import load_clip

    t = pq.read_table(gen_run / "stages" / "generate" / "lora" / "synthetic.parquet")
    emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    want = load_clip(gen_run).encode_images(pixels_from_column(t.column("pixels").to_pylist(), 32))
    assert emb.shape == want.shape and np.allclose(emb, want, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])  # one embedding per image, not one per batch


def test_filter_bias_check_keeps_only_images_clip_places_in_their_asked_bias(gen_run, tiny_generative, tmp_path):
    """``filter.bias_check`` on a copy of the run: every kept image is one the run's CLIP, zero-shot over its class's
    group descriptions, places in the bias value its group asked for (recomputed here from the stored embeddings);
    without bias labels the check is skipped, with a note, and the top-q set is kept."""
    import shutil

    from raydebias.core import RunContext
    from raydebias.embed.stage import load_clip
    from raydebias.filter.stage import run_filter
    from raydebias.generate.plan import describe

    run = tmp_path / "run"
    shutil.copytree(gen_run / "stages", run / "stages")
    cfg = load_config(None, [*tiny_generative, f"run_dir={run}", "filter.bias_check=true",
                             "filter.label_prompt='a photo of a {bias} {class}'"])
    run_filter(RunContext(cfg, log=lambda m: None), "lora")
    stats = json.loads((run / "stages" / "filter" / "lora" / "stats.json").read_text())
    gen = pq.read_table(run / "stages" / "generate" / "lora" / "synthetic.parquet")
    kept = pq.read_table(run / "stages" / "filter" / "lora" / "synthetic.parquet")
    info = json.loads((run / "stages" / "data" / "info.json").read_text())
    text = load_clip(run).encode_texts([describe("a photo of a {bias} {class}", c, b)
                                        for c in info["class_names"] for b in info["bias_names"]])

    def passes(t):
        emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
        y, a = t.column("label").to_numpy(), t.column("bias").to_numpy()
        return ((emb @ text.T).reshape(len(y), 10, 10)[np.arange(len(y)), y].argmax(1) == a)

    assert passes(kept).all() and kept.num_rows == stats["kept"] > 0
    assert stats["bias_check"]["failed"] == int((~passes(gen)).sum()) > 0
    assert stats["kept_by_score"] == 200 - stats["bias_check"]["failed_after_score"]  # ceil(0.75 · 2) per group
    assert stats["groups_left_empty"] == 100 - len(set(zip(kept.column("label").to_pylist(),
                                                             kept.column("bias").to_pylist())))
    info["bias_names"] = None  # a dataset without bias labels: nothing to check against
    (run / "stages" / "data" / "info.json").write_text(json.dumps(info))
    run_filter(RunContext(cfg, log=lambda m: None), "lora")
    stats = json.loads((run / "stages" / "filter" / "lora" / "stats.json").read_text())
    assert "skipped" in stats["bias_check"] and stats["kept_by_score"] == 200


def test_generate_resumes_exactly_the_missing_rows(gen_run, tiny_generative):
    """Simulate a run killed during `generate`: some batch files are gone and the stage is marked running."""
    v = "dreambooth"
    gen_dir = gen_run / "stages" / "generate" / v
    before = pq.read_table(gen_dir / "synthetic.parquet").sort_by("id")
    parts = sorted(gen_dir.glob("rows/*/part-*.parquet"))
    assert len(parts) >= 2
    removed = set(pq.read_table(parts[0]).column("id").to_pylist())
    parts[0].unlink()
    m = manifest(gen_run)
    m["stages"][f"generate/{v}"]["status"] = "running"
    (gen_run / "manifest.json").write_text(json.dumps(m))
    logs = []
    run_pipeline(load_config(None, [*tiny_generative, *VARIANT_OVERRIDES, f"run_dir={gen_run}"]), log=logs.append)
    line = next(l for l in logs if l.startswith(f"[generate/{v}]") and "to go" in l)
    assert f"{len(removed)} to go" in line
    after = pq.read_table(gen_dir / "synthetic.parquet").sort_by("id")
    ids = after.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == before.num_rows
    assert ids == before.column("id").to_pylist()
    # per-row seeds make the regenerated rows identical to the lost ones
    assert after.column("pixels").to_pylist() == before.column("pixels").to_pylist()
    actions = {s: e["last_action"] for s, e in manifest(gen_run)["stages"].items()}
    assert actions[f"generate/{v}"] == "ran" and actions["diffusion"] == "skipped"
    assert actions[f"finetune/{v}"] == "skipped"


def test_prior_preservation_trains_with_base_model_class_images(gen_run, tmp_path):
    """finetune.prior_preservation: the unit trains on its images plus base-model samples of the class prompt."""
    from raydebias.config import FinetuneConfig
    from raydebias.finetune.stage import _train_unit

    unit = json.loads((gen_run / "stages" / "finetune" / "dreambooth" / "units.json").read_text())[0]
    ft = FinetuneConfig(steps=2, prior_preservation=True, prior_weight=0.5).model_dump()
    out = tmp_path / "adapter"
    r = _train_unit(str(gen_run), {**unit, "class_prompt": "a photo of a digit 0"}, ft, 0, 32, str(out))
    assert r["prior_images"] == min(len(unit["ids"]), 50) and r["images"] == len(unit["ids"])
    assert (out / "pytorch_lora_weights.safetensors").exists()
    ft["prior_preservation"] = False
    assert _train_unit(str(gen_run), {**unit, "class_prompt": "x"}, ft, 0, 32, str(tmp_path / "b"))["prior_images"] == 0


def test_streamed_filter_keeps_what_the_whole_table_selection_keeps(gen_run, tiny_generative):
    """The filter's two streaming passes keep exactly the rows, with the scores, that the selection computed on
    the whole generated table at once gives: CLIP-Score against the class texts and the real group centroids,
    top ``keep`` per group, near-duplicates of real images dropped."""
    from raydebias.embed.stage import load_clip, load_embeddings
    from raydebias.filter.clip_score import clip_scores, label_targets, top_q
    from raydebias.filter.dedup import duplicate_threshold, max_similarity, self_similarity

    cfg = load_config(None, [*tiny_generative, *VARIANT_OVERRIDES, f"run_dir={gen_run}"])
    info = json.loads((gen_run / "stages" / "data" / "info.json").read_text())
    gen = pq.read_table(gen_run / "stages" / "generate" / "lora" / "synthetic.parquet")
    emb = np.stack(gen.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    y, a = gen.column("label").to_numpy(), gen.column("bias").to_numpy()
    B = info["num_bias"]
    real = load_embeddings(gen_run)
    rg = real["y"] * B + real["a"]
    centroids = {int(g): real["emb"][rg == g].mean(0) for g in np.unique(rg)
                 if (rg == g).sum() >= cfg.filter.min_real_for_centroid}
    texts, idx = label_targets(cfg.filter.label_prompt, info["class_names"], info["bias_names"], y, a)
    scores = clip_scores(emb, y * B + a, load_clip(gen_run).encode_texts(texts), idx, centroids, cfg.filter.alpha)
    threshold = duplicate_threshold(cfg.filter.dedup_threshold, self_similarity(real["emb"]),
                                    cfg.filter.dedup_real_quantile)
    final = top_q(scores, y * B + a, cfg.filter.keep) & (max_similarity(emb, real["emb"]) < threshold)
    want = dict(zip(np.asarray(gen.column("id").to_pylist())[final], scores[final]))
    kept = pq.read_table(gen_run / "stages" / "filter" / "lora" / "synthetic.parquet")
    got = dict(zip(kept.column("id").to_pylist(), kept.column("score").to_pylist()))
    assert got.keys() == want.keys() and len(got) == kept.num_rows > 0
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-6)
    assert kept.column("pixels").to_pylist() == gen.filter(pa.array(final)).column("pixels").to_pylist()
