"""Deployment artefacts: ONNX export, ONNX Runtime and TensorRT runners, parity checks.

    export_onnx("camnet", "cam.safetensors", "cam.onnx")     # + cam.onnx.json sidecar
    OrtRunner("cam.onnx").run(images_uint8)                  # {"cams", "mask"}, like CamLabeler.run
    check_parity("cam.onnx", images="VOC2012")               # ParityReport
    build_engine("cam.onnx", "cam.engine", precision="fp16") # extra [trt]; not run in CI

Names are imported lazily so `import wsclip.export` needs neither onnx nor TensorRT.
"""

from __future__ import annotations

from wsclip.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "wsclip.export.onnx": "export_onnx read_sidecar verify_artefact sidecar_of", "wsclip.export.ort": "OrtRunner",
    "wsclip.export.parity": "check_parity open_artefact open_labeler ParityReport",
    "wsclip.export.precision": "to_fp16 quantize", "wsclip.export.tensorrt": "build_engine TrtRunner check_engine_metadata",
    "wsclip.export.wrappers": "build_spec spec_from_sidecar",
})
