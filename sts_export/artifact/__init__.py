"""The export directory's contract, at the bottom of the house: what every builder writes and every runner reads.

    plan.py      Plan (what an export configuration holds) and the graphs' IO names
    manifest.py  manifest.json: written atomically, read with every file's sha256 checked
    memory.py    host-memory estimates (export, validation, engine builds) and the export's temporary directories
    params.py    parameter counts per graph, from a recipe alone
    protocol.py  the Backend / KVCache protocols

Torch-free, imports nothing above families/pruning/recipe: the TensorRT build and runtime on a Jetson read it with
tensorrt + numpy + onnx only.
"""
