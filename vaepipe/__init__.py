"""vaepipe: decode video-diffusion latents into video files, fast, exactly, in bounded memory.

    import vaepipe
    vaepipe.export_video(pipe(..., output_type="latent").frames, "out.mp4", pipe=pipe, fps=16)
"""

__version__ = "0.1.0"

from .api import Exporter, Pending, export_video  # noqa: E402
from .errors import BadInput, VaepipeError  # noqa: E402

__all__ = ["BadInput", "Exporter", "Pending", "VaepipeError", "__version__", "export_video"]
