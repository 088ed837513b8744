"""Deployment artefacts: ONNX export, ONNX Runtime and TensorRT runners, parity checks.

    export_onnx("camnet", "cam.safetensors", "cam.onnx")     # + cam.onnx.json sidecar
    OrtRunner("cam.onnx").run(images_uint8)                  # {"cams", "mask"}, like CamLabeler.run
    check_parity("cam.onnx", images="VOC2012")               # ParityReport
    build_engine("cam.onnx", "cam.engine", precision="fp16") # extra [trt]; not run in CI

Names are imported lazily so `import wsclip.export` needs neither onnx nor TensorRT.
"""

from __future__ import annotations

from wsclip.lazy import lazy_exports

_EXPORTS = {
    "export_onnx": "wsclip.export.onnx",
    "read_sidecar": "wsclip.export.onnx",
    "verify_artefact": "wsclip.export.onnx",
    "sidecar_of": "wsclip.export.onnx",
    "OrtRunner": "wsclip.export.ort",
    "check_parity": "wsclip.export.parity",
    "open_artefact": "wsclip.export.parity",
    "open_labeler": "wsclip.export.parity",
    "ParityReport": "wsclip.export.parity",
    "to_fp16": "wsclip.export.precision",
    "quantize": "wsclip.export.precision",
    "build_engine": "wsclip.export.tensorrt",
    "TrtRunner": "wsclip.export.tensorrt",
    "check_engine_metadata": "wsclip.export.tensorrt",
    "build_spec": "wsclip.export.wrappers",
    "spec_from_sidecar": "wsclip.export.wrappers",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
