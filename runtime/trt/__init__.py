"""EXPERIMENTAL TensorRT backend for NVIDIA Jetson (engine building and the module runner).

None of this code has ever been executed: TensorRT and pycuda cannot be installed on the machines
this project is built and tested on, and the GPU machines lent to it have no TensorRT either. It
is written against the TensorRT 10 and pycuda documentation; only its import without TensorRT,
its BackendUnavailable path and its pure engine-cache logic are tested. Treat the first run on a
device as its first test (docs/gpu.md).
"""
