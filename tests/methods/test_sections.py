"""What methods add to the report and to metrics.json comes from their declarations (no per-method branches in
evaluate/report): Diffusing DeBias's section renders its samples and detection table; a function two methods
share runs once."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias.core import registered
from raydebias.methods import get_method

INFO = {"class_names": [f"digit {i}" for i in range(3)], "bias_names": ["red", "green", "blue"], "num_bias": 3,
        "num_classes": 3, "image_size": 8}


def test_diffusing_debias_section_from_its_declaration(tmp_path):
    st = tmp_path / "stages" / "amplifier"
    st.mkdir(parents=True)
    px = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    pq.write_table(pa.table({"label": [0, 1, 2, 0, 1, 2], "pixels": [p.tobytes() for p in px]}),
                   st / "synthetic.parquet")
    det = {"description": "errors as a detector", "diffusing_debias_amplifier":
           {"errors": 5, "conflicting": 4, "precision": 0.6, "recall": 0.75, "f1": 0.667}}
    m1, m2 = get_method("diffusing_debias"), get_method("diffusing_debias_lff")
    assert m1.report == m2.report and m1.evaluate == m2.evaluate  # shared (equal refs): rendered and measured once
    html = "".join(m1.report(tmp_path, INFO, {"rows": [], "bias_detection": det}, 1))
    assert "Diffusing DeBias: bias-amplified synthetic samples" in html and "data:image/png;base64," in html
    assert "<td>diffusing_debias_amplifier</td><td>5</td><td>4</td><td>0.600</td><td>0.750</td>" in html


def test_every_generating_method_declares_a_report_section():
    for name in registered():
        m = get_method(name)
        if m.synthetic and name not in ("vanilla",):
            assert m.report is not None, name
    assert get_method("erm").report is None and get_method("erm").evaluate is None


def test_harnessing_section_shows_filter_stats_and_clusters(tmp_path):
    st = tmp_path / "stages"
    (st / "filter" / "clustered_dreambooth").mkdir(parents=True)
    (st / "cluster").mkdir()
    px = np.zeros((3, 8, 8, 3), np.uint8)
    pq.write_table(pa.table({"label": [0, 1, 2], "bias": [0, 1, 2], "pixels": [p.tobytes() for p in px]}),
                   st / "filter" / "clustered_dreambooth" / "synthetic.parquet")
    (st / "filter" / "clustered_dreambooth" / "stats.json").write_text(json.dumps({"generated": 4, "kept": 3}))
    (st / "cluster" / "clusters.json").write_text(json.dumps({"k_D": 2, "cluster_sizes": {"0": [5, 4], "4": [7]}}))
    report = {"rows": [{"method": "clustered_dreambooth"}]}
    html = "".join(get_method("clustered_dreambooth").report(tmp_path, INFO, report, 1))
    assert "<th>generated</th><th>kept</th>" in html and "<td>4</td><td>3</td>" in html
    assert "<td>digit 0</td><td>red</td><td>2</td><td>5, 4</td>" in html
    assert "<td>digit 1</td><td>green</td><td>1</td><td>7</td>" in html


def test_tiw_console_lines_per_objective():
    from raydebias.methods.tiw.stages import console_lines

    assert console_lines({"generation": {}}) == []
    metrics = {"generation": {"tiw": {"reference": {"aligned_fraction": 0.1},
                                      "objectives": {"dsm": {"aligned_fraction": 0.5, "tv_groups": 0.4, "fid": 12.0},
                                                     "tiw_paper": {"aligned_fraction": 0.2, "tv_groups": 0.1,
                                                                   "fid": 11.0}}}}}
    lines = console_lines(metrics)
    assert lines[0] == "TIW samples (reference aligned fraction 0.100):"
    assert [ln.split()[0] for ln in lines[1:]] == ["dsm", "tiw_paper"] and "FID 11.00" in lines[2]
