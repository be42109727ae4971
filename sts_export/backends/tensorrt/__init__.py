"""Running TensorRT engines: `runtime.TrtBackend`, and `discovery` (finding TensorRT and the GPU, whether engines
built elsewhere run here). Importable without TensorRT. Building engines is `sts_export.export.tensorrt`."""
