"""course_lib: the library behind the StableDiffusionEO chapter notebooks.

PyTorch -> ONNX -> TensorRT for ControlNet 1.0 canny on Stable Diffusion 1.5 (CNSD) and YOLOv5.
"""
__version__ = "0.1.0"
