"""Generation: the PixArtPipeline (pipeline) and the OpenVINO export and runtime (openvino)."""
