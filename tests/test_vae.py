"""Loading the VAE from every source a user has: presets, folders, the local Hub cache, single checkpoint files."""

import pytest
import torch

from vaepipe.errors import BadInput
from vaepipe.vae import load_vae

from conftest import tiny_vae

CPU = torch.device("cpu")


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_presets_are_the_same_random_weights_every_time_and_say_so():
    a = load_vae("random:wan2.2-tiny", dtype=torch.float32, device=CPU)
    torch.manual_seed(123)  # the caller's RNG state does not matter, and is left alone
    state = torch.get_rng_state()
    b = load_vae("random:wan2.2-tiny", dtype=torch.float32, device=CPU)
    assert torch.equal(torch.get_rng_state(), state)
    assert same_weights(a.model, b.model) and "random weights" in a.source
    assert (a.z_dim, a.temporal_factor, a.is_wan) == (48, 4, True)


def test_a_pipeline_folder_loads_its_vae_subfolder(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    for src in (tmp_path / "pipe", tmp_path / "pipe" / "vae"):
        assert same_weights(load_vae(str(src), dtype=torch.float32, device=CPU).model, vae)


def test_a_hub_repo_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--org--tiny-wan" / "snapshots" / "0123abcd"
    tiny_vae().save_pretrained(snapshot / "vae")
    (tmp_path / "hub" / "models--org--tiny-wan" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-wan" / "refs" / "main").write_text("0123abcd")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import time
    loaded = load_vae("org/tiny-wan", dtype=torch.float32, device=CPU)
    assert same_weights(loaded.model, tiny_vae()) and "local Hub cache" in loaded.source


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_single_checkpoint_file_loads_through_diffusers_single_file_loader(tmp_path, suffix):
    from safetensors.torch import save_file

    vae = load_vae("random:wan2.1", dtype=torch.bfloat16, device=CPU).model  # full size: the file carries no config
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    path = tmp_path / f"wan_vae{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = load_vae(str(path), dtype=torch.bfloat16, device=CPU)
    assert same_weights(loaded.model, vae) and loaded.z_dim == 16


def test_a_file_that_is_not_a_wan_vae_is_bad_input(tmp_path):
    torch.save({"weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(BadInput, match="does not look like a Wan VAE checkpoint"):
        load_vae(str(tmp_path / "other.pth"), dtype=torch.float32, device=CPU)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BadInput, match="could not read"):
        load_vae(str(tmp_path / "broken.safetensors"), dtype=torch.float32, device=CPU)


def test_a_folder_without_a_vae_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="holds no diffusers VAE"):
        load_vae(str(tmp_path), dtype=torch.float32, device=CPU)
