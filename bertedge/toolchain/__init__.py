"""The build side: fine-tuning, ONNX export, quantization and benchmarks (torch, transformers, onnx).

Needs `pip install 'bertedge[train]'`. It imports the task records, features and bundle format
from `bertedge.runtime`; the runtime never imports from here.
"""
