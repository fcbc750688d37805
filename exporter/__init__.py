"""Host side: model zoo, splitting, forward-mode dual rules, ONNX export and validation."""
