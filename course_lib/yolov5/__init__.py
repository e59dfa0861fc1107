"""Chapter 6: YOLOv5 -- the detector (model), letterbox / NMS / drawing (processing), output checks (check)."""
from .check import OutputCheck, check_outputs, match_detections
from .model import INPUT_NAME, OUTPUT_NAME, SIZES, YOLOv5, YOLOv5Config, fuse_conv_bn, yolov5_preset
from .weights import load_yolov5_weights, randomize_
from .processing import (Detections, Letterbox, PostProcessor, PreProcessor, box_iou, draw_boxes, letterbox, nms,
                         xywh_to_xyxy)

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "SIZES", "YOLOv5", "YOLOv5Config", "fuse_conv_bn", "load_yolov5_weights",
           "randomize_", "yolov5_preset", "Detections", "Letterbox", "PostProcessor", "PreProcessor", "box_iou",
           "draw_boxes", "letterbox", "nms", "xywh_to_xyxy", "OutputCheck", "check_outputs", "match_detections"]
