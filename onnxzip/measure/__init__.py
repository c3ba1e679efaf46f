"""Measuring and checking a model file at the base of the package: parameters and FLOPs (cost),
measured onnxruntime latency (latency) and checks of untrusted files (sanity). Imports only the
base modules (graph, io, runtime, shapes, inputs, compat, errors), so the maths subpackages and the
passes may use it."""
