"""Chapter 7: serving canny2image with Triton Inference Server.

* :mod:`.repository` -- the model repository generator (``python -m course_lib serve-repo``): the four
  sub-models and a ``canny2image`` model that runs the DDIM loop by calling them (business-logic
  scripting), for NVIDIA's container (``--target gpu``) or for the server PyPI ships (``--target cpu``);
* :mod:`.model_config` -- reads a ``config.pbtxt`` with Triton's own protobuf schema and checks a
  repository against the course's contract;
* :mod:`.install` and :mod:`.server` -- unpack and start that server on 127.0.0.1 (``serve``);
* :mod:`.client` -- one request through ``tritonclient`` over HTTP or gRPC (``request``);
* :mod:`.loadtest` -- concurrent clients, latency percentiles, throughput and the batch sizes the
  server formed (from its metrics), with and without dynamic batching.

``models/`` holds the two ``model.py`` files the generator copies into a repository; they run inside
the server's Python stub process, not in this one.
"""
