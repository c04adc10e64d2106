"""Multiply-accumulates per image, counted from the ONNX graph that ships (the first figure edge users ask for).

Counted on the exported file rather than the PyTorch module so that every model of a report (teacher,
student and each int8/fp16 variant) is measured the same way, on exactly what runs: ONNX shape inference
gives every tensor's shape at batch 1, and each compute node adds its MACs:

- ``Conv``/``ConvInteger``/``QLinearConv``: output elements × (input channels / groups) × kernel area;
- ``ConvTranspose``: input elements × (output channels / groups) × kernel area;
- ``Gemm``/``MatMul``/``MatMulInteger``/``QLinearMatMul``: output elements × the reduced dimension.

Element-wise ops, pooling and normalisation are left out, as usual for MAC counts; FLOPs are reported as
2 × MACs. Quantisation changes the arithmetic's precision, not the count, so a variant has its fp32 model's
MACs (the variants' own graphs confirm it). Nothing here imports torch; onnx only when counting, which the
export stage does once per export (its metrics keep the figures), so rendering a report imports no onnx.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

METHOD = "onnx-graph"
CONV = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}  # (input index, weight index)
MATMUL = {"Gemm": (0, 1), "MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "FusedMatMul": (0, 1)}


def _dims(value_info: Any) -> list[int] | None:
    """Static dims of a tensor, with symbolic or unknown dims (the batch) taken as 1; None if the rank is unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in t.shape.dim]


def _shapes(model: Any) -> dict[str, list[int]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes: dict[str, list[int]] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        dims = _dims(vi)
        if dims is not None:
            shapes[vi.name] = dims
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_macs(node: Any, shapes: dict[str, list[int]]) -> int | None:
    """MACs of one node at batch 1; 0 for ops that are not counted, None when a needed shape is unknown."""
    op = node.op_type
    if op in CONV or op == "ConvTranspose":
        i, w = CONV.get(op, (0, 1))
        weight, out = shapes.get(node.input[w]), shapes.get(node.output[0])
        if weight is None or out is None or len(weight) < 3:
            return None
        # weight: (C_out, C_in/groups, k...) for Conv, (C_in, C_out/groups, k...) for ConvTranspose
        if op == "ConvTranspose":
            x = shapes.get(node.input[i])
            return None if x is None else math.prod(x) * weight[1] * math.prod(weight[2:])
        return math.prod(out) * weight[1] * math.prod(weight[2:])
    if op in MATMUL:
        i, w = MATMUL[op]
        a, out = shapes.get(node.input[i]), shapes.get(node.output[0])
        if a is None or out is None or not a:
            return None
        k = a[-2] if op == "Gemm" and int(_attr(node, "transA", 0)) else a[-1]
        return math.prod(out) * k
    return 0


def part_of(node: Any) -> str | None:
    """The top-level submodule a node came from (``body``, ``projector``, ``head`` of a SimKD student), if known.

    torch's dynamo exporter stamps each node's module path into ``pkg.torch.onnx.name_scopes``; the
    TorchScript exporter puts it in the node name (``/projector/projector.1/Conv``).
    """
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(prop.value) if s]
            except (ValueError, SyntaxError):
                return None
            return scopes[0].split(".")[0] if scopes else None
    if node.name.startswith("/") and node.name.count("/") > 1:
        return node.name.split("/")[1].split(".")[0]
    return None


def count_macs(path: str | Path) -> dict[str, Any]:
    """``{"macs", "flops", "method", "per_op", "per_part", "uncounted"}`` per image of one ONNX file (batch 1).

    ``per_part`` splits the MACs by top-level submodule where the exporter recorded it (else it is empty).
    ``uncounted`` lists compute nodes whose shapes inference could not give; their MACs are missing
    from the total, which is then a lower bound (said, not hidden).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes = _shapes(model)
    total, per_op, per_part, uncounted = 0, {}, {}, []
    for node in model.graph.node:
        macs = node_macs(node, shapes)
        if macs is None:
            uncounted.append(node.name or node.op_type)
            continue
        if macs:
            total += macs
            per_op[node.op_type] = per_op.get(node.op_type, 0) + macs
            part = part_of(node) or "other"
            per_part[part] = per_part.get(part, 0) + macs
    if set(per_part) == {"other"}:
        per_part = {}
    return {
        "macs": total,
        "flops": 2 * total,
        "method": METHOD,
        "per_op": per_op,
        "per_part": per_part,
        "uncounted": uncounted,
    }


def add_macs(models: dict[str, dict[str, Any]], folder: Path) -> dict[str, dict[str, Any]]:
    """Set ``macs`` on every model (the export stage's entries, each naming its ``file``) whose ONNX file is in
    ``folder``; returns ``models``. The export stage counts them once, into its metrics: the report reads them.

    A variant whose own graph cannot be counted (an op this counter does not know) keeps its fp32 model's
    count, which quantisation does not change; a file that cannot be read at all gets no figure.
    """
    for m in models.values():
        file = m.get("file")
        if not file or not (Path(folder) / file).is_file():
            continue
        try:
            m["macs"] = count_macs(Path(folder) / file)
        except Exception as exc:  # a model the counter cannot read is reported without MACs, never fails a run
            m["macs"] = {"macs": None, "method": METHOD, "error": f"{type(exc).__name__}: {exc}"[:200]}
    student = (models.get("student") or {}).get("macs") or {}
    for m in models.values():
        if "variant" in m and student.get("macs") and (m.get("macs") or {}).get("uncounted"):
            m["macs"] = {**student, "note": "the fp32 student's count (quantisation keeps the MACs)"}
    return models


def format_macs(macs: float | None) -> str:
    """41.2M, 1.35G: MAC counts are read in orders of magnitude."""
    if macs is None:
        return "–"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if macs >= scale:
            return f"{macs / scale:.3g}{unit}"
    return f"{macs:.0f}"
