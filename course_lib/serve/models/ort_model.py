"""A Triton Python-backend model: one CNSD sub-model on ONNX Runtime (``serve-repo --target cpu``).

Copied by ``python -m course_lib serve-repo`` into ``<repo>/<model>/1/model.py``; the server's Python
stub process imports it (``triton_python_backend_utils`` exists only there). It reads
``<repo>/<model>/1/model.onnx`` and the names from its own ``config.pbtxt``.

With dynamic batching on, Triton hands :meth:`TritonPythonModel.execute` several requests at once:
they are stacked along the batch axis, run as ONE ONNX Runtime call, and the outputs split back, one
response per request -- that is where batching saves time.

Tensors cross the stub boundary through DLPack (``np.from_dlpack`` / ``Tensor.from_dlpack``), not
``as_numpy()`` / ``Tensor(name, array)``: the stub of the server PyPI ships (Triton 2.51) was built
before numpy 2 and reads numpy 2 arrays wrongly (zeros in, empty tensors out). DLPack is exact,
zero-copy and works with either numpy.
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def quiet_capsule_hook(unraisable, default=sys.unraisablehook):
    """Drop one known, harmless report: Triton 2.51's stub renames a consumed DLPack capsule
    "used_dlpack" (not "used_dltensor"), so numpy's capsule destructor complains; the stub frees the
    tensor itself. Everything else is reported as usual."""
    if "PyCapsule_GetPointer called with incorrect name" not in str(unraisable.exc_value):
        default(unraisable)


sys.unraisablehook = quiet_capsule_hook


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.batched = config.get("max_batch_size", 0) > 0

    def execute(self, requests):
        feeds = [{n: np.from_dlpack(pb_utils.get_input_tensor_by_name(r, n)) for n in self.input_names}
                 for r in requests]
        sizes = [feed[self.input_names[0]].shape[0] for feed in feeds]
        if len(feeds) == 1:
            batch = feeds[0]
        else:                                              # dynamic batching: one run for all requests
            batch = {n: np.concatenate([feed[n] for feed in feeds]) for n in self.input_names}
        try:
            outputs = self.session.run(self.output_names, batch)
        except Exception as e:                             # ORT's message goes back to every client
            error = pb_utils.TritonError(f"onnxruntime: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor.from_dlpack(n, np.ascontiguousarray(out[start:start + size]))
                       for n, out in zip(self.output_names, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
