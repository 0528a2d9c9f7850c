"""Static int8 quantization for ONNX Runtime: weights and activations in int8, ranges calibrated.

The design's "static quantization": the stage input is exported in fp32 by onnxruntime-genai's
model builder (tasks.techniques.onnx), then ONNX Runtime's own `quantize_static` inserts
QuantizeLinear/DequantizeLinear pairs around every MatMul, with activation ranges calibrated on
the recipe's calibration windows (each window run through the model from an empty KV cache).
ONNX Runtime's CPU provider fuses those pairs into int8 MatMul kernels (VNNI where the CPU has
it). The folder is the builder's, with the quantized model in place of the fp32 one, so the
`onnxruntime_genai` runtime measures it like any ONNX variant.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from byoai.memory import loads_model
from byoai.tasks.techniques import BuildInputs, BuildResult, Technique, TechniqueError
from byoai.tasks.techniques.onnx import READABLE, OnnxConfig, export, input_format, onnx_facts

MODEL_FILE = "model.onnx"


class OnnxStaticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # how activation ranges are read from the calibration run
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    # one weight scale per output channel (more accurate, same speed) or per tensor
    per_channel: bool = True
    # 7-bit weights: needed on CPUs without VNNI to avoid int16 overflow in u8s8 kernels
    reduce_range: bool = False


class WindowReader:
    """onnxruntime.quantization's CalibrationDataReader over the calibration windows: every
    window as one prefill from an empty KV cache, with the inputs the builder's graph declares."""

    def __init__(self, model_path: Path, calibration_ids):
        import numpy as np
        import onnxruntime

        session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in session.get_inputs()]
        del session
        decoder = json.loads((model_path.parent / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_shape = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])
        self.rows = [np.asarray(row, dtype=np.int64)[None] for row in calibration_ids.tolist()]
        self.np = np

    def _feed(self, ids) -> dict:
        np = self.np
        feed: dict = {}
        for name in self.inputs:
            if name == "input_ids":
                feed[name] = ids
            elif name == "attention_mask":
                feed[name] = np.ones_like(ids)
            elif name == "position_ids":
                feed[name] = np.arange(ids.shape[1], dtype=np.int64)[None]
            elif name.startswith("past_key_values"):  # an empty cache: each window is a prefill
                feed[name] = np.zeros(self.kv_shape, dtype=np.float32)
            else:
                raise TechniqueError(f"onnx_static does not know how to feed the model input {name} for calibration")
        return feed

    def __iter__(self):
        return (self._feed(ids) for ids in self.rows)


def quantize(fp32_dir: Path, out_dir: Path, config: OnnxStaticConfig, calibration_ids) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader_rows = iter(WindowReader(fp32_dir / MODEL_FILE, calibration_ids))

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(reader_rows, None)

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    quantize_static(
        str(fp32_dir / MODEL_FILE), str(out_dir / MODEL_FILE), Reader(),
        quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        per_channel=config.per_channel, reduce_range=config.reduce_range,
        calibrate_method=methods[config.calibration_method], use_external_data_format=True,
        extra_options={"CalibTensorRangeSymmetric": False},
    )


def run(inputs: BuildInputs) -> BuildResult:
    config: OnnxStaticConfig = inputs.config
    if inputs.device != "cpu":
        raise TechniqueError("onnx_static targets ONNX Runtime's CPU int8 kernels; on a cuda target use onnx with precision int8 or int4")
    if (reason := input_format(inputs.model_dir)) is not None:
        raise TechniqueError(f"onnx_static cannot export this input: {reason}. The model builder reads {READABLE}")
    with tempfile.TemporaryDirectory(prefix="byoai-onnx-fp32-", dir=inputs.out_dir.parent) as work:
        fp32 = Path(work)
        export(inputs.model_dir, fp32, OnnxConfig(precision="fp32", shared_embeddings=False), "cpu")
        quantize(fp32, inputs.out_dir, config, inputs.calibration_ids)
        for item in fp32.iterdir():  # genai_config.json, tokenizer files: everything but the fp32 graph
            if not item.name.startswith(MODEL_FILE):
                shutil.copy2(item, inputs.out_dir / item.name)
    facts = {
        "format": "onnx", "precision": "int8-static", "quant_type": f"int8-static-{config.calibration_method}",
        "execution_provider": "cpu", "calibration_windows": int(inputs.calibration_ids.shape[0]),
        **onnx_facts(inputs.out_dir),
    }
    return BuildResult(model_dir=inputs.out_dir, facts=facts, format="onnx")


TECHNIQUE = Technique(
    name="onnx_static",
    summary="static int8 (weights and activations, calibrated ranges): the builder's fp32 ONNX + ONNX Runtime's quantize_static (QDQ)",
    config=OnnxStaticConfig,
    footprint=loads_model(extra_per_param=8, note="float32 ONNX export, then calibrated QDQ"),
    run=run,
    devices=frozenset({"cpu"}),
    needs_calibration=True,
    output_format="onnx",
)
