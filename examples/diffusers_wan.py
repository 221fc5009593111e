"""Generate clips with a diffusers Wan pipeline and write them with vaepipe, on the pipeline's own VAE.

    .venv/bin/python examples/diffusers_wan.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat" --clips 3
    .venv/bin/python examples/diffusers_wan.py --tiny --out demo/api  # CPU, no download: a tiny random pipeline

(.venv is what `make install` or `make demo` builds; with it activated, plain `python` does.)

Each clip's frames go through vaepipe's lanes as soon as the pipeline hands back its latents; `wait=False` lets the
next clip generate while ffmpeg finishes the last one. The files equal, byte for byte, what `vaepipe decode` writes
for the same latents saved to a file, and their frames are the pipeline's own `output_type="pil"` frames.
The tiny pipeline needs `transformers` (for its text encoder), as every diffusers Wan pipeline does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vaepipe


def real_pipeline(model: str):
    from diffusers import AutoencoderKLWan, WanPipeline

    # diffusers' advice for Wan: the VAE in float32, the transformer in bfloat16.
    vae = AutoencoderKLWan.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32)
    return WanPipeline.from_pretrained(model, vae=vae, torch_dtype=torch.bfloat16).to("cuda")


def tiny_pipeline(seed: int = 0):
    """A real WanPipeline around tiny random-weight models built from configs: nothing is downloaded."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "surfing", "on", "the", "moon"]
    vocab = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                                   num_heads=4, relative_attention_num_buckets=8)).eval()
        transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                            in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                            num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                            rope_max_seq_len=32).eval()
        vae = AutoencoderKLWan(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


TINY = dict(height=32, width=48, num_frames=9, num_inference_steps=2, max_sequence_length=16)
REAL = dict(height=480, width=832, num_frames=81, guidance_scale=5.0)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", help="diffusers Wan pipeline")
    parser.add_argument("--tiny", action="store_true", help="a tiny random-weight pipeline on the CPU instead")
    parser.add_argument("--prompt", default="a cat surfing on the moon")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo/api"))
    args = parser.parse_args(argv)

    pipe = tiny_pipeline() if args.tiny else real_pipeline(args.model)
    model = "tiny random WanPipeline" if args.tiny else args.model
    device = "cpu" if args.tiny else "cuda"
    outputs = []
    with vaepipe.Exporter(pipe=pipe) as exporter:  # one set of buffers for every clip
        for i in range(args.clips):
            seed = args.seed + i
            latents = pipe(prompt=args.prompt, generator=torch.Generator(device).manual_seed(seed),
                           output_type="latent", **(TINY if args.tiny else REAL)).frames
            output = args.out / f"clip{i}.mp4"
            # Returns once the frames are in ffmpeg: the next clip generates while this one's encoder finishes.
            exporter.export(latents, output, fps=16, metadata={"prompt": args.prompt, "seed": seed, "model": model},
                            wait=False)
            outputs.append(output)
    # Leaving the block waited for every file.
    for output in outputs:
        print(f"wrote {output}")
    return outputs


if __name__ == "__main__":
    main()
