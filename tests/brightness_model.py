"""A real ONNX model package with a known decision function, for deterministic pipeline tests.

``defect_grade`` is the class whose centre is nearest the image's mean brightness
(centres 32, 96, 160, 224 → "0", "1/3", "2/3", "1"); ``cell_type`` is "mono" below 128, else
"poly".  Confidence falls off between centres, so mid-grey images give unsure (held) results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.model_package import (
    CARD_FILE,
    INPUT_NAME,
    ONNX_FILE,
    CardHead,
    ModelCard,
    ModelInput,
    new_version,
    sha256_file,
)

GRADES = ["0", "1/3", "2/3", "1"]
CENTRES = [32.0, 96.0, 160.0, 224.0]


def brightness_for(grade: str) -> int:
    return int(CENTRES[GRADES.index(grade)])


OUTPUTS = ("defect_grade_probs", "cell_type_probs")


def make_brightness_model(out: Path, version: str | None = None, sharpness: float = 12.0,
                          output_names: tuple[str, str] = OUTPUTS,
                          centres: tuple[float, ...] = tuple(CENTRES)) -> ModelCard:
    """Write the package into ``out``; other ``centres`` make a deliberately different (worse) model."""
    out.mkdir(parents=True, exist_ok=True)
    inits = [
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(np.array(centres, np.float32).reshape(1, 4), "centres"),
        numpy_helper.from_array(np.array(-1.0 / sharpness**2, np.float32), "neg_scale"),
        numpy_helper.from_array(np.array([[-0.1, 0.1]], np.float32), "type_w"),
        numpy_helper.from_array(np.array([[12.8, -12.8]], np.float32), "type_b"),
    ]
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f", "axes"], ["mean"], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "one"], ["m"]),
        helper.make_node("Sub", ["m", "centres"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("Mul", ["d2", "neg_scale"], ["grade_logits"]),
        helper.make_node("Softmax", ["grade_logits"], [output_names[0]], axis=1),
        helper.make_node("Mul", ["m", "type_w"], ["tw"]),
        helper.make_node("Add", ["tw", "type_b"], ["type_logits"]),
        helper.make_node("Softmax", ["type_logits"], [output_names[1]], axis=1),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
    graph = helper.make_graph(
        nodes, "brightness",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", "H", "W"])],
        [helper.make_tensor_value_info(output_names[0], TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info(output_names[1], TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, out / ONNX_FILE)
    card = ModelCard(
        version=version or new_version(salt=str(out)),
        architecture="brightness-test-model",
        input=ModelInput(layout="NHW", channels=1, height=64, width=64),
        heads=[CardHead(name="defect_grade", classes=GRADES, ordinal=True),
               CardHead(name="cell_type", classes=["mono", "poly"])],
        onnx_sha256=sha256_file(out / ONNX_FILE),
    )
    (out / CARD_FILE).write_text(card.model_dump_json(indent=2))
    return card
