"""Which nodes make static int8 lose accuracy, and an int8 model that keeps just enough of them in fp32.

ORT's ``quantize_static`` either quantises a graph or not; when int8 costs accuracy it gives no clue where. Here
the fp32 model is pre-processed and calibrated once (:func:`prepare`), then re-quantised cheaply (the calibration
cache is reused) with ``nodes_to_quantize`` / ``nodes_to_exclude``:

* :func:`analyse` — for every quantisable node, val top-1 and output SQNR (ORT's ``qdq_loss_debug`` formula) with
  only that node quantised, and with only that node left in fp32; ranked, most sensitive first.
* :func:`fallback_search` — leave nodes in fp32 a step at a time, greedily (each step keeps the node, or block of
  neighbouring nodes, that gives the most val top-1 back given the nodes already excluded), until val top-1 is
  within ``budget`` of fp32, timing each step (batch 1), so the report can show the accuracy/latency trade-off.

Only validation images come in here; the caller re-validates the chosen model on test. numpy/onnx/onnxruntime only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import save_tensors_data
from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from kdpipe.exporters.variants import (
    CALIBRATION_METHODS,
    VARIANTS,
    Variant,
    VariantInputs,
    _calibrate,
    _pre_process,
    _quiet_ort,
    evaluate_onnx,
)

#: op types whose sensitivity is analysed: the ones that compute (weights or arithmetic). Data-movement ops
#: (Relu, Reshape, MaxPool…) are still quantised; they only pass their neighbours' scales on.
ANALYSED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool")
QUANTIZED_OPS = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


@dataclass(frozen=True)
class Prepared:
    """An fp32 model ready to be quantised many ways: pre-processed, named, calibrated once."""

    model: Path
    cache: Path
    nodes: list[str]
    op_types: dict[str, str]
    method: str
    per_channel: bool
    calibration_samples: int
    #: each analysed node's analysed neighbours: the nodes it shares a tensor with, looking through the ops in
    #: between that only pass scales on (Clip/Relu, reshapes, pooling…)
    neighbours: dict[str, list[str]] = field(default_factory=dict)


def _name_nodes(path: Path) -> None:
    """Give every unnamed node a unique name: nodes_to_exclude/nodes_to_quantize match nodes by name."""
    model = onnx.load(str(path))
    seen: set[str] = set()
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            changed = True
        seen.add(node.name)
    if changed:
        onnx.save(model, str(path))


def prepare(
    src: Path, calibration: np.ndarray, folder: Path, method: str = "minmax", per_channel: bool = True
) -> Prepared:
    """Pre-process ``src`` as ``make_int8_static`` does and calibrate it once, into ``folder``."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {tuple(CALIBRATION_METHODS)}, got {method!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(calibration, dtype=np.float32)
    with _quiet_ort():
        pre = _pre_process(Path(src), folder)
        model = folder / "prepared.onnx"
        onnx.save(onnx.load(str(pre)), str(model))
        _name_nodes(model)
        tensors = _calibrate(model, data, CALIBRATION_METHODS[method], folder)
    cache = folder / "calibration_cache.json"
    save_tensors_data(tensors, cache)
    graph = onnx.load(str(model), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type in ANALYSED_OPS]
    return Prepared(model, cache, [n.name for n in nodes], {n.name: n.op_type for n in nodes}, method,
                    per_channel, len(data), _neighbours(graph))  # fmt: skip


def _neighbours(graph: Any) -> dict[str, list[str]]:
    """For each analysed node, the analysed nodes it shares a tensor with, through pass-through ops.

    ORT quantises a tensor when a quantised node produces or consumes it, so a bad activation range between two
    analysed nodes is only removed when both are in fp32: these are the pairs the fallback tries together."""
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def reach(node: Any, forward: bool, seen: set[str]) -> set[str]:
        found: set[str] = set()
        tensors = node.output if forward else node.input
        nexts = (
            [c for t in tensors for c in consumers.get(t, [])]
            if forward
            else [producer[t] for t in tensors if t in producer]
        )
        for other in nexts:
            if other.name in seen:
                continue
            seen.add(other.name)
            found |= {other.name} if other.op_type in ANALYSED_OPS else reach(other, forward, seen)
        return found

    return {n.name: sorted(reach(n, True, {n.name}) | reach(n, False, {n.name}))
            for n in graph.node if n.op_type in ANALYSED_OPS}  # fmt: skip


