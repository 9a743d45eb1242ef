"""Export of the purifiers' networks and the backends that run the exports.

* `onnx_export`: ONNX graphs of the EBM's input gradient (a plain forward
  graph, see `gradient_graph`) and of the UNet, each with a JSON sidecar and
  validated against the fp32 torch model before it is kept.
* `onnxruntime_backend`: `--backend onnxruntime`.
* `tensorrt_backend`: `--backend tensorrt` (experimental, imports TensorRT lazily).
* `commands`: `puregen export onnx|tensorrt`.

Everything here needs the optional `onnx` extra (`pip install 'puregen[onnx]'`);
importing this package does not.
"""
