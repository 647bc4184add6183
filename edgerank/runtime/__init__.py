"""The runtime: ranks an already-resolved model (an artifact folder, an HF folder or a GGUF file).

Never downloads or converts: ``edgerank.models`` turns a name into something this floor runs.
Installs with numpy, tokenizers, onnxruntime and psutil."""
