"""What the three stages share, and nothing else.

The stages (``train``, ``export``, ``serve``) talk only through artifacts on
disk. This package holds the pieces those hand-offs need: the manifest format
(:mod:`loraship.manifest`), writes that never leave half a file at a final path
(:mod:`loraship.atomic`), Hub transfer (:mod:`loraship.hub`), the environment
settings plumbing every stage's ``settings.py`` uses (:mod:`loraship.envsettings`)
and the location of the embedded model (:mod:`loraship.embedded`).

Nothing here imports torch, transformers or llama_cpp: ``serve`` uses it too.
"""

__version__ = "0.1.0"
