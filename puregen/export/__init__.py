"""ONNX export and the ONNX Runtime / TensorRT runners (planned: export issue)."""
