"""canny2image: a photo and a prompt in, images out, over any backends. Chapter 1 (speed-ups: chapter 3).

* :mod:`.hint`         the photo resized and its Canny edges (the ControlNet's hint)
* :mod:`.sampler`      the DDIM schedule and loop, classifier-free guidance
* :mod:`.eps`          how each DDIM step gets eps: guided (separate / batched), hint once, graphed, reused
* :mod:`.canny2image`  ``Canny2Image.process``: the course's pipeline
* :mod:`.speedups`     chapter 3's variants by name (``fp16-batched-graph-sdpa``): backends + eps strategy
"""
