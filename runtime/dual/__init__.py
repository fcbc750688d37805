"""The dual-rule core: the program IR, the op vocabulary, the dual rules and their interpreter.

Everything here runs on the device (the torch backend interprets programs with it) and on the
host (the exporter emits ONNX with it); none of it imports torch at module level."""
