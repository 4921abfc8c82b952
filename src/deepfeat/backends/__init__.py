"""Inference backends: the descriptor network (normalise -> tapped backbone -> pool) and the engines
that run it (eager torch, ONNX Runtime, OpenVINO), padded batches, and the check that two engines
give the same descriptors."""
