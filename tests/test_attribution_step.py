"""The `attribution` post-fit step: mean |attribution| per field over test rows, into report/ and the
HTML report (postfit=[..., attribution])."""
from __future__ import annotations

import json

import pytest

from tests.test_serve_bundle import tiny_bundle
from within.data.simulator import simulate
from within.models.base import BaseMLModel
from within.pipeline.html_report import write_html_report
from within.postfit.attribution import Attribution
from within.postfit.context import PostfitContext
from within.postfit.steps import STEPS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = BaseMLModel.load(tiny_bundle(tmp_path_factory.mktemp("attr"), n=1500, image=False))
    m.reference = simulate(n=128, seed=5)
    return m


def context(model, tmp_path, n_rows=60):
    return PostfitContext(model=model, frames={"test": simulate(n=400, seed=6)}, out_dir=tmp_path,
                          config={"seed": 3, "attribution": {"n_rows": n_rows}})


def test_the_step_writes_what_the_explainer_gives_for_the_same_rows(model, tmp_path):
    from within.explain import explain
    from within.explain.explanation import FeatureImportance

    assert STEPS["attribution"] is Attribution
    ctx = context(model, tmp_path)
    Attribution().run(ctx)
    report = json.loads((tmp_path / "report" / "attribution.json").read_text())
    assert report["split"] == "test" and report["n_rows"] == 60 and report["reference_rows"] == 128
    assert report["method"] == "gradient"  # a network: expected gradients
    rows = ctx.frames["test"].sample(60, random_state=3)
    expected = FeatureImportance.from_explanation(explain(model, rows, model.reference, seed=3))
    assert list(report["fields"]) == list(expected.importance.index)  # largest first
    assert report["fields"] == pytest.approx(expected.importance.to_dict(), rel=1e-6)
    assert set(report["modalities"]) == {"tabular", "text"}
    assert ctx.metrics["attribution/tabular"] == pytest.approx(report["modalities"]["tabular"])
    assert ctx.metadata["attribution"]["top_field"] == next(iter(report["fields"]))
    assert (tmp_path / "report" / "attribution.png").stat().st_size > 5_000


def test_the_html_report_shows_the_attribution_tables(model, tmp_path):
    Attribution().run(context(model, tmp_path, n_rows=30))
    page = write_html_report(tmp_path / "report", {"test/auc": 0.7}).read_text()
    report = json.loads((tmp_path / "report" / "attribution.json").read_text())
    for element_id in ('id="attribution"', 'id="attribution-table"', 'id="attribution-modalities"',
                       'id="attribution-img"'):
        assert element_id in page, element_id
    table = page[page.index('id="attribution-table"'):]
    shown = [f for f in report["fields"] if f"<code>{f}</code>" in table]
    assert shown == list(report["fields"])  # every field, largest first
    assert "over 30 test rows" in page


def test_no_reference_sample_skips_the_step_with_the_setting_to_change(model):
    reference, model.reference = model.reference, None
    try:
        assert "explain.reference_rows=0" in Attribution.skip_reason(model)
    finally:
        model.reference = reference
    assert Attribution.skip_reason(object()).endswith("has no feature spec to attribute to")


def test_bad_n_rows_names_the_setting(model, tmp_path):
    with pytest.raises(ValueError, match="attribution.n_rows"):
        Attribution().run(context(model, tmp_path, n_rows=0))


def test_train_with_the_attribution_step_puts_it_in_the_run_report(tmp_path):
    """python train.py "postfit=[calibrate,export,attribution]" (the README's command)."""
    from tests.conftest import FAST, compose_cfg
    from within.pipeline.train import run_train

    run_train(compose_cfg("train", [*FAST, "postfit=[calibrate,export,attribution]", "export.onnx=false",
                                    "attribution.n_rows=50"], out_dir=tmp_path))
    report = json.loads((tmp_path / "report" / "attribution.json").read_text())
    assert report["n_rows"] == 50 and report["split"] == "test"
    assert {"tabular", "text", "image"} <= set(report["modalities"])  # the simulator's three modalities
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'id="attribution-table"' in page and 'id="attribution-img"' in page
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["attribution/tabular"] == pytest.approx(report["modalities"]["tabular"])


@pytest.mark.parametrize("override,key", [("attribution.n_rows=abc", "attribution.n_rows"),
                                          ("attribution.method=shapley", "attribution.method")])
def test_a_bad_attribution_setting_stops_the_run_before_training(override, key):
    from tests.conftest import compose_cfg
    from within.pipeline.config import ConfigError, validate_config

    cfg = compose_cfg("train", ["postfit=[calibrate,attribution]", override])
    with pytest.raises(ConfigError, match=key):
        validate_config(cfg)
