"""ONNX export of µLM checkpoints (`python -m export`): graph export with an explicit KV cache, verification
against PyTorch, dynamic int8 quantization, and the export-directory format the ONNX Runtime backend serves."""
