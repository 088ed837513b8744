"""wsclip: weakly supervised semantic segmentation with CLIP, from training to deployment."""

__version__ = "0.1.0"

from wsclip.errors import WsclipError

__all__ = ["WsclipError", "__version__"]
