"""LoRAs at inference: lens_core.lora on its own, LensPipeline(loras=...) and ``lens generate --lora``.

LoRA files are made the way trainers make them (peft LoRA layers on the tiny MMDiT, with a non-zero
B so they change the image, saved by training.lora.save_lora); the reference for "LoRA at scale 1"
is a transformer file whose weights peft itself merged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lens_core.cli import main
from lens_core.image_io import read_settings
from lens_core.loading import component_path, load_mmdit
from lens_core.lora import (
    LoraFormatError,
    linear_weight_shapes,
    parse_lora_arg,
    read_lora,
    shapes_from_state_dict,
)
from lens_core.pipeline import LensPipeline

REPO = Path(__file__).resolve().parents[1]
CALL = dict(prompt="a red circle left of a blue square", negative_prompt="blurry", steps=2, cfg=3.0, width=48,
            height=32, seed=5)


def _lora_model(tiny_pipeline: Path, seed: int = 3):
    """The tiny MMDiT with peft LoRA layers whose B (zero after init) is random and large enough to matter."""
    from training.lora import add_lora

    model = load_mmdit(tiny_pipeline, "cpu", torch.float32).eval()
    add_lora(model, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def lora_files(tiny_pipeline, tmp_path_factory):
    """``peft``: the LoRA (diffusers/PEFT naming, fp32); ``kohya``: the same in kohya naming;
    ``merged``: a pipeline root whose transformer has that LoRA merged in by peft."""
    from training.lora import save_lora

    root = tmp_path_factory.mktemp("lens-lora")
    model = _lora_model(tiny_pipeline)
    peft_file = save_lora(model, root / "style_lora.safetensors", "peft", torch.float32)
    kohya_file = save_lora(model, root / "style_lora_kohya.safetensors", "kohya", torch.float32)
    for module in model.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    merged = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        merged[k.replace(".base_layer.", ".")] = v.contiguous()
    folder = root / "merged" / "transformer"
    folder.mkdir(parents=True)
    shutil.copy2(component_path(tiny_pipeline, "transformer") / "config.json", folder / "config.json")
    save_file(merged, folder / "diffusion_pytorch_model.safetensors")
    return {"peft": peft_file, "kohya": kohya_file, "merged": root / "merged"}


def _pipe(tiny_pipeline, transformer=None, **kw) -> LensPipeline:
    return LensPipeline(transformer=transformer or tiny_pipeline, text_encoder=tiny_pipeline, vae=tiny_pipeline,
                        device="cpu", **kw)


def _pixels(out) -> np.ndarray:
    return np.asarray(out.images[0]).astype(np.int16)


# -- lens_core.lora on its own ----------------------------------------------------------------------


def test_lens_core_lora_needs_no_training_or_peft():
    code = ("import sys, lens_core.lora, lens_core.pipeline, lens_core.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('training', 'peft', 'comfy')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    text = (REPO / "lens_core" / "lora.py").read_text()
    assert "import training" not in text and "from training" not in text


def test_read_lora_from_state_dict_shapes(tiny_pipeline, lora_files):
    """Shapes from module walking (lens_core) and from a prefixed state dict (ComfyUI) read alike."""
    model = load_mmdit(tiny_pipeline, "cpu", torch.float32)
    from_modules = linear_weight_shapes(model)
    prefixed = {f"diffusion_model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    from_sd = shapes_from_state_dict(prefixed, "diffusion_model.")
    assert from_sd == from_modules and "transformer_blocks.0.attn.img_qkv" in from_sd
    a, unmatched = read_lora(lora_files["peft"], from_modules)
    b, _ = read_lora(lora_files["kohya"], from_sd)
    assert not unmatched and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].up @ a[key].down * a[key].scaling, b[key].up @ b[key].down * b[key].scaling)
    wrong = {k: (o + 3, i) for k, (o, i) in from_modules.items()}
    with pytest.raises(LoraFormatError, match="another model size"):
        read_lora(lora_files["peft"], wrong)


def test_parse_lora_arg():
    assert parse_lora_arg("x.safetensors") == ("x.safetensors", 1.0)
    assert parse_lora_arg("dir/x.safetensors:0.5") == ("dir/x.safetensors", 0.5)
    assert parse_lora_arg("x.safetensors:-1") == ("x.safetensors", -1.0)
    assert parse_lora_arg("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert parse_lora_arg("C:\\loras\\x.safetensors:2") == ("C:\\loras\\x.safetensors", 2.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_arg("x.safetensors:nan")


# -- the pipeline -----------------------------------------------------------------------------------


def test_pipeline_lora_scale_0_is_no_lora_and_scale_1_is_the_merged_model(tiny_pipeline, lora_files):
    plain = _pixels(_pipe(tiny_pipeline)(**CALL))
    zero = _pipe(tiny_pipeline, loras=[(lora_files["peft"], 0.0)])(**CALL)
    np.testing.assert_array_equal(_pixels(zero), plain)
    assert zero.settings[0]["loras"] == [{"name": "style_lora.safetensors", "scale": 0.0}]

    want = _pipe(tiny_pipeline, transformer=lora_files["merged"])(**CALL)
    pipe = _pipe(tiny_pipeline, loras=[(lora_files["peft"], 1.0)])
    got = pipe(**CALL)
    assert np.abs(_pixels(want) - plain).max() > 10, "the test LoRA should change the image"
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-4, atol=1e-4)
    assert np.abs(_pixels(got) - _pixels(want)).max() <= 1
    # offload on the CPU drops the MMDiT after each call; the reload merges the LoRA again
    assert "transformer" not in pipe._models
    again = pipe(**CALL)
    torch.testing.assert_close(again.latents, got.latents, rtol=0, atol=0)


def test_pipeline_loras_add_up_in_any_naming(tiny_pipeline, lora_files):
    """Two half-strength LoRAs (peft + kohya naming of the same weights) = the LoRA at 1."""
    want = _pipe(tiny_pipeline, transformer=lora_files["merged"], offload=False)(**CALL)
    got = _pipe(tiny_pipeline, offload=False,
                loras=[(lora_files["peft"], 0.5), (str(lora_files["kohya"]), 0.5)])(**CALL)
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-4, atol=1e-4)
    assert [d["name"] for d in got.settings[0]["loras"]] == ["style_lora.safetensors", "style_lora_kohya.safetensors"]


def test_pipeline_refuses_a_lora_for_another_model_before_loading(tiny_pipeline, tmp_path):
    bad = tmp_path / "other.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.img_qkv.lora_A.weight": torch.zeros(4, 7),
               "transformer.transformer_blocks.0.attn.img_qkv.lora_B.weight": torch.zeros(9, 4)}, bad)
    with pytest.raises(LoraFormatError, match="another model size"):
        _pipe(tiny_pipeline, loras=[(bad, 1.0)])
    with pytest.raises(LoraFormatError, match="not found"):
        _pipe(tiny_pipeline, loras=[tmp_path / "missing.safetensors"])
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, sdxl)
    with pytest.raises(LoraFormatError, match="no LoRA weights for this model"):
        _pipe(tiny_pipeline, loras=[sdxl])


# -- the CLI ----------------------------------------------------------------------------------------


def test_cli_lora_flag(tmp_path, tiny_pipeline, lora_files, capsys):
    out = tmp_path / "img.png"
    args = ["generate", "--model", str(tiny_pipeline), "--prompt", CALL["prompt"], "--negative-prompt", "blurry",
            "--steps", "2", "--cfg", "3", "--width", "48", "--height", "32", "--seed", "5", "--output", str(out),
            "--lora", f"{lora_files['peft']}:0.5", "--lora", str(lora_files["kohya"]) + ":0.5"]
    assert main(args) == 0
    settings = read_settings(out)
    assert settings["loras"] == [{"name": "style_lora.safetensors", "scale": 0.5},
                                 {"name": "style_lora_kohya.safetensors", "scale": 0.5}]
    json.dumps(settings)
    want = _pipe(tiny_pipeline, transformer=lora_files["merged"])(**CALL)
    from PIL import Image

    with Image.open(out) as im:
        got = np.asarray(im).astype(np.int16)
    assert np.abs(got - _pixels(want)).max() <= 1

    assert main([*args[:-4], "--lora", str(tmp_path / "nope.safetensors")]) == 2
    assert "LoRA file not found" in capsys.readouterr().err
