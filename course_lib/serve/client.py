"""One request to a Triton server through ``tritonclient``, over HTTP or gRPC. Chapter 7.

:func:`infer` sends numpy arrays by name and returns the outputs by name; every failure -- no server
at that address, Triton refusing a name, shape or type, the connection dropping mid-request -- comes
back as one :class:`~course_lib.serve.server.ServeError` line. :func:`canny2image_inputs` and
:func:`request_canny2image` speak the ``canny2image`` model's protocol (the photo as uint8 HWC, text as
UTF-8 bytes, optional numbers). :func:`wire_feed` turns a contract feed into what a batching model
takes on the wire (a ``(B,)`` tensor goes as ``(B, 1)``; see the ``reshape`` in its config.pbtxt).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from course_lib.env import MissingDependency
from course_lib.serve.server import ServeError, one_line

PROTOCOLS = ("http", "grpc")
INT_PARAMS = ("seed", "ddim_steps", "image_resolution", "num_samples", "low_threshold", "high_threshold")
FLOAT_PARAMS = ("scale", "strength", "eta")


def _module(protocol: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {PROTOCOLS}")
    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError as e:
        raise MissingDependency("talking to Triton needs tritonclient[http,grpc]: "
                                "python -m pip install -e \".[serve]\"") from e
    return module


def make_client(url: str, protocol: str = "http", timeout: float = 60.0):
    """Chapter 7: a tritonclient client for ``url`` (``127.0.0.1:PORT``); one per thread."""
    module = _module(protocol)
    if protocol == "http":
        return module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    return module.InferenceServerClient(url)


def explain(error: BaseException, url: str, protocol: str) -> ServeError:
    """Chapter 7: any client-side failure as one line that says what happened."""
    from tritonclient.utils import InferenceServerException

    text = one_line(error.message() if isinstance(error, InferenceServerException) else str(error))
    if isinstance(error, InferenceServerException):
        status = str(error.status() or "")
        if "UNAVAILABLE" in status and ("connect" in text.lower() or "refused" in text.lower()):
            return ServeError(f"no Triton server answers at {url} ({protocol}): start one with "
                              f"python -m course_lib serve --repo REPO")
        if "UNAVAILABLE" in status or "Socket closed" in text:
            return ServeError(f"the server at {url} closed the connection during the request "
                              f"(it stopped or crashed): {text}")
        return ServeError(f"server ({protocol} {status or 'error'}): {text}".replace(" )", ")"))
    if isinstance(error, ConnectionRefusedError):
        return ServeError(f"no Triton server answers at {url} ({protocol}): start one with "
                          f"python -m course_lib serve --repo REPO")
    if isinstance(error, (ConnectionError, EOFError, OSError)) or "connection" in text.lower():
        return ServeError(f"the server at {url} closed the connection during the request "
                          f"(it stopped or crashed): {type(error).__name__} {text}".strip())
    return ServeError(f"request to {url} ({protocol}) failed: {type(error).__name__}: {text}")


def infer(url: str, model: str, feed: Mapping[str, np.ndarray], outputs: list[str] | None = None,
          protocol: str = "http", timeout: float = 60.0, client=None) -> dict[str, np.ndarray]:
    """Chapter 7: one inference request; returns ``{output name: array}`` or raises ServeError (one line).

    ``feed`` maps input names to numpy arrays sent as they are (the server checks names, shapes and
    data types against the model's config.pbtxt). ``outputs`` names the outputs to ask for (default:
    all). Pass ``client`` (from :func:`make_client`) to reuse a connection, e.g. in a load test.
    """
    from tritonclient.utils import np_to_triton_dtype

    module = _module(protocol)
    own = client is None
    try:
        client = client or make_client(url, protocol, timeout)
        inputs = []
        for name, value in feed.items():
            array = np.ascontiguousarray(value)
            tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        requested = [module.InferRequestedOutput(n) for n in outputs] if outputs else None
        kwargs = {"client_timeout": timeout} if protocol == "grpc" else {}
        result = client.infer(model, inputs, outputs=requested, **kwargs)
        response = result.get_response(as_json=True) if protocol == "grpc" else result.get_response()
        names = outputs or [o["name"] for o in response["outputs"]]
        return {n: result.as_numpy(n) for n in names}
    except ServeError:
        raise
    except Exception as e:                       # tritonclient, gevent, grpc and socket errors
        raise explain(e, url, protocol) from None
    finally:
        if own and client is not None:
            client.close()


def wire_feed(feed: Mapping, batched: bool = True) -> dict[str, np.ndarray]:
    """Chapter 7: a contract feed (torch or numpy) as a batching model takes it: ``(B,)`` goes as ``(B, 1)``."""
    out = {}
    for name, value in feed.items():
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        out[name] = array[:, None] if batched and array.ndim == 1 else array
    return out


def text_tensor(text: str) -> np.ndarray:
    """Chapter 7: text as the canny2image model takes it: its UTF-8 bytes as a uint8 vector."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def canny2image_inputs(image: np.ndarray, prompt: str, **params) -> dict[str, np.ndarray]:
    """Chapter 7: the canny2image model's inputs; ``params`` are ``Canny2Image.process``'s keywords
    (``a_prompt``, ``n_prompt``, ``seed``, ``ddim_steps``, ``image_resolution``, ``scale``, ...)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image.shape} {image.dtype}: expected uint8 (H, W, 3)")
    feed = {"image": np.ascontiguousarray(image), "prompt": text_tensor(prompt)}
    for name, value in params.items():
        if value is None:
            continue
        if name in ("a_prompt", "n_prompt"):
            feed[name] = text_tensor(value)
        elif name in INT_PARAMS:
            feed[name] = np.array([int(value)], dtype=np.int32)
        elif name in FLOAT_PARAMS:
            feed[name] = np.array([float(value)], dtype=np.float32)
        else:
            raise ValueError(f"canny2image has no input {name!r}: expected a_prompt, n_prompt, "
                             f"{', '.join(INT_PARAMS + FLOAT_PARAMS)}")
    return feed


def request_canny2image(url: str, image: np.ndarray, prompt: str, protocol: str = "http",
                        timeout: float = 600.0, **params) -> np.ndarray:
    """Chapter 7: one canny2image request; returns the images (num_samples, H, W, 3) uint8."""
    return infer(url, "canny2image", canny2image_inputs(image, prompt, **params), ["images"],
                 protocol=protocol, timeout=timeout)["images"]
