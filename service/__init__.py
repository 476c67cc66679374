"""nuclei-seg inference service.

The request path reads top to bottom, one module per step:
``decode`` -> ``normalise`` -> ``model`` (with ``tiling``) -> ``postprocess`` -> ``encode``;
``pipeline`` chains them and ``app`` exposes the chain over HTTP. Nothing here imports ``training``.
"""

__version__ = "0.1.0"
