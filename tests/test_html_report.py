"""report/index.html: one self-contained page (plots inlined, no network), sections only where their
source exists; rendered in headless Chromium, screenshot not blank, key elements in the DOM."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.test_serve_bundle import tiny_bundle
from within.calibration.geospatial import GeospatialCalibrator
from within.data.simulator import simulate
from within.models.base import BaseMLModel
from within.pipeline.html_report import render_html, write_html_report
from within.pipeline.report import write_test_report

PRIVACY = {"status": "trained", "epsilon": 2.93, "delta": 1e-5, "noise_multiplier": 1.1, "accountant": "prv",
           "max_grad_norm": 1.0, "steps": 120, "version/opacus": "1.5.4"}
FAIRNESS = {
    "split": "test", "fields": ["age_band"],
    "worst_group_ece": {"before": {"field": "age_band", "group": "55+", "ece": 0.031},
                        "after": {"field": "age_band", "group": "18-24", "ece": 0.012}},
    "effect": {"age_band": {"18-24": {"ece_before": 0.02, "ece_after": 0.012},
                            "55+": {"ece_before": 0.031, "ece_after": 0.01}}},
}


class Elements(HTMLParser):
    """Every element's tag and attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.elements if "id" in a}


def parse(text: str) -> Elements:
    p = Elements()
    p.feed(text)
    return p


def png(path: Path, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(np.random.default_rng(seed).random(10))
    fig.savefig(path)
    plt.close(fig)
    return path


def assert_offline(text: str) -> None:
    """Nothing the page could fetch: no URL, no script, no stylesheet link, every src a data URI."""
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, flags=re.IGNORECASE), "external URL in the page"
    elements = parse(text).elements
    assert not [t for t, _ in elements if t in ("script", "link", "iframe", "object", "embed")]
    for _, attrs in elements:
        if "src" in attrs:
            assert attrs["src"].startswith("data:image/png;base64,")
    assert "default-src 'none'" in text  # the CSP: even a stray reference is not fetched


