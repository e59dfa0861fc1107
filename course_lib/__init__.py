"""course_lib: the library behind the StableDiffusionEO chapter notebooks.

PyTorch -> ONNX -> TensorRT for ControlNet 1.0 canny on Stable Diffusion 1.5 (CNSD) and YOLOv5.
"""
import os as _os
import sys as _sys

# OpenMP threads that sleep when idle: without it PyTorch collapses on a shared machine (course_lib.threads).
# Effective only before PyTorch's first import; a choice the user made in the environment is kept.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