def quantize(prep: Prepared, dst: Path, exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> Path:
    """Static QDQ int8 (U8S8, as ``int8_static``) of the prepared model, with nodes excluded or a subset only."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_ort():
        quantize_static(
            str(prep.model),
            str(dst),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=prep.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[prep.method],
            calibration_cache_path=str(prep.cache),
            nodes_to_exclude=list(exclude),
            nodes_to_quantize=list(only) if only is not None else None,
        )
    return dst


def sqnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantisation-noise ratio of ``got`` against ``reference`` in dB (ORT's formula: identical arrays
    give ~324 dB, its epsilon, not inf, so the figure always fits in JSON)."""
    return float(compute_signal_to_quantization_noice_ratio([reference], [got]))


def _score(path: Path, images: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    logits = evaluate_onnx(path, images)
    return {"top1": float(np.mean(logits.argmax(1) == labels)), "sqnr_db": sqnr_db(reference, logits)}


def analyse(
    prep: Prepared,
    images: np.ndarray,
    labels: np.ndarray,
    folder: Path,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Per-node sensitivity on ``images`` (validation, never test), most sensitive first.

    A node ranks higher the lower the output SQNR with it alone quantised (the damage it does by itself, a clean
    signal even where accuracy barely moves), then the more val top-1 the model gets back when it alone stays fp32.
    Leaving one node in fp32 often gives little back: ORT still quantises a tensor that a quantised neighbour
    produces or consumes, so a bad activation range is only removed once both of its ends are in fp32.

    Returns:
        ``{"samples", "fp32": {"top1"}, "int8": {"top1", "sqnr_db"}, "nodes": [rows]}``; a row is
        ``{"rank", "node", "op_type", "quantized_only": {"top1", "sqnr_db"}, "fp32_only": {"top1", "sqnr_db"}}``.
    """
    folder = Path(folder)
    labels = np.asarray(labels).reshape(-1)
    reference = evaluate_onnx(prep.model, images)
    fp32_top1 = float(np.mean(reference.argmax(1) == labels))
    full = _score(quantize(prep, folder / "int8.onnx"), images, labels, reference)
    rows = []
    for i, node in enumerate(prep.nodes):
        log(f"sensitivity {i + 1}/{len(prep.nodes)}: {node}")
        q_only = _score(quantize(prep, folder / "only.onnx", only=[node]), images, labels, reference)
        f_only = _score(quantize(prep, folder / "except.onnx", exclude=[node]), images, labels, reference)
        rows.append({"node": node, "op_type": prep.op_types[node], "quantized_only": q_only, "fp32_only": f_only})
    rows.sort(key=lambda r: (r["quantized_only"]["sqnr_db"], -r["fp32_only"]["top1"], -r["fp32_only"]["sqnr_db"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return {"samples": len(labels), "fp32": {"top1": fp32_top1}, "int8": full, "nodes": rows}


def fallback_search(
    prep: Prepared,
    ranking: Sequence[str],
    images: np.ndarray,
    labels: np.ndarray,
    budget: float,
    folder: Path,
    max_nodes: int,
    latency: Callable[[Path], dict[str, float]] | None = None,
    log: Callable[[str], None] = lambda _: None,
    pool: int | None = None,
) -> dict[str, Any]:
    """Leave nodes in fp32 a few more at a time, greedily, until val top-1 >= fp32 top-1 - ``budget``.

    Step 0 is plain int8. Each further step tries, on top of the previous step's exclusions, every not yet
    excluded node of the first ``pool`` of ``ranking`` (all of it when None) alone and as a block with its
    analysed neighbours (``Prepared.neighbours``), and keeps the one that gives the best val top-1 (then fewer
    nodes, then the best output SQNR, then the better sensitivity rank). Greedy, not in rank order, and by block:
    the damage is often in a tensor two nodes share (a bad activation range only goes once both of its ends are
    fp32; alone, neither gives anything back), so what helps most depends on what is already excluded. The search
    stops at the first step within budget, or once ``max_nodes`` nodes are excluded; then the step with the best
    val top-1 is chosen (the fewest exclusions among equals) and ``within_budget`` is False.

    Returns:
        ``{"budget", "fp32_top1", "steps": [{"step", "excluded", "added", "val_top1", "sqnr_db", "tried",
        **latency}], "chosen", "within_budget", "model"}`` where ``model`` is the chosen step's file in ``folder``.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels).reshape(-1)
    reference = evaluate_onnx(prep.model, images)
    fp32_top1 = float(np.mean(reference.argmax(1) == labels))
    candidates = list(ranking[:pool] if pool is not None else ranking)
    excluded: list[str] = []
    steps: list[dict[str, Any]] = []
    groups: list[list[str]] = []  # what the next step may add
    for k in itertools.count():
        path = folder / f"fallback-{k}.onnx"
        added: list[str] = []
        if k == 0:
            score = _score(quantize(prep, path), images, labels, reference)
        else:
            best: tuple | None = None
            for i, group in enumerate(groups):
                trial = quantize(prep, folder / "trial.onnx", exclude=[*excluded, *group])
                got = _score(trial, images, labels, reference)
                order = (got["top1"], -len(group), got["sqnr_db"], -i)
                if best is None or order > best[0]:
                    best = (order, group, got)
                    trial.replace(path)
            assert best is not None
            _, added, score = best
            excluded.extend(added)
        step = {"step": k, "excluded": list(excluded), "added": list(added), "val_top1": score["top1"],
                "sqnr_db": score["sqnr_db"], "tried": len(groups), **(latency(path) if latency else {})}  # fmt: skip
        steps.append(step)
        log(f"int8_fallback step {k}: {len(excluded)} node(s) in fp32, val top-1 {score['top1']:.4f}")
        groups = _groups([c for c in candidates if c not in excluded], prep.neighbours, excluded, max_nodes)
        if score["top1"] >= fp32_top1 - budget or not groups:
            break
    within = steps[-1]["val_top1"] >= fp32_top1 - budget
    chosen = steps[-1]["step"] if within else max(steps, key=lambda s: (s["val_top1"], -s["step"]))["step"]
    return {"budget": budget, "fp32_top1": fp32_top1, "steps": steps, "chosen": chosen, "within_budget": within,
            "model": str(folder / f"fallback-{chosen}.onnx")}  # fmt: skip


def _groups(
    remaining: Sequence[str], neighbours: dict[str, list[str]], excluded: Sequence[str], max_nodes: int
) -> list[list[str]]:
    """What one fallback step may add: each remaining node alone, then as a block with its neighbours that are not
    yet excluded (when that is a different set), keeping within ``max_nodes`` exclusions in all."""
    room = max_nodes - len(excluded)
    seen: set[tuple[str, ...]] = set()
    out: list[list[str]] = []
    for node in remaining:
        block = [node, *[n for n in neighbours.get(node, []) if n not in excluded and n != node]]
        for group in ([node], block):
            key = tuple(sorted(group))
            if len(group) <= room and key not in seen:
                seen.add(key)
                out.append(group)
    return out


def step_latency(input_shape: Sequence[int], threads: int = 1) -> Callable[[Path], dict[str, float]]:
    """A quick batch-1 latency probe for :func:`fallback_search` (the edge runner's timing loop, in process)."""
    from kdpipe.edge.runner import measure_cell

    def probe(path: Path) -> dict[str, float]:
        (cell,) = measure_cell(str(path), list(input_shape), [1], threads=threads, warmup=5, min_runs=60,
                               min_seconds=0.3, max_seconds=3.0, rounds=3)  # fmt: skip
        return {"p50_ms": cell["p50_ms"], "p90_ms": cell["p90_ms"]}

    return probe


def make_int8_fallback(
    src: Path,
    dst: Path,
    calibration: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    budget: float,
    max_nodes: int,
    work: Path,
    method: str = "minmax",
    per_channel: bool = True,
    log: Callable[[str], None] = lambda _: None,
    candidates: int | None = 32,
) -> dict[str, Any]:
    """Static int8 with the fewest nodes left in fp32 that keeps val top-1 within ``budget`` of fp32.

    Returns the quantisation info for the report: calibration settings, the sensitivity table, the fallback steps
    (exclusions, val top-1, SQNR, batch-1 latency) and the chosen step.
    """
    import shutil

    prep = prepare(src, calibration, Path(work) / "prepared", method, per_channel)
    table = analyse(prep, val_images, val_labels, Path(work) / "analyse", log)
    ranking = [row["node"] for row in table["nodes"]]
    probe = step_latency(val_images.shape[1:])
    search = fallback_search(prep, ranking, val_images, val_labels, budget, Path(work) / "fallback", max_nodes,
                             latency=probe, log=log, pool=candidates)  # fmt: skip
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(search.pop("model"), dst)
    chosen = search["steps"][search["chosen"]]
    return {"calibration_samples": prep.calibration_samples, "method": method, "per_channel": per_channel,
            "excluded": chosen["excluded"], "sensitivity": table, "fallback": search}  # fmt: skip


@VARIANTS.register()
class Int8Fallback(Variant):
    """Static int8 with the most sensitive nodes left in fp32 until val top-1 is within the accuracy budget
    (registered here, beside what it runs; ``kdpipe.exporters`` imports this module)."""

    name = "int8_fallback"
    calibrated = True
    quantized = "int8"

    def build(self, src: Path, dst: Path, inputs: VariantInputs) -> dict:
        import tempfile

        if inputs.calibration is None or inputs.validation is None:
            raise ValueError("variant 'int8_fallback' needs calibration images and validation images with labels")
        with tempfile.TemporaryDirectory(prefix="kdpipe-fallback-") as tmp:
            return make_int8_fallback(
                src, dst, inputs.calibration, *inputs.validation, inputs.accuracy_budget, inputs.max_fallback_nodes,
                inputs.work_dir or Path(tmp), inputs.method, inputs.per_channel, inputs.log or (lambda _: None),
                inputs.fallback_candidates,
            )  # fmt: skip
