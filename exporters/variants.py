"""Deployment variants of an fp32 ONNX classifier: graph-optimised, fp16, dynamic int8 and static (QDQ) int8,
each a :class:`Variant` registered in :data:`VARIANTS`.

Every function takes and writes paths; every output is one self-contained ``.onnx`` file (no external data).
Only numpy, onnx and onnxruntime are used here, so a deployment box without torch can build the variants.
"""

from __future__ import annotations

import abc
import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import TensorsData, create_calibrator, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from kdpipe.registry import Registry

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
CALIBRATION_BATCH = 32
# onnxruntime has no getter for the default logger severity; 2 (WARNING) is its documented default.
_ORT_DEFAULT_SEVERITY = 2

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """Silence ORT's native INFO/WARNING chatter (errors still raise) and restore the default afterwards."""
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def _cpu_session(path: Path, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _prepare_dst(dst: Path) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst


def _assert_self_contained(path: Path) -> None:
    """Fail loudly if a writer put tensors in a sidecar file: the variant must ship as one file."""
    graph = onnx.load(str(path), load_external_data=False).graph
    tensors = [*graph.initializer, *(a.t for n in graph.node for a in n.attribute if a.HasField("t"))]
    external = [t.name for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise RuntimeError(f"{path} references external data for {len(external)} tensor(s), e.g. {external[0]!r}")


def _pre_process(src: Path, tmp: Path) -> Path:
    """Shape inference + basic optimisation before quantisation, as ORT recommends; the source if it fails."""
    out = tmp / "preprocessed.onnx"
    try:
        quant_pre_process(str(src), str(out))
    except Exception as exc:  # any failure here only costs quantisation quality, not correctness
        log.warning(
            "quant_pre_process failed on %s (%s: %s); quantising the unprocessed model", src, type(exc).__name__, exc
        )
        return Path(src)
    return out


def _input_name(path: Path) -> str:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"expected a model with exactly one input, {path} has {inputs}")
    return inputs[0]


def make_optimized(src: Path, dst: Path) -> None:
    """Save the graph after ORT's offline optimisation at ENABLE_EXTENDED.

    ENABLE_ALL adds layout transformations (NCHWc) tuned to the CPU that runs them, so its output is only valid on
    the build machine; EXTENDED fusions (Conv+Activation, etc.) are portable across CPU-EP hosts, though they use
    ``com.microsoft`` contrib ops, so the file needs onnxruntime (not any ONNX runtime) to run.
    """
    dst = _prepare_dst(dst)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    with _quiet_ort():
        _cpu_session(Path(src), options)
    _assert_self_contained(dst)


def make_fp16(src: Path, dst: Path) -> None:
    """Convert weights and compute to float16, keeping float32 inputs and outputs so callers need no change."""
    dst = _prepare_dst(dst)
    model = onnx.load(str(src), load_external_data=True)
    model16 = convert_float_to_float16(model, keep_io_types=True)
    # The converter appends the fp32<->fp16 Cast nodes of the graph inputs/outputs at the end of the node list: ORT
    # does not mind, but the ONNX checker (and other runtimes) require topological order.
    OnnxModel.graph_topological_sort(model16.graph)
    onnx.checker.check_model(model16)
    onnx.save(model16, str(dst))
    _assert_self_contained(dst)


def make_int8_dynamic(src: Path, dst: Path, per_channel: bool = True) -> None:
    """Int8 weights with activations quantised on the fly at run time (no calibration data needed)."""
    dst = _prepare_dst(dst)
    with tempfile.TemporaryDirectory(prefix="kdpipe-int8d-") as tmp, _quiet_ort():
        model_in = _pre_process(Path(src), Path(tmp))
        quantize_dynamic(str(model_in), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8)
    _assert_self_contained(dst)


class _ArrayReader(CalibrationDataReader):
    """Feeds a normalised (N, C, H, W) array to the calibrator in fixed-size batches."""

    def __init__(self, input_name: str, data: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> None:
        self.input_name = input_name
        self.data = data
        self.batch_size = batch_size
        self.start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.data):
            return None
        batch = self.data[self.start : self.start + self.batch_size]
        self.start += self.batch_size
        return {self.input_name: batch}


def _calibrate(model: Path, data: np.ndarray, method: CalibrationMethod, tmp: Path) -> TensorsData:
    """Tensor ranges of ``model`` on ``data``, computed as quantize_static would but one batch per collect call.

    quantize_static feeds the whole reader to one ``collect_data`` call, and ORT's histogram calibrators (entropy,
    percentile) stack a call's batches with ``np.asarray``, which fails on a short last batch. Collecting batch by
    batch merges the histograms (and min/max) incrementally instead, so any N works.
    """
    calibrator = create_calibrator(
        model,
        sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),  # the op types quantize_static calibrates by default
        augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=method,
    )
    name = _input_name(model)
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram collector print()s progress
        for start in range(0, len(data), CALIBRATION_BATCH):
            calibrator.collect_data(_ArrayReader(name, data[start : start + CALIBRATION_BATCH]))
        tensors = calibrator.compute_data()
    del calibrator  # drops its InferenceSession on the augmented model before the temp dir goes
    return tensors


