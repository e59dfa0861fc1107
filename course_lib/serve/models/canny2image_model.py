"""A Triton Python-backend model: the canny2image pipeline over the four served sub-models.

Copied by ``python -m course_lib serve-repo`` into ``<repo>/canny2image/1/model.py`` (both targets).
This is Triton's *business-logic scripting* (BLS): the model is ordinary Python, and its DDIM loop
calls ``clip``, ``controlnet``, ``unet`` and ``decoder`` as Triton models with
``pb_utils.InferenceRequest(...).exec()``. The loop itself is course_lib's own
:class:`~course_lib.pipeline.canny2image.Canny2Image`, unchanged: :class:`TritonBackend` is one more
backend behind the chapter-2 interface (``infer(feed) -> outputs``), so the served image is the image
``python -m course_lib run --backend ort`` makes from the same ONNX files at the same seed.

Inputs: ``image`` (H, W, 3) uint8 and ``prompt`` (UTF-8 bytes as uint8); optional ``a_prompt``,
``n_prompt``, ``seed``, ``ddim_steps``, ``image_resolution``, ``num_samples``, ``low_threshold``,
``high_threshold``, ``scale``, ``strength``, ``eta`` -- missing ones take ``Canny2Image.process``'s defaults.
Output: ``images`` (num_samples, H, W, 3) uint8. Tensors cross the stub boundary through DLPack
(see ort_model.py for why not ``as_numpy``).
"""
import json
import sys

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from course_lib.backends import check_feed
from course_lib.cnsd.config import get_config
from course_lib.cnsd.contract import MODEL_NAMES, contracts
from course_lib.cnsd.tokenizer import byte_level_tokenizer, get_tokenizer
from course_lib.pipeline.canny2image import Canny2Image

TEXT = ("prompt", "a_prompt", "n_prompt")
INTS = ("seed", "ddim_steps", "image_resolution", "num_samples", "low_threshold", "high_threshold")
FLOATS = ("scale", "strength", "eta")


def quiet_capsule_hook(unraisable, default=sys.unraisablehook):
    """Drop one harmless report (see ort_model.py): the 2.51 stub renames consumed DLPack capsules
    "used_dlpack", so numpy's capsule destructor complains; the stub frees the tensor itself."""
    if "PyCapsule_GetPointer called with incorrect name" not in str(unraisable.exc_value):
        default(unraisable)


sys.unraisablehook = quiet_capsule_hook


class TritonBackend:
    """The backend interface over a model served by this Triton server (a BLS request per call)."""

    def __init__(self, contract, batched: bool):
        self.name = contract.name
        self.input_names = list(contract.input_names)
        self.output_names = list(contract.output_names)
        self.dtypes = {spec.name: spec.dtype for spec in contract.inputs}
        self.batched = batched

    def infer(self, feed):
        check_feed(self.name, feed, self.input_names)
        inputs = []
        for name in self.input_names:
            t = feed[name].detach().to("cpu", self.dtypes[name]).contiguous()
            if self.batched and t.dim() == 1:            # config.pbtxt: dims [1], reshape [] (the timestep)
                t = t.unsqueeze(1)
            inputs.append(pb_utils.Tensor.from_dlpack(name, t))
        request = pb_utils.InferenceRequest(model_name=self.name, inputs=inputs,
                                            requested_output_names=self.output_names)
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{self.name}: {response.error().message()}")
        return {n: torch.from_dlpack(pb_utils.get_output_tensor_by_name(response, n).to_dlpack()).clone()
                for n in self.output_names}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("threads", "1")))
        preset = params.get("config", "tiny")
        vocab = params.get("vocab") or None
        tokenizer = byte_level_tokenizer() if preset == "tiny" and vocab is None else get_tokenizer(vocab)
        batched = set(filter(None, params.get("batched_models", "").split(",")))
        table = contracts(get_config(preset))                 # names and dtypes; shapes do not matter here
        backends = {n: TritonBackend(table[n], n in batched) for n in MODEL_NAMES}
        self.pipe = Canny2Image(backends, tokenizer, get_config(preset), progress=False, time_stages=False)

    @staticmethod
    def _read(request):
        def array(name):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else np.from_dlpack(tensor)

        kwargs = {}
        for name in TEXT:
            value = array(name)
            if value is not None:
                kwargs[name] = bytes(value.astype(np.uint8)).decode("utf-8")
        for names, cast in ((INTS, int), (FLOATS, float)):
            for name in names:
                value = array(name)
                if value is not None:
                    kwargs[name] = cast(value.reshape(-1)[0])
        kwargs["input_image"] = np.ascontiguousarray(array("image"))
        return kwargs

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                kwargs = self._read(request)
                images = np.stack(self.pipe.process(**kwargs))           # (num_samples, H, W, 3) uint8
                out = pb_utils.Tensor.from_dlpack("images", np.ascontiguousarray(images))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except UnicodeDecodeError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"prompt: not UTF-8 ({e})")))
            except Exception as e:                                        # one line back to the client
                message = " ".join(str(e).split())
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"canny2image: {message}")))
        return responses
