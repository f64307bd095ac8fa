"""The ComfyUI nodes' ComfyUI-free parts: the package entry point and the layout conversions.

The nodes themselves run against a real ComfyUI server in ``test_nodes_comfyui.py``.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch

from lens_core.pipeline import TextConditioning
from lens_core.prompt import empty_features, pad_to_length
from lens_core.sampling import initial_noise
from lens_core.vae import pack_latents

REPO = Path(__file__).resolve().parents[1]


def _load(relpath: str, name: str, package: bool = False):
    """Import a repository file by path (works whatever pytest's import mode and rootdir)."""
    path = REPO / relpath
    kwargs = {"submodule_search_locations": [str(path.parent)]} if package else {}
    spec = importlib.util.spec_from_file_location(name, path, **kwargs)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bridge():
    return _load("nodes/lens_bridge.py", "lens_nodes_bridge_under_test")


def test_package_entry_point_needs_no_comfyui():
    before = set(sys.modules)
    pkg = _load("__init__.py", "comfyui_lens_package_under_test", package=True)
    assert inspect.iscoroutinefunction(pkg.comfy_entrypoint)
    new = set(sys.modules) - before
    assert not any(m == "comfy" or m.startswith(("comfy.", "comfy_api")) for m in new), sorted(new)


def test_nodes_bridge_imports_no_comfyui(bridge):
    source = (REPO / "nodes" / "lens_bridge.py").read_text()
    assert "import comfy" not in source and "from comfy" not in source and "folder_paths" not in source


def test_conditioning_round_trip(bridge):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cond = bridge.conditioning_from_text(feats, mask, (5, 11, 17, 23))
    assert cond[0][0].shape == (2, 5, 32)
    assert cond[0][1]["attention_mask"].dtype == torch.long
    assert cond[0][1]["lens_layers"] == (5, 11, 17, 23)
    back = bridge.text_from_conditioning(cond, 4)
    for a, b in zip(back.feats, feats, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(back.mask, mask)


def test_conditioning_errors_are_clear(bridge):
    with pytest.raises(ValueError, match="Lens text encoder"):
        bridge.context_to_features(torch.zeros(1, 3, 10), 4)
    with pytest.raises(ValueError, match="empty conditioning"):
        bridge.text_from_conditioning([], 4)


def test_empty_like_conditioning_has_no_tokens(bridge):
    cond = bridge.conditioning_from_text([torch.ones(1, 3, 2)] * 4, torch.ones(1, 3, dtype=torch.bool), range(4))
    empty = bridge.empty_like_conditioning(cond)
    assert empty[0][0].shape == (1, 0, 8) and empty[0][1]["attention_mask"].shape == (1, 0)


def test_text_batch_matches_pipeline_batching(bridge):
    """[cond; uncond] padded to one length, exactly as LensPipeline.denoise builds it."""
    g = torch.Generator().manual_seed(1)
    cond = TextConditioning([torch.randn(1, 6, 4, generator=g) for _ in range(4)], torch.ones(1, 6, dtype=torch.bool))
    uncond = TextConditioning([torch.randn(1, 3, 4, generator=g) for _ in range(4)], torch.ones(1, 3, dtype=torch.bool))
    feats, mask = bridge.text_batch(cond, uncond, 5.0)
    c_f, c_m = pad_to_length(cond.feats, cond.mask, 6)
    u_f, u_m = pad_to_length(uncond.feats, uncond.mask, 6)
    assert all(torch.equal(f, torch.cat([c, u])) for f, c, u in zip(feats, c_f, u_f, strict=True))
    assert torch.equal(mask, torch.cat([c_m, u_m]))
    # no negative = the empty prompt the CLI uses: zero features, all-False mask
    feats, mask = bridge.text_batch(cond, None, 5.0)
    e_f, e_m = empty_features(cond.feats, cond.mask)
    assert all(torch.equal(f, torch.cat([c, e])) for f, c, e in zip(feats, cond.feats, e_f, strict=True))
    assert torch.equal(mask, torch.cat([cond.mask, e_m]))
    # an encoded empty prompt (no tokens) pads to the same thing
    none = TextConditioning([torch.zeros(1, 0, 4)] * 4, torch.zeros(1, 0, dtype=torch.bool))
    feats2, mask2 = bridge.text_batch(cond, none, 5.0)
    assert all(torch.equal(a, b) for a, b in zip(feats, feats2, strict=True)) and torch.equal(mask, mask2)
    # cfg 1: no unconditional rows
    feats, mask = bridge.text_batch(cond, uncond, 1.0)
    assert mask.shape == (1, 6)


def test_repeat_to_batch_orders_like_the_pipeline(bridge):
    text = TextConditioning([torch.arange(2.0)[:, None, None].expand(2, 1, 3)], torch.ones(2, 1, dtype=torch.bool))
    rep = bridge.repeat_to_batch(text, 4)
    assert rep.feats[0][:, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="cannot be spread"):
        bridge.repeat_to_batch(text, 3)


def test_lens_noise_is_the_cli_noise_in_latent_layout(bridge):
    noise = bridge.lens_noise(1234, 2, 3, 5)
    assert noise.shape == (2, 128, 3, 5)
    assert torch.equal(pack_latents(noise), initial_noise(2, 48, 80, 1234))


def test_device_safe_rmsnorm_is_lens_cores_rmsnorm(bridge):
    from lens_core.layers import RMSNorm

    norm = RMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    want = norm(x)
    holder = torch.nn.Sequential(norm)
    bridge.make_norms_device_safe(holder)
    assert type(holder[0]) is bridge.DeviceSafeRMSNorm
    assert torch.equal(holder[0](x), want)


def test_lora_patches_do_what_the_merge_does(bridge):
    """ComfyUI's LoRA patch arithmetic (W.narrow(offset) += strength * alpha / rank * up @ down, bias
    diff) on the patches built for a split-q/k/v LoRA with a bias = lens_core's merge."""
    from lens_core.lora import LoraModule, linear_weight_shapes, merge_lora_
    from lens_core.mmdit import LensMMDiT
    from lens_core.random_weights import randomize_, tiny_configs

    model = randomize_(LensMMDiT(tiny_configs()[0]), 0)
    shapes = linear_weight_shapes(model)
    g = torch.Generator().manual_seed(4)
    modules = {}
    for name in ("transformer_blocks.0.attn.img_qkv", "transformer_blocks.1.attn.txt_qkv"):
        out, inp = shapes[name]
        for part in (0, 2):
            modules[(name, part)] = LoraModule(name, torch.randn(3, inp, generator=g), torch.randn(out // 3, 3, generator=g),
                                               alpha=1.5, part=part, up_bias=torch.randn(out // 3, generator=g))
    out, inp = shapes["transformer_blocks.0.img_mlp.w2"]
    modules[("transformer_blocks.0.img_mlp.w2", None)] = LoraModule(
        "transformer_blocks.0.img_mlp.w2", torch.randn(2, inp, generator=g), torch.randn(out, 2, generator=g))

    patches = bridge.lora_patches(modules, shapes)
    assert {p.key for p in patches} == {f"diffusion_model.{n}.weight" for n, _ in modules}
    assert {p.offset for p in patches} == {None, (0, 0, shapes["transformer_blocks.0.attn.img_qkv"][0] // 3),
                                           (0, 2 * shapes["transformer_blocks.0.attn.img_qkv"][0] // 3,
                                            shapes["transformer_blocks.0.attn.img_qkv"][0] // 3)}
    strength = 0.7
    comfy = {f"diffusion_model.{k}": v.clone() for k, v in model.state_dict().items()}
    for p in patches:  # as comfy.lora.calculate_weight / LoRAAdapter do it
        w = comfy[p.key] if p.offset is None else comfy[p.key].narrow(*p.offset)
        alpha = p.alpha / p.down.shape[0] if p.alpha is not None else 1.0
        w += strength * alpha * (p.up @ p.down)
        if p.bias is not None:
            b = comfy[p.bias_key] if p.offset is None else comfy[p.bias_key].narrow(*p.offset)
            b += strength * p.bias
    merge_lora_(model, modules, strength)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(comfy[f"diffusion_model.{k}"], v, rtol=1e-5, atol=1e-5)


def test_packed_mmdit_files_are_told_apart_from_plain_ones(tmp_path):
    """The Lens Model Loader builds a MODEL through lens_core's packed loading exactly for the files
    ``is_packed_mmdit`` names (GGUF, fp8, ComfyUI quantised); bf16/fp32 files keep ComfyUI's own
    loading; the safetensors ones load with their quantised layers packed."""
    from lens_core.loading import is_packed_mmdit, load_mmdit
    from lens_core.random_weights import random_state_dicts, tiny_configs
    from lens_core.safetensors_io import save_file_atomic
    from quant.comfy_quant import convert_mmdit_comfy
    from quant.convert import convert_mmdit

    state = random_state_dicts(tiny_configs(), seed=0)["transformer"]
    fp32 = save_file_atomic(state, tmp_path / "fp32.safetensors")
    bf16 = save_file_atomic({k: v.bfloat16() for k, v in state.items()}, tmp_path / "bf16.safetensors")
    assert not is_packed_mmdit(fp32) and not is_packed_mmdit(bf16)
    convert_mmdit(fp32, tmp_path / "q8.gguf", "Q8_0")
    assert is_packed_mmdit(tmp_path / "q8.gguf")
    for qtype in ("fp8_e4m3fn", "fp8_scaled", "mxfp8"):
        path = tmp_path / f"{qtype}.safetensors"
        convert_mmdit_comfy(fp32, path, qtype)
        assert is_packed_mmdit(path), qtype
        qkv = load_mmdit(path).transformer_blocks[0].attn.img_qkv
        assert qkv.is_quantized and qkv.weight is None, qtype


class RecordingFolderPaths:
    """In place of ComfyUI's ``folder_paths`` (absent here): fixed listings, and every lookup recorded
    and answered "not found", so a test sees exactly which names reach ComfyUI's resolution."""

    def __init__(self, listed: dict[str, list[str]]) -> None:
        self.listed = listed
        self.asked: list[tuple[str, str]] = []

    def get_filename_list(self, folder: str) -> list[str]:
        return list(self.listed.get(folder, []))

    def get_full_path(self, folder: str, name: str) -> None:
        self.asked.append((folder, name))

    def get_full_path_or_raise(self, folder: str, name: str) -> str:
        self.asked.append((folder, name))
        raise FileNotFoundError(f"Model in folder '{folder}' with filename '{name}' not found.")


@pytest.fixture
def node_files(monkeypatch):
    """nodes/files.py over a RecordingFolderPaths listing one user file per folder."""
    fake = RecordingFolderPaths({"diffusion_models": ["lens_bf16.safetensors"], "lens_gguf_diffusion_models": [],
                                 "text_encoders": ["gpt_oss.safetensors"], "lens_gguf_text_encoders": [],
                                 "vae": ["flux2-vae.safetensors"], "loras": ["style.safetensors"]})
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    module = _load("nodes/files.py", "lens_nodes_files_under_test")
    module.fake = fake
    return module


def test_loaders_list_the_built_in_lens_toy_first(node_files):
    assert node_files.model_choices("diffusion_models", gguf=True) == [node_files.BUILTIN, "lens_bf16.safetensors"]
    assert node_files.model_choices("text_encoders", folders=True, gguf=True) == [node_files.BUILTIN,
                                                                                  "gpt_oss.safetensors"]
    assert node_files.model_choices("vae", folders=True) == [node_files.BUILTIN, "flux2-vae.safetensors"]
    assert node_files.model_choices("loras") == ["style.safetensors"]  # no built-in LoRA


def test_built_in_name_resolves_to_lens_toys_components_only(node_files):
    """The built-in name is a fixed path inside lens_core/default_model (ComfyUI is not asked); every
    other name, also ones built from it, goes through folder_paths as before."""
    from lens_core.loading import load_mmdit_config, load_vae
    from lens_core.pipeline import DEFAULT_MODEL_DIR
    from lens_core.text_encoder import GptOssConfig

    builtin = node_files.BUILTIN
    transformer = node_files.resolve("diffusion_models", builtin)
    encoder = node_files.resolve("text_encoders", builtin)
    vae = node_files.resolve("vae", builtin)
    assert node_files.fake.asked == []
    assert (transformer, encoder, vae) == tuple(DEFAULT_MODEL_DIR / c for c in ("transformer", "text_encoder", "vae"))
    # They are Lens-Toy's: an MMDiT reading encoder layers 0-3 of a 4-layer GPT-OSS, and its VAE.
    assert load_mmdit_config(transformer).selected_layer_index == (0, 1, 2, 3)
    assert GptOssConfig.from_json(encoder / "config.json").num_hidden_layers == 4
    assert load_vae(vae).bn.running_mean.shape == (128,)

    for folder, name in (("loras", builtin), ("diffusion_models", f"{builtin}/"),
                         ("diffusion_models", f"{builtin}/../transformer"), ("vae", f"../{builtin}")):
        with pytest.raises(FileNotFoundError):
            node_files.resolve(folder, name)
    assert [name for _, name in node_files.fake.asked] == [builtin, f"{builtin}/config.json",
                                                           f"{builtin}/../transformer", f"../{builtin}"]
