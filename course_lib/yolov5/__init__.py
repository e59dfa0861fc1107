"""Chapter 6: YOLOv5 -- the detector (model), letterbox / NMS / drawing (processing), output checks (check)."""
from course_lib.yolov5.check import (FP16_TOLERANCE, FP32_TOLERANCE, OutputCheck, check_outputs, comparison_threshold,
                                     match_detections)
from course_lib.yolov5.model import INPUT_NAME, OUTPUT_NAME, SIZES, YOLOv5, YOLOv5Config, fuse_conv_bn, yolov5_preset
from course_lib.yolov5.init import randomize_
from course_lib.yolov5.weights import load_yolov5_weights
from course_lib.yolov5.processing import (Detections, Letterbox, PostProcessor, PreProcessor, box_iou, draw_boxes, letterbox, nms,
                         xywh_to_xyxy)

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "SIZES", "YOLOv5", "YOLOv5Config", "fuse_conv_bn", "load_yolov5_weights",
           "randomize_", "yolov5_preset", "Detections", "Letterbox", "PostProcessor", "PreProcessor", "box_iou",
           "draw_boxes", "letterbox", "nms", "xywh_to_xyxy", "OutputCheck", "check_outputs", "match_detections",
           "FP16_TOLERANCE", "FP32_TOLERANCE", "comparison_threshold"]
