"""vaepipe: decode video-diffusion latents into video files, fast, exactly, in bounded memory."""

__version__ = "0.1.0"

from .encode import EncodeOptions  # noqa: E402
from .errors import BadInput, VaepipeError  # noqa: E402
from .runner import DecodeOptions, Session  # noqa: E402

__all__ = ["BadInput", "DecodeOptions", "EncodeOptions", "Session", "VaepipeError", "__version__"]
