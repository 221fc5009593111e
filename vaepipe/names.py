"""Names the command line's help lists, known without importing torch or diffusers (which take seconds): the
families' preset stems. tests/test_startup.py checks them against vaepipe.families, which defines the presets."""

PRESET_STEMS = ("wan2.1", "wan2.2", "hunyuanvideo", "hunyuanvideo1.5", "ltx", "ltx2", "cogvideox", "mochi", "kvae",
                "kandinsky6-sr")
"""random:<stem> is the released architecture with random weights, random:<stem>-tiny a tiny one (tests, CPUs)."""
