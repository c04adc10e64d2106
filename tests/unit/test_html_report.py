import base64
import copy
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kdpipe.reporting.html import render_html, write_html

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def _latency(p50: float) -> dict:
    rounds = [p50 * f for f in (0.95, 0.98, 1.0, 1.02, 1.1)]
    return {
        "p50_ms": p50,
        "p90_ms": p50 * 1.1,
        "p95_ms": p50 * 1.15,
        "p99_ms": p50 * 1.3,
        "mean_ms": p50,
        "std_ms": p50 * 0.05,
        "throughput_ips": 1000 / p50,
        "round_p50_ms": rounds,
    }


def _model(arch: str, top1: float, p50: float) -> dict:
    return {
        "arch": arch,
        "parameters": 1000,
        "accuracy": {
            "top1": top1,
            "top5": 1.0,
            "per_class_top1": {"cat": top1, "dog": top1, "<bird>": top1},
            "confusion": [[8, 1, 1], [0, 9, 1], [2, 0, 8]],
            "agreement_with_teacher": 0.9,
        },
        "onnx": {"file": f"{arch}.onnx", "file_bytes": 4096, "parity": {"max_abs_diff": 1e-6, "top1_agreement": 1.0}},
        "latency": {"batch_1": _latency(p50), "batch_8": _latency(p50 * 6)},
    }


def _history(losses: list[float]) -> dict:
    rows = [
        {"epoch": i + 1, "train_loss": loss, "val_top1": 0.5 + 0.1 * i, "lr": 0.1, "seconds": 1.0}
        for i, loss in enumerate(losses)
    ]
    return {"history": rows, "best_epoch": len(rows)}


def _variant(top1: float, p50: float, agreement: float) -> dict:
    m = _model("small", top1, p50)
    m["variant"] = "int8_static"
    m["accuracy"]["agreement_with_fp32"] = agreement
    del m["accuracy"]["agreement_with_teacher"]
    return m


REPORT = {
    "kdpipe_version": "0.1.0",
    "created": "2026-01-01T00:00:00Z",
    "dataset": {"name": "synthetic", "classes": ["cat", "dog", "<bird>"], "input_shape": [1, 8, 8], "test_images": 30},
    "models": {
        "teacher": _model("big", 0.9, 2.0),
        "student": _model("small", 0.85, 0.5),
        "student-int8": _variant(0.84, 0.3, 0.987),
    },
    "benchmark": {
        "providers": ["CPUExecutionProvider"],
        "intra_op_threads": 1,
        "host": {"cpu": "Test CPU 9000", "cpu_count": 2, "onnxruntime": "1.99.0"},
    },
    "training": {"teacher": _history([1.0, 0.6, 0.4]), "distill": _history([1.2, 0.7, 0.5])},
    "gates": [
        {
            "name": "student.top1 >= 0.8",
            "model": "student",
            "metric": "top1",
            "batch_size": None,
            "measured": 0.85,
            "threshold": 0.8,
            "op": ">=",
            "passed": True,
            "detail": "<b>ok</b> & x",
        },
        {"name": "student.p90_ms@1 <= 0.1", "measured": 0.55, "threshold": 0.1, "op": "<=", "passed": False},
    ],
    "stages": {"teacher": {"key": "ab" * 32, "cached": True, "seconds": 0.0}},
    "versions": {"numpy": "2.0"},
    "speedup_p50": {"batch_1": 4.0},
}
REPORT["models"]["student"]["macs"] = {"macs": 9_345_920, "method": "onnx-graph", "per_part": {}}


class _Page(HTMLParser):
    """Collects every tag's attributes, and the text of each table row with the row's class."""

    def __init__(self) -> None:
        super().__init__()
        self.attrs: list[tuple[str, str, str]] = []
        self.rows: list[tuple[str, str]] = []
        self._row: list[str] | None = None
        self._cls = ""

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "tr":
            self._row, self._cls = [], dict(attrs).get("class") or ""

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append((self._cls, " ".join(self._row)))
            self._row = None

    def handle_data(self, data):
        if self._row is not None:
            self._row.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def test_full_report_is_self_contained():
    text = render_html(REPORT)
    images = IMAGE.findall(text)
    assert text.count("data:image/png;base64,") == 4 == len(images)
    for data in images:
        assert base64.b64decode(data, validate=True).startswith(PNG_SIGNATURE)
    page = _parse(text)
    linked = [(t, k, v) for t, k, v in page.attrs if k in {"src", "href"}]
    assert linked and all(v.startswith("data:image/png;base64,") for _, _, v in linked)
    assert not any(re.match(r"\s*(https?:)?//", v) for _, _, v in linked)
    assert "<script" not in text.lower()
    assert "&lt;b&gt;ok&lt;/b&gt; &amp; x" in text  # report text is escaped, never markup


def test_failed_gate_row_is_marked():
    page = _parse(render_html(REPORT))
    failed = [text for cls, text in page.rows if "fail" in cls.split()]
    assert any("student.p90_ms@1 <= 0.1" in t for t in failed)
    assert not any("student.top1 >= 0.8" in t for t in failed)
    assert "1 of 2 gates failed" in render_html(REPORT)


def test_sparse_report_renders_fewer_images():
    sparse = copy.deepcopy(REPORT)
    for key in ("training", "gates"):
        del sparse[key]
    for model in sparse["models"].values():
        del model["latency"]
    text = render_html(sparse)
    assert text.count("data:image/png;base64,") == 1  # only the confusion matrix has data left
    assert "No gates configured" in text
    assert render_html({}).startswith("<!DOCTYPE html>")


def test_rounds_absent_falls_back_to_markers():
    report = copy.deepcopy(REPORT)
    for model in report["models"].values():
        for lat in model["latency"].values():
            del lat["round_p50_ms"]
    assert render_html(report).count("data:image/png;base64,") == 4


