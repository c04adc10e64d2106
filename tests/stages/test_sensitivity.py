"""Sensitivity analysis and int8 fallback on a tiny ONNX graph with one deliberately fragile node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kdpipe.exporters.sensitivity import analyse, fallback_search, make_int8_fallback, prepare, quantize, sqnr_db
from kdpipe.exporters.variants import evaluate_onnx

SCALE = 1000.0  # input channel 0 spans ±SCALE, channel 1 ±1: one uint8 range for both erases channel 1


def _save(nodes: list, inits: list, size: int, path: Path) -> Path:
    """A checked opset-17 model of ``nodes``: input x (N, 2, size, size), output logits (N, 4)."""
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def fragile_model(path: Path) -> Path:
    """x(2 ch) → conv_a → Relu → conv_b → Relu → GAP → Flatten → gemm. conv_a reads channel 0 with weights
    1/SCALE, so both channels matter equally, but quantising conv_a's input (the graph input) with one
    per-tensor range rounds channel 1 away: conv_a is the fragile node."""
    rng = np.random.default_rng(0)
    wa = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    wa[:, 0] /= SCALE
    inits = [
        numpy_helper.from_array(wa, "wa"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32) * 0.1, "ba"),
        numpy_helper.from_array(rng.standard_normal((6, 6, 3, 3)).astype(np.float32) * 0.3, "wb"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32) * 0.1, "bb"),
        numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "wg"),
        numpy_helper.from_array(np.zeros(4, np.float32), "bg"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
        helper.make_node("Conv", ["ar", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["br"], name="relu_b"),
        helper.make_node("GlobalAveragePool", ["br"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], name="gemm", transB=1),
    ]
    return _save(nodes, inits, 8, path)


def images(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 2, 8, 8)).astype(np.float32)
    x[:, 0] *= SCALE
    return x


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sens")
    src = fragile_model(folder / "fp32.onnx")
    prep = prepare(src, images(64, 1), folder / "prep")
    val = images(200, 2)
    labels = evaluate_onnx(src, val).argmax(1)  # fp32 is right by definition: top-1 1.0
    return prep, val, labels, folder


def test_sqnr() -> None:
    ref = np.ones((4, 3), np.float32)
    assert sqnr_db(ref, ref) > 300
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0, abs=1e-3)  # noise 0.1 of the signal: 20 dB


def test_fragile_node_ranks_first(prepared) -> None:
    prep, val, labels, folder = prepared
    assert prep.nodes == ["conv_a", "conv_b", "gap", "gemm"]
    table = analyse(prep, val, labels, folder / "analyse")
    assert table["fp32"]["top1"] == 1.0
    assert table["int8"]["top1"] < 0.9  # plain int8 is visibly broken
    first = table["nodes"][0]
    assert first["node"] == "conv_a" and first["rank"] == 1
    assert first["fp32_only"]["top1"] > table["int8"]["top1"] + 0.1  # keeping it in fp32 gives accuracy back
    others = [r["quantized_only"]["sqnr_db"] for r in table["nodes"][1:]]
    assert first["quantized_only"]["sqnr_db"] < min(others)


def test_fallback_stops_within_budget(prepared) -> None:
    prep, val, labels, folder = prepared
    timed: list[Path] = []
    result = fallback_search(
        prep, ["conv_a", "conv_b", "gap", "gemm"], val, labels, 0.05, folder / "fb", max_nodes=4,
        latency=lambda p: timed.append(p) or {"p50_ms": 1.0},
    )  # fmt: skip
    steps = result["steps"]
    assert result["within_budget"] and result["chosen"] == steps[-1]["step"]
    assert steps[0]["excluded"] == [] and steps[0]["val_top1"] < 1.0 - 0.05
    assert steps[-1]["val_top1"] >= 1.0 - 0.05
    assert len(steps) < 5 and len(timed) == len(steps) and steps[-1]["p50_ms"] == 1.0
    chosen = onnx.load(result["model"])
    conv_a = next(n for n in chosen.graph.node if n.name == "conv_a")
    assert not any(i.endswith("_DequantizeLinear_Output") for i in conv_a.input)  # fp32 weights and input


def test_fallback_is_greedy_not_rank_order(prepared, tmp_path: Path) -> None:
    """The fragile node is found even when the ranking puts it last: each step tries every candidate."""
    prep, val, labels, _ = prepared
    result = fallback_search(prep, ["gemm", "gap", "conv_b", "conv_a"], val, labels, 0.05, tmp_path, max_nodes=4)
    steps = result["steps"]
    assert [s["excluded"] for s in steps] == [[], ["conv_a"]] and steps[1]["added"] == ["conv_a"]
    # each node alone and as a block with its neighbours: 4 singles, 4 blocks (gemm+gap, gap+conv_b+gemm, ...)
    assert prep.neighbours == {"conv_a": ["conv_b"], "conv_b": ["conv_a", "gap"], "gap": ["conv_b", "gemm"],
                               "gemm": ["gap"]}  # fmt: skip
    assert steps[1]["tried"] == 8
    assert result["within_budget"] and result["chosen"] == 1  # conv_a alone: fewer nodes beat a block that ties
    limited = fallback_search(prep, ["gemm", "gap", "conv_b", "conv_a"], val, labels, 0.05, tmp_path / "pool",
                              max_nodes=2, pool=2)  # fmt: skip
    # pool 2: gemm, gemm+gap, gap (gap+conv_b+gemm is over max_nodes)
    assert "conv_a" not in limited["steps"][-1]["excluded"] and limited["steps"][1]["tried"] == 3


def pair_model(path: Path) -> Path:
    """x(2 ch) → conv_a → Relu → conv_b → Relu → GAP → Flatten → gemm, where the fragile tensor is the one
    conv_a and conv_b share: conv_a makes channel 0 SCALE times channel 1, conv_b reads channel 0 with weights
    1/SCALE. Quantised at either end, one range erases channel 1 (and conv_b's per-channel weight scale, set by
    channel 1's weights, rounds channel 0's to 0). Neither node alone in fp32 helps; both together do."""
    rng = np.random.default_rng(1)
    wa = np.zeros((2, 2, 1, 1), np.float32)
    wa[0, 0], wa[1, 1] = SCALE, 1.0
    wb = rng.standard_normal((6, 2, 1, 1)).astype(np.float32)
    wb[:, 0] /= SCALE
    inits = [
        numpy_helper.from_array(wa, "wa"),
        numpy_helper.from_array(np.zeros(2, np.float32), "ba"),
        numpy_helper.from_array(wb, "wb"),
        numpy_helper.from_array(np.zeros(6, np.float32), "bb"),
        numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "wg"),
        numpy_helper.from_array(np.zeros(4, np.float32), "bg"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a"),
        helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
        helper.make_node("Conv", ["ar", "wb", "bb"], ["b"], name="conv_b"),
        helper.make_node("GlobalAveragePool", ["b"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], name="gemm", transB=1),
    ]
    return _save(nodes, inits, 4, path)


def test_fallback_finds_a_pair_neither_of_which_helps_alone(tmp_path: Path) -> None:
    src = pair_model(tmp_path / "fp32.onnx")
    rng = np.random.default_rng(3)
    prep = prepare(src, rng.standard_normal((64, 2, 4, 4)).astype(np.float32), tmp_path / "prep")
    val = rng.standard_normal((300, 2, 4, 4)).astype(np.float32)
    labels = evaluate_onnx(src, val).argmax(1)
    alone = {node: float(np.mean(evaluate_onnx(quantize(prep, tmp_path / f"{node}.onnx", exclude=[node]), val)
                                 .argmax(1) == labels)) for node in ("conv_a", "conv_b")}  # fmt: skip
    both = evaluate_onnx(quantize(prep, tmp_path / "both.onnx", exclude=["conv_a", "conv_b"]), val).argmax(1)
    assert max(alone.values()) < 0.9 and np.mean(both == labels) > 0.97  # the premise: only the pair helps
    result = fallback_search(prep, ["conv_a", "conv_b", "gap", "gemm"], val, labels, 0.03, tmp_path / "fb",
                             max_nodes=4)  # fmt: skip
    assert result["within_budget"] and len(result["steps"]) == 2
    assert sorted(result["steps"][1]["added"]) == ["conv_a", "conv_b"]


def test_no_budget_met_picks_the_best_step(prepared, tmp_path: Path) -> None:
    prep, val, labels, _ = prepared
    result = fallback_search(prep, ["gemm", "gap"], val, labels, 0.0, tmp_path, max_nodes=1)
    assert not result["within_budget"] and len(result["steps"]) == 2
    best = max(s["val_top1"] for s in result["steps"])
    assert result["steps"][result["chosen"]]["val_top1"] == best


def test_only_and_exclude_select_nodes(prepared, tmp_path: Path) -> None:
    prep, *_ = prepared
    only = onnx.load(str(quantize(prep, tmp_path / "only.onnx", only=["gemm"])))
    q_consumers = {n.name for n in only.graph.node if any("DequantizeLinear" in i for i in n.input)}
    assert "gemm" in q_consumers and "conv_a" not in q_consumers


def test_make_int8_fallback_writes_the_chosen_model(tmp_path: Path) -> None:
    src = fragile_model(tmp_path / "fp32.onnx")
    val = images(120, 3)
    labels = evaluate_onnx(src, val).argmax(1)
    info = make_int8_fallback(src, tmp_path / "fb.onnx", images(64, 1), val, labels, 0.05, 3, tmp_path / "work")
    assert info["excluded"][0] == "conv_a" and info["fallback"]["within_budget"]
    assert info["sensitivity"]["nodes"][0]["node"] == "conv_a"
    assert all(s["p50_ms"] > 0 for s in info["fallback"]["steps"])
    test = images(100, 4)
    agree = evaluate_onnx(tmp_path / "fb.onnx", test).argmax(1) == evaluate_onnx(src, test).argmax(1)
    assert agree.mean() >= 0.9
