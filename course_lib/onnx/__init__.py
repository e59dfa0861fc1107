"""ONNX: export a torch module with the course's names (chapter 1), run it with ONNX Runtime, compare outputs.

* :mod:`.export`       ``export_onnx``: names, static/dynamic axes, external data, written atomically
* :mod:`.export_cnsd`  the four CNSD sub-models exported and checked against torch
* :mod:`.session`      ONNX Runtime sessions and feeds (the one way the course runs an ONNX file)
* :mod:`.compare`      parity tables and the layer-wise search (chapter 3)
* :mod:`.graph`        what is in a graph: op census, input/output table, Netron
"""
