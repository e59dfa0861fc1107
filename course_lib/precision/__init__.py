"""Lower precision: FP16 (chapter 3) and INT8 (chapter 5), both as ONNX transforms TensorRT builds as-is.

* :mod:`.ranges`       which tensors overflow fp16 (range survey, chapter 3)
* :mod:`.fp16`         the strongly typed FP16 ONNX (LayerNorm/Softmax and friends kept fp32)
* :mod:`.calibration`  calibration data recorded from the pipeline's own runs (chapter 5)
* :mod:`.int8`         explicit Q/DQ quantization and the checks TensorRT's rules need
* :mod:`.smoothquant`  moving activation outliers into the weights before INT8
* :mod:`.evaluation`   INT8 against fp32: tensors, images, detections, latency
"""