def make_int8_static(
    src: Path,
    dst: Path,
    calibration: np.ndarray,
    method: str = "minmax",
    per_channel: bool = True,
    ranges_path: Path | None = None,
) -> dict:
    """Static QDQ int8 quantisation calibrated on ``calibration``.

    Activations are QUInt8 and weights QInt8 (U8S8), ORT's recommendation for x86 CPUs: its fastest int8 GEMM/conv
    kernels (AVX2/AVX-512/VNNI) are u8×s8. With QInt8 activations (quantize_static's default) ORT 1.32 left most
    DQ→Conv→Q groups of a resnet8 unfused on x86, and the model ran ~1.7× slower than fp32; with U8S8 every Conv
    became a QLinearConv and it ran ~1.5× faster. ``reduce_range`` stays False (ORT's default, right for VNNI hosts).

    Args:
        src: The fp32 model.
        dst: The quantised model to write.
        calibration: Already-normalised inputs (N, C, H, W), fed in batches of :data:`CALIBRATION_BATCH`.
        method: ``"minmax"``, ``"entropy"`` or ``"percentile"``.
        per_channel: Per-output-channel weight scales (more accurate, slightly slower).
        ranges_path: Where to write the calibrated ranges as JSON ``{tensor: [min, max]}``; not written if None.

    Returns:
        ``{"calibration_samples", "method", "per_channel", "tensors"}``.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {tuple(CALIBRATION_METHODS)}, got {method!r}")
    data = np.ascontiguousarray(calibration, dtype=np.float32)
    if data.ndim < 2 or len(data) == 0:
        raise ValueError(f"calibration must be a non-empty batch (N, ...), got shape {data.shape}")
    dst = _prepare_dst(dst)
    with tempfile.TemporaryDirectory(prefix="kdpipe-int8s-") as tmp, _quiet_ort():
        model_in = _pre_process(Path(src), Path(tmp))
        tensors = _calibrate(model_in, data, CALIBRATION_METHODS[method], Path(tmp))
        # quantize_static (ORT >= 1.32) takes ranges from an existing calibration cache instead of calibrating.
        cache = Path(tmp) / "calibration_cache.json"
        save_tensors_data(tensors, cache)
        quantize_static(
            str(model_in),
            str(dst),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[method],
            calibration_cache_path=str(cache),
        )
    _assert_self_contained(dst)
    ranges = {}
    for name, tensor in tensors.items():
        low, high = tensor.range_value
        ranges[name] = [float(np.min(low)), float(np.max(high))]
    if ranges_path is not None:
        ranges_path = Path(ranges_path)
        ranges_path.parent.mkdir(parents=True, exist_ok=True)
        ranges_path.write_text(json.dumps(dict(sorted(ranges.items())), indent=1) + "\n")
    return {"calibration_samples": len(data), "method": method, "per_channel": per_channel, "tensors": len(ranges)}


@dataclass(frozen=True)
class VariantInputs:
    """What a variant may need besides the fp32 model: calibration images and quantisation settings; for
    int8_fallback also validation images and labels (never test), the accuracy budget and a work folder."""

    calibration: np.ndarray | None = None
    method: str = "minmax"
    per_channel: bool = True
    ranges_path: Path | None = None
    validation: tuple[np.ndarray, np.ndarray] | None = None
    accuracy_budget: float = 0.005
    max_fallback_nodes: int = 24
    fallback_candidates: int | None = 32
    work_dir: Path | None = None
    log: Callable[[str], None] | None = None


class Variant(abc.ABC):
    """A deployment variant of the fp32 student (Olive's "pass"): a name, whether it needs calibration images,
    and ``build``. Register a new one with ``@VARIANTS.register()``; add its name to ``kdpipe.config.Variant``
    (a test keeps the two equal)."""

    name: ClassVar[str]
    calibrated: ClassVar[bool] = False
    #: which fp32 model it is made from: "student" (the exported student) or "qad" (the student fine-tuned by
    #: quantisation-aware distillation, which the export stage trains first)
    source: ClassVar[str] = "student"
    #: the integer type its weights are stored in ("int8"), None for a float model; report.json's
    #: ``models.<variant>.quantization`` is written for quantised variants only
    quantized: ClassVar[str | None] = None

    @abc.abstractmethod
    def build(self, src: Path, dst: Path, inputs: VariantInputs) -> dict:
        """Write the variant of ``src`` at ``dst``; return its quantisation info (``{}`` for none)."""


VARIANTS: Registry[type[Variant]] = Registry("variant")


@VARIANTS.register()
class Optimized(Variant):
    name = "optimized"

    def build(self, src: Path, dst: Path, inputs: VariantInputs) -> dict:
        make_optimized(src, dst)
        return {}


@VARIANTS.register()
class Fp16(Variant):
    name = "fp16"

    def build(self, src: Path, dst: Path, inputs: VariantInputs) -> dict:
        make_fp16(src, dst)
        return {}


@VARIANTS.register()
class Int8Dynamic(Variant):
    name = "int8_dynamic"
    quantized = "int8"

    def build(self, src: Path, dst: Path, inputs: VariantInputs) -> dict:
        make_int8_dynamic(src, dst, per_channel=inputs.per_channel)
        return {}


@VARIANTS.register()
class Int8Static(Variant):
    name = "int8_static"
    calibrated = True
    quantized = "int8"

    def build(self, src: Path, dst: Path, inputs: VariantInputs) -> dict:
        if inputs.calibration is None:
            raise ValueError("variant 'int8_static' needs calibration images")
        return make_int8_static(
            src, dst, inputs.calibration, method=inputs.method, per_channel=inputs.per_channel,
            ranges_path=inputs.ranges_path,
        )  # fmt: skip


@VARIANTS.register()
class QadInt8(Int8Static):
    """Static int8 of the QAD-fine-tuned student (``kdpipe.stages.qad``): same quantiser, better weights."""

    name = "qad_int8"
    source = "qad"


def make_variant(
    name: str,
    src: Path,
    dst: Path,
    calibration: np.ndarray | None = None,
    method: str = "minmax",
    per_channel: bool = True,
    ranges_path: Path | None = None,
    **extra: Any,
) -> dict:
    """Build variant ``name`` of ``src`` at ``dst``.

    Returns:
        ``{"variant", "file", "bytes"}``, plus the variant's quantisation info (int8_static's calibration).

    Raises:
        ValueError: unknown ``name``, or a calibrated variant without ``calibration``.
    """
    if name not in VARIANTS:
        raise ValueError(VARIANTS.unknown_message(name))
    info = VARIANTS.get(name)().build(
        Path(src), Path(dst), VariantInputs(calibration, method, per_channel, ranges_path, **extra)
    )
    dst = Path(dst)
    return {"variant": name, "file": str(dst), "bytes": dst.stat().st_size, **info}


def evaluate_onnx(path: Path, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Float32 logits of the model at ``path`` for already-normalised ``images`` (CPU provider)."""
    return evaluate_onnx_chunks(path, [images], batch_size)


