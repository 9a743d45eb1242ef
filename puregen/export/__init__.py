"""Export of the purifiers' networks: ONNX graphs and the TensorRT engines built from them.

* `onnx_export`: ONNX graphs of the EBM's input gradient (a plain forward
  graph, see `gradient_graph`) and of the UNet, each with a JSON sidecar and
  validated against the fp32 torch model before it is kept.
* `tensorrt_engines`: TensorRT engines built from those graphs and their
  checked cache (experimental, imports TensorRT lazily).
* `commands`: `puregen export onnx|tensorrt`.

The backends that run them (`--backend onnxruntime|tensorrt`) are in
`puregen.backends`; nothing here imports the engine or the backends.

Everything here needs the optional `onnx` extra (`pip install 'puregen[onnx]'`);
importing this package does not.
"""
