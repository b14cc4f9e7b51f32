"""The export end of the pipeline: fold masks, report sparsity/params/MACs, sparse ONNX."""
