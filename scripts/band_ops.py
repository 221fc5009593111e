"""Which ops of a Wan decoder's tail give other bits on a band's slab than on the whole frame (issue 25's open
question: on an H100 banded bf16 frames differ from whole ones in half their uint8 values, at the same PSNR against
fp32; on the CPU they are bit-identical).

Every conv (3-D causal, the upsamplers' 2-D) and RMS norm of diffusers' up blocks and output conv is hooked during
the decode of the second latent frame of a clip; each call is then run again on a slab of its input (the band's rows
and the halo its kernel reads, the conv's own zero padding at the slab's edges) and the band's rows compared with the
whole frame's, bit for bit. Prints one line per op and call: equal, or the share of values that differ.

    PYTHONPATH=$PWD python3 scripts/band_ops.py --vae random:wan2.1 --size 480x832x5        # a GPU machine
    PYTHONPATH=$PWD python3 scripts/band_ops.py --vae random:wan2.1-tiny --size 48x80x5 --device cpu
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="random:wan2.1")
    parser.add_argument("--size", default="480x832x5", help="HEIGHTxWIDTHxFRAMES (two latent frames are enough)")
    parser.add_argument("--band", default="0.25,0.5", help="the band's first and last row, as shares of the height")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

    from vaepipe.decode import decode_stream
    from vaepipe.families import DecodeSettings, synthetic_latents
    from vaepipe.vae import DTYPES, load_vae

    vae = load_vae(args.vae, dtype=DTYPES[args.dtype], device=torch.device(args.device))
    latents = synthetic_latents(vae.model, args.size, seed=0)[:, :, :2]
    decoder = vae.model.decoder
    calls: list[tuple[str, torch.nn.Module, tuple, torch.Tensor]] = []
    hooks = []
    for name, module in [*decoder.up_blocks.named_modules(prefix="up_blocks"), ("norm_out", decoder.norm_out),
                         ("conv_out", decoder.conv_out)]:
        if isinstance(module, (WanCausalConv3d, torch.nn.Conv2d, WanRMS_norm)):
            hooks.append(module.register_forward_hook(
                lambda m, inputs, out, name=name: calls.append((name, m, tuple(
                    i.clone() if isinstance(i, torch.Tensor) else i for i in inputs), out.clone()))))
    lo, hi = (float(v) for v in args.band.split(","))
    with torch.inference_mode():
        z, _ = vae.family.prepare(vae.model, latents, denormalize=True, settings=DecodeSettings())
        pieces = decode_stream(vae.model, z)
        next(pieces)
        calls.clear()  # the first latent frame's calls skip the time convs: the second's are the steady ones
        next(pieces)
        for hook in hooks:
            hook.remove()
        differ = 0
        for name, module, inputs, want in calls:
            got, rows = _on_slab(module, inputs, want, lo, hi)
            same = torch.equal(got, want[..., rows[0] : rows[1], :])
            differ += not same
            share = (got != want[..., rows[0] : rows[1], :]).float().mean().item()
            print(f"{name:42s} {type(module).__name__:16s} {tuple(want.shape)!s:28s} "
                  f"{'equal' if same else f'{share:.2%} of values differ'}")
    print(f"{differ} of {len(calls)} calls give other bits on the slab")


def _on_slab(module: torch.nn.Module, inputs: tuple, want: torch.Tensor, lo: float,
             hi: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """The module's output rows [a, b) computed from a slab of its input (rows [a - halo, b + halo)); rows are the
    last but one dimension of 5-D [B, C, T, H, W] and 4-D [N, C, H, W] tensors alike."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    x = inputs[0]
    height = x.shape[-2]
    a, b = int(height * lo), max(int(height * lo) + 1, int(height * hi))
    if isinstance(module, WanCausalConv3d):
        halo = module._padding[2]
    elif isinstance(module, torch.nn.Conv2d):
        halo = module.padding[0]
    else:
        halo = 0
    s, e = max(0, a - halo), min(height, b + halo)
    slab = [t[..., s:e, :] if isinstance(t, torch.Tensor) and t.dim() == x.dim() else t for t in inputs]
    out = module(*slab)
    return out[..., a - s : a - s + (b - a), :], (a, b)


if __name__ == "__main__":
    main()