def test_sections_appear_only_with_their_source(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    metrics = {"test/auc": 0.71, "test/logloss": 0.31, "val/auc": 0.7, "train/loss": 0.4}
    page = write_html_report(bare, metrics).read_text()
    ids = parse(page).ids()
    assert "metrics" in ids and "metrics-table" in ids
    for absent in ("curves", "reliability", "region-map", "privacy", "fairness", "attribution"):
        assert absent not in ids, absent
    assert "test/auc" in page and "0.71" in page and "0.31" in page
    assert_offline(page)

    full = tmp_path / "full"
    full.mkdir()
    for k, name in enumerate(("reliability.png", "training_curve.png", "region_map.png", "fairness.png")):
        png(full / name, seed=k)
    (full / "privacy.json").write_text(json.dumps(PRIVACY))
    (full / "fairness.json").write_text(json.dumps(FAIRNESS))
    (full / "attribution.json").write_text(json.dumps({"split": "test", "n_rows": 50, "method": "gradient",
                                                       "fields": {"budget": 0.02, "headline": 0.09},
                                                       "modalities": {"tabular": 0.02, "text": 0.09}}))
    extra = {"Prediction intervals": "- mean width: 0.01\n- coverage: 0.9", "Field-RCE": "| a | b |\n| --- | --- |\n| x | 1 |"}
    page = write_html_report(full, metrics, extra=extra).read_text()
    doc = parse(page)
    ids = doc.ids()
    for present in ("metrics", "curves", "reliability", "region-map", "privacy", "privacy-table", "fairness",
                    "fairness-worst", "fairness-effect", "attribution", "attribution-table",
                    "attribution-modalities", "section-prediction-intervals",
                    "section-field-rce", "toc"):
        assert present in ids, present
    assert "2.93" in page and "1e-05" in page and "55+" in page  # privacy epsilon / delta, worst fairness group
    rows = re.findall(r"<code>(headline|budget)</code>", page)
    assert rows == ["headline", "budget"]  # attributions sorted by size
    # each plot is inlined byte for byte
    images = {a["id"]: a["src"] for t, a in doc.elements if t == "img"}
    for element_id, name in (("reliability-img", "reliability.png"), ("curves-img", "training_curve.png"),
                             ("region-map-img", "region_map.png"), ("fairness-img", "fairness.png")):
        data = images[element_id].removeprefix("data:image/png;base64,")
        assert base64.b64decode(data) == (full / name).read_bytes(), name
    assert "<table>" in page and "<li>mean width: 0.01</li>" in page  # report.md sections rendered, not raw
    assert_offline(page)


def test_markdown_and_values_are_escaped(tmp_path):
    page = render_html(tmp_path, {"test/<b>x</b>": 1.0}, extra={"Notes": "<script>alert(1)</script>"})
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;" in page


@pytest.fixture(scope="module")
def geo_report(tmp_path_factory) -> Path:
    """write_test_report (what train.py and evaluate.py call) for a network bundle with a fitted
    GeospatialCalibrator, plus a privacy and a fairness report beside it: a run's report/ folder."""
    out = tmp_path_factory.mktemp("geo_run")
    model = BaseMLModel.load(tiny_bundle(out, n=2000, text=False, image=False, calibrator="temperature"))
    fit = simulate(n=4000, seed=31)
    logits = model.predict_logits(fit)
    regions = {c: fit[c].to_numpy() for c in ("country", "state", "city", "latitude", "longitude",
                                                "population_density", "hour")}
    model.calibrator = GeospatialCalibrator(min_samples_per_region=50).fit(logits, fit["clicked"].to_numpy(), regions)
    report = out / "report"
    report.mkdir()
    (report / "privacy.json").write_text(json.dumps(PRIVACY))
    (report / "fairness.json").write_text(json.dumps(FAIRNESS))
    history = [{"epoch": e, "train/loss": 0.5 - 0.05 * e, "val/logloss": 0.45 - 0.03 * e, "val/auc": 0.6 + 0.02 * e}
               for e in range(4)]
    from within.postfit.attribution import Attribution
    from within.postfit.context import PostfitContext

    model.reference = simulate(n=128, seed=33)  # what train.py keeps in the bundle (explain.reference_rows)
    Attribution().run(PostfitContext(model=model, frames={"test": simulate(n=400, seed=34)}, out_dir=out,
                                     config={"attribution": {"n_rows": 40}}))
    write_test_report(model, simulate(n=1500, seed=32), report, history=history)
    return report


def test_test_report_writes_index_html_with_the_region_map(geo_report):
    for name in ("index.html", "report.md", "metrics.json", "reliability.png", "training_curve.png", "region_map.png"):
        assert (geo_report / name).is_file(), name
    page = (geo_report / "index.html").read_text()
    ids = parse(page).ids()
    for present in ("metrics", "curves", "reliability", "region-map", "privacy", "fairness", "attribution",
                    "attribution-img"):
        assert present in ids, present
    metrics = json.loads((geo_report / "metrics.json").read_text())
    assert f"{metrics['test/auc']:.5f}".rstrip("0") in page
    assert_offline(page)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    return exe


def run_chromium(exe: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-extensions", "--hide-scrollbars"]
    return subprocess.run([exe, *flags, *args], check=False, capture_output=True, text=True, timeout=120)


def test_chromium_renders_the_report(geo_report, tmp_path):
    from PIL import Image

    exe = chromium()
    url = (geo_report / "index.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    res = run_chromium(exe, f"--screenshot={shot}", "--window-size=1200,2000", url)
    assert shot.is_file() and shot.stat().st_size > 0, res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 20.0, f"the screenshot looks blank (pixel sd {pixels.std():.1f})"
    # the dark header band and the white page both show: the CSS applied
    assert pixels[:40].mean() < 80 and np.median(pixels) > 200
    dom = run_chromium(exe, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    doc = parse(dom.stdout)
    ids = doc.ids()
    for present in ("metrics", "metrics-table", "curves-img", "reliability-img", "region-map-img", "privacy",
                    "fairness", "attribution-img", "attribution-table"):
        assert present in ids, present
    assert "test/auc" in dom.stdout
