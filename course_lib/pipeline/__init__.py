"""canny2image: a photo and a prompt in, images out, over any backends. Chapter 1 (speed-ups: chapter 3).

* :mod:`.hint`         the photo resized and its Canny edges (the ControlNet's hint)
* :mod:`.sampler`      the DDIM schedule and loop, classifier-free guidance
* :mod:`.canny2image`  ``Canny2Image.process``: the course's pipeline
"""
