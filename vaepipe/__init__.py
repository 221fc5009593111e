"""vaepipe: decode video-diffusion latents into video files, fast, exactly, in bounded memory.

    import vaepipe
    vaepipe.export_video(pipe(..., output_type="latent").frames, "out.mp4", pipe=pipe, fps=16)
"""

__version__ = "0.1.0"

# The public names load on first use (PEP 562), so that `import vaepipe` and the command line's start-up do not
# import torch before the command line can handle a Ctrl-C.
_PUBLIC = {"BadInput": ".errors", "Exporter": ".api", "Pending": ".api", "VaepipeError": ".errors",
           "export_video": ".api"}

__all__ = ["BadInput", "Exporter", "Pending", "VaepipeError", "__version__", "export_video"]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
