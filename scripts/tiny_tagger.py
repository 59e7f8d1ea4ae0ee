"""A tiny WD14-signature ONNX tagger built with onnx.helper: used by the caption tests, the benchmark and the demo.

The graph: input `input_1:0` (N, S, S, 3) float32 -> mean over H, W -> / 255 -> @ W (3, T) + b
-> sigmoid (optional) -> `predictions_sigmoid` (N, T). With W = 0 every image gets sigmoid(b), so
tests choose each tag's probability exactly; with W = I and no sigmoid the output is the mean
B, G, R that reached the model.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def write_tags_csv(path: Path, tags: list[tuple[str, int]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category) in enumerate(tags):
            writer.writerow([1000 + i, name, category, 100 - i])
    return path


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def build_tiny_tagger(
    folder: Path,
    tags: list[tuple[str, int]],
    probs: list[float] | None = None,
    size: int = 16,
    weights: np.ndarray | None = None,
    sigmoid: bool = True,
    batch_dim: int | str = "batch",
    layout: str = "folder",
) -> Path:
    """Write a tagger and its csv; return the model path.

    layout "folder": folder/model.onnx + folder/selected_tags.csv; "named": folder/tiny.onnx + tiny.csv.
    `probs` fixes each tag's probability (image-independent); `weights` (3, T) makes it depend on B, G, R.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(tags)
    w = np.zeros((3, n), np.float32) if weights is None else np.asarray(weights, np.float32)
    b = np.array([logit(p) for p in probs], np.float32) if probs is not None else np.zeros(n, np.float32)
    last = "logits"
    nodes = [
        helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Div", ["mean", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "W"], ["proj"]),
        helper.make_node("Add", ["proj", "b"], ["logits"]),
    ]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["predictions_sigmoid"]))
    graph = helper.make_graph(
        nodes,
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch_dim, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch_dim, n])],
        initializer=[
            numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    stem = "model" if layout == "folder" else "tiny"
    model_path = folder / f"{stem}.onnx"
    onnx.save(model, str(model_path))
    write_tags_csv(folder / ("selected_tags.csv" if layout == "folder" else f"{stem}.csv"), tags)
    return model_path
