"""Chapter 6: YOLOv5 -- the detector (model), letterbox / NMS / drawing (processing), output checks (check)."""
from .model import (INPUT_NAME, OUTPUT_NAME, SIZES, YOLOv5, YOLOv5Config, fuse_conv_bn, load_yolov5_weights,
                    randomize_, yolov5_preset)

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "SIZES", "YOLOv5", "YOLOv5Config", "fuse_conv_bn", "load_yolov5_weights",
           "randomize_", "yolov5_preset"]
