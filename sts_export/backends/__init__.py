"""Backends run the graphs of an export (or the torch modules) by name, on one protocol
(`sts_export.artifact.protocol.Backend`):

    torch.py        our PyTorch modules (the reference; eager or torch.compile)
    onnxruntime.py  the ONNX graphs of an export directory (CPU or CUDA provider)
    tensorrt/       the engine runtime
    aoti.py         the AOTInductor packages (<graph>.pt2) of an export directory (torch tensors)

Building what they run (ONNX export, engines, packages) lives in `sts_export.export`; this package imports none of it.
"""
