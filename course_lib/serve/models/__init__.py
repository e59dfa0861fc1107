"""The ``model.py`` files a generated repository gets (chapter 7); they run in Triton's Python stub, not here."""