def evaluate_onnx_chunks(path: Path, chunks: Iterable[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """:func:`evaluate_onnx` over chunks of images (each cut into ``batch_size`` batches) with one session."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    session = _cpu_session(Path(path))
    input_name = session.get_inputs()[0].name
    outputs = []
    for images in chunks:
        images = np.ascontiguousarray(images, dtype=np.float32)
        outputs += [session.run(None, {input_name: images[i : i + batch_size]})[0]
                    for i in range(0, len(images), batch_size)]  # fmt: skip
    return np.concatenate(outputs).astype(np.float32, copy=False)


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """How far ``logits`` are from ``reference`` logits, and their accuracy when ``labels`` are given.

    Returns:
        ``{"max_abs_diff", "mean_abs_diff", "top1_agreement"}`` plus ``"top1"`` and ``"top5"`` with labels
        (top-5 uses k = min(5, classes)).
    """
    logits = np.asarray(logits, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    if logits.shape != reference.shape or logits.ndim != 2:
        raise ValueError(f"logits {logits.shape} and reference {reference.shape} must be the same (N, classes) shape")
    diff = np.abs(logits - reference)
    pred = logits.argmax(axis=1)
    out = {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "top1_agreement": float(np.mean(pred == reference.argmax(axis=1))),
    }
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(logits):
            raise ValueError(f"{len(labels)} labels for {len(logits)} rows of logits")
        k = min(5, logits.shape[1])
        topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        out["top1"] = float(np.mean(pred == labels))
        out["top5"] = float(np.mean((topk == labels[:, None]).any(axis=1)))
    return out
