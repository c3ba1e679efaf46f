"""The base layer: model files, graphs, weights, data layout, onnxruntime sessions, the option schema
and reports. Everything else in onnxzip builds on it; it imports nothing above it."""
