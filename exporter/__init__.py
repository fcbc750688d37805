"""Host side, with torch: tracing a model into a program, splitting it, emitting each module's dual
graphs as ONNX (with the core's rules), the model zoo, the torch reference and validation."""
