"""Names the command line's help lists, known without importing torch or diffusers (which take seconds): the
families' preset stems. tests/test_startup.py checks them against vaepipe.families, which defines the presets."""

PRESET_STEMS = ("wan2.1", "wan2.2", "hunyuanvideo", "hunyuanvideo1.5", "ltx", "ltx2", "cogvideox", "mochi", "kvae",
                "kandinsky6-sr")
"""random:<stem> is the released architecture with random weights, random:<stem>-tiny a tiny one (tests, CPUs)."""

WAN_GEOMETRY = {"random:wan2.1": (16, 8, 4), "random:wan2.1-tiny": (16, 8, 4), "random:wan2.2": (48, 16, 4),
                "random:wan2.2-tiny": (48, 16, 4)}
"""The Wan presets' latent channels, spatial and temporal compression: make-latents' default presets, so that it
needs no diffusers to build one (checked against the built models by tests/test_startup.py)."""