def test_write_html(tmp_path: Path):
    out = write_html(REPORT, tmp_path / "sub" / "report.html")
    assert out == tmp_path / "sub" / "report.html"
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def test_import_does_not_load_matplotlib():
    code = "import sys, kdpipe.reporting.html; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def _passing() -> dict:
    """REPORT with its gates passing and the int8 variant recommended, as `kdpipe gate` would leave it."""
    report = copy.deepcopy(REPORT)
    report["gates"] = [report["gates"][0]]
    report["deployment"] = {
        "recommended": "student-int8",
        "criterion": "lowest p90 latency at the smallest batch among the models that pass the student's gates",
        "candidates": [
            {"model": "student", "passed": True, "failed": [], "batch": "batch_1", "p90_ms": 0.55},
            {"model": "student-int8", "passed": True, "failed": [], "batch": "batch_1", "p90_ms": 0.33},
        ],
    }
    report["comparison"] = [
        {"method": "simkd", "deployed": True, "test_top1": 0.85, "val_top1": 0.86, "delta_vs_scratch": 0.01},
        {"method": "scratch", "deployed": False, "test_top1": 0.84, "val_top1": 0.85, "delta_vs_scratch": 0.0},
    ]
    return report


def _card(text: str) -> str:
    """The first-screen card: everything between its opening and the gates banner that follows it."""
    start = text.index('<div class="card')
    return text[start : text.index('<div class="banner', start)]


def test_first_screen_says_what_to_ship():
    text = render_html(_passing())
    card = _card(text)
    assert text.index('<div class="card ship"') < text.index("<h2>Gates</h2>") < text.index("<h2>Models</h2>")
    assert "Ship: <span" in card and "student-int8" in card
    for fact in ("84.00%", "0.330 ms", "4,096", "p90 latency, batch 1"):  # top-1, p90, ONNX bytes
        assert fact in card, fact
    assert "Test CPU 9000 (2 cores), 1 intra-op thread, CPUExecutionProvider, onnxruntime 1.99.0" in text
    assert "student-int8.top1 &gt;= 0.8: measured 0.84" in text  # the student's gate, judged on the variant
    assert "Distillation pays off here: simkd 85.00% vs scratch 84.00%" in text


def test_nothing_to_ship_names_each_failed_gate():
    report = copy.deepcopy(REPORT)
    report["deployment"] = {"recommended": None, "candidates": [{"model": "student", "failed": ["x"]}]}
    card = _card(render_html(report))
    assert '<div class="head bad">Nothing to ship' in card
    assert "student.p90_ms@1 &lt;= 0.1: measured 0.55, threshold &lt;= 0.1" in card


def test_flags_and_variant_agreement_are_shown():
    report = _passing()
    report["models"]["student-int8"]["slower_than_fp32"] = True
    report["models"]["student-int8"]["slower_than_fp32_at"] = ["batch_8"]
    report["comparison"][0]["test_top1"] = 0.83
    text = render_html(report)
    assert "student-int8 is slower than the fp32 student on this CPU (batch 8)" in _card(text)
    assert "student-int8 agrees with the fp32 student on only 98.70%" in _card(text)
    assert "Distillation does NOT beat training the student alone here" in _card(text)
    row = next(t for _, t in _parse(text).rows if t.startswith("student-int8"))
    assert "98.70%" in row  # agreement with fp32, measured at export: not "–"


def test_simkd_cost_is_shown_on_its_own():
    report = copy.deepcopy(REPORT)
    student = report["models"]["student"]
    student["method"] = "simkd"
    student["parameters_breakdown"] = {"body": 700, "projector": 250, "head": 50, "total": 1000}
    student["macs"]["per_part"] = {"body": 6000, "projector": 3000, "head": 10}
    text = render_html(report)
    assert "SimKD: what the projector and the reused head cost" in text
    rows = [t for _, t in _parse(text).rows]
    assert any(t.startswith("projector SimKD projector 250 25.0% 3K 33.3%") for t in rows), rows


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Headless, as root (no sandbox), without a GPU, and quiet on a closed network: no QUIC, first-run page, background
# fetches, component updates or sync; a fresh profile each time, so nothing from an earlier run is reused.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def _screenshot(report: dict, tmp_path: Path) -> "Image.Image":  # noqa: F821
    Image = pytest.importorskip("PIL.Image")
    page, shot = write_html(report, tmp_path / "report.html"), tmp_path / "first-screen.png"
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path))
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1200,900",
               f"--screenshot={shot}", page.as_uri()]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), (
        f"{' '.join(command)}: exit {done.returncode}\n{done.stderr[-2000:]}"
    )
    return Image.open(shot).convert("RGB")


def _has_colour(image, rgb: tuple[int, int, int], at_least: int = 200) -> bool:
    """Whether the screenshot shows at least ``at_least`` pixels of this exact colour (a card's border)."""
    return sum(n for n, c in image.getcolors(maxcolors=1 << 20) if c == rgb) >= at_least


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: apt-get install chromium (make test does)")
def test_first_screen_in_a_real_browser_shows_the_recommendation(tmp_path: Path):
    """A headless browser's first 1200×900 screen holds the green ship card; a failed run's holds the red one."""
    ship = _screenshot(_passing(), tmp_path)
    assert ship.size == (1200, 900)
    assert _has_colour(ship, (0x1A, 0x7F, 0x37))  # .card.ship border
    report = copy.deepcopy(REPORT)
    report["deployment"] = {"recommended": None, "candidates": []}
    stop = _screenshot(report, tmp_path)
    assert _has_colour(stop, (0xCF, 0x22, 0x2E)) and not _has_colour(stop, (0x1A, 0x7F, 0x37))
