import base64
import copy
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

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


REPORT = {
    "kdpipe_version": "0.1.0",
    "created": "2026-01-01T00:00:00Z",
    "dataset": {"name": "synthetic", "classes": ["cat", "dog", "<bird>"], "input_shape": [1, 8, 8], "test_images": 30},
    "models": {
        "teacher": _model("big", 0.9, 2.0),
        "student": _model("small", 0.85, 0.5),
        "student-int8": _model("small", 0.84, 0.3),
    },
    "training": {"teacher": _history([1.0, 0.6, 0.4]), "distill": _history([1.2, 0.7, 0.5])},
    "gates": [
        {
            "name": "student.top1 >= 0.8",
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
