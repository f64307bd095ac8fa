"""End to end: the ``lens generate`` CLI and the pipeline on tiny checkpoints in the real layouts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lens_core.cli import main
from lens_core.image_io import read_settings
from lens_core.pipeline import LensPipeline


def _run(args) -> int:
    return main(["generate", *map(str, args)])


def test_cli_writes_png_with_settings(tmp_path, tiny_pipeline):
    out = tmp_path / "img.png"
    code = _run(["--prompt", "a red circle left of a blue square", "--model", tiny_pipeline, "--width", 64,
                 "--height", 48, "--steps", 2, "--cfg", 3, "--seed", 7, "--negative-prompt", "blurry", "--output", out])
    assert code == 0
    with Image.open(out) as im:
        assert im.size == (64, 48) and im.mode == "RGB"
        pixels = np.asarray(im)
    assert pixels.std() > 1.0  # not blank
    s = read_settings(out)
    assert s["prompt"] == "a red circle left of a blue square"
    assert (s["seed"], s["steps"], s["cfg"], s["negative_prompt"]) == (7, 2, 3.0, "blurry")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_same_seed_same_pixels_and_seed_matters(tmp_path, tiny_pipeline):
    def gen(name, seed):
        assert _run(["--prompt", "x", "--model", tiny_pipeline, "--width", 32, "--height", 32, "--steps", 2,
                     "--seed", seed, "--output", tmp_path / name]) == 0
        return np.asarray(Image.open(tmp_path / name))

    a, b, c = gen("a.png", 1), gen("b.png", 1), gen("c.png", 2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0


def test_batch_of_prompts_and_images(tmp_path, tiny_pipeline):
    out = tmp_path / "grid.png"
    assert _run(["--prompt", "one", "--prompt", "two", "--batch", 2, "--model", tiny_pipeline, "--preset", "turbo",
                 "--base", 1024, "--aspect-ratio", "16:9", "--steps", 1, "--seed", 3, "--output", out]) == 0
    files = sorted(tmp_path.glob("grid_*.png"))
    assert [f.name for f in files] == ["grid_0.png", "grid_1.png", "grid_2.png", "grid_3.png"]
    assert [read_settings(f)["prompt"] for f in files] == ["one", "one", "two", "two"]
    assert Image.open(files[0]).size == (1376, 768)


def test_bad_resolution_is_a_clear_error_and_writes_nothing(tmp_path, tiny_pipeline, capsys):
    out = tmp_path / "x.png"
    assert _run(["--prompt", "x", "--model", tiny_pipeline, "--width", 100, "--height", 64, "--output", out]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert _run(["--prompt", "x", "--model", tiny_pipeline, "--aspect-ratio", "5:4", "--output", out]) == 2
    assert "unknown aspect ratio" in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_file_is_a_clear_error(tmp_path, capsys):
    assert _run(["--prompt", "x", "--transformer", tmp_path / "missing.safetensors", "--output", tmp_path / "o.png"]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "no such file" in err


def test_cfg_batches_cond_and_uncond_and_cfg1_skips_uncond(tiny_pipeline):
    pipe = LensPipeline.from_pretrained(tiny_pipeline, device="cpu", offload=False)
    batches = []
    with pipe.use("transformer") as mmdit:
        hook = mmdit.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        pipe(["a", "b"], steps=2, cfg=4.0, width=32, height=32, seed=0)
        assert batches == [4, 4]
        batches.clear()
        pipe(["a", "b"], preset="turbo", steps=2, width=32, height=32, seed=0)
        assert batches == [2, 2]
    finally:
        hook.remove()


def test_pipeline_matches_a_hand_written_sampling_loop(tiny_pipeline):
    """The pipeline's latents equal an explicit loop over the same components (reference formulae)."""
    from lens_core.prompt import tokenize_prompts
    from lens_core.schedule import empirical_mu

    pipe = LensPipeline.from_pretrained(tiny_pipeline, device="cpu")
    out = pipe("a blue square", steps=3, cfg=5.0, width=48, height=32, seed=11)
    ids, mask = tokenize_prompts(["a blue square"], pipe.tokenizer)
    with pipe.use("text_encoder") as enc, pipe.use("transformer") as mmdit:
        feats = [f[:, 97:] for f in enc(ids, mask)]
        m = mask[:, 97:]
        x = torch.randn((1, 2 * 3, 128), generator=torch.Generator("cpu").manual_seed(11))
        mu = empirical_mu(6, 3)
        s = np.linspace(1.0, 1.0 / 3, 3)
        s = np.append(np.exp(mu) / (np.exp(mu) + (1 / s - 1)), 0.0)
        zeros = [torch.zeros_like(f) for f in feats]
        for i in range(3):
            sig = torch.full((1,), float(s[i]))
            c = mmdit(x, sig, feats, m, (2, 3))
            u = mmdit(x, sig, zeros, torch.zeros_like(m), (2, 3))
            g = u + 5.0 * (c - u)
            g = g * (c.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True))
            x = x + float(s[i + 1] - s[i]) * g
    torch.testing.assert_close(out.latents, x, rtol=1e-4, atol=1e-5)


def test_console_script_runs(tmp_path, tiny_pipeline):
    out = tmp_path / "cli.png"
    exe = [sys.executable, "-m", "lens_core.cli"]
    r = subprocess.run([*exe, "generate", "--prompt", "hi", "--model", str(tiny_pipeline), "--width", "32",
                        "--height", "32", "--steps", "1", "--seed", "0", "--output", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "seed 0" in r.stdout


@pytest.mark.parametrize("offload", [True, False])
def test_python_api_returns_settings_and_frees_components(tiny_pipeline, offload):
    pipe = LensPipeline.from_pretrained(tiny_pipeline, device="cpu", offload=offload)
    out = pipe("hello", steps=1, width=32, height=32, seed=5, num_images_per_prompt=2)
    assert len(out.images) == 2 and out.latents.shape == (2, 4, 128)
    assert [s["batch_index"] for s in out.settings] == [0, 1] and out.settings[0]["seed"] == 5
    # With offload on the CPU each component is freed after its stage; otherwise all stay loaded.
    assert set(pipe._models) == (set() if offload else {"text_encoder", "transformer", "vae"})


def test_cli_reasoner_api_rewrites_prompt_and_records_it(tmp_path, tiny_pipeline, monkeypatch):
    from .test_reasoner_api import KEY, KEY_ENV, ChatServer, ok_reply

    server = ChatServer()
    server.script = [ok_reply("a large red circle on the left of a small blue square, white background")]
    monkeypatch.setenv(KEY_ENV, KEY)
    common = ["--model", tiny_pipeline, "--width", 32, "--height", 32, "--steps", 2, "--seed", 4]
    try:
        assert _run(["--prompt", "red circle, blue square", *common, "--output", tmp_path / "r.png",
                     "--reasoner", "api", "--reasoner-url", server.url, "--reasoner-model", "m",
                     "--reasoner-key-env", KEY_ENV]) == 0
    finally:
        server.close()
    s = read_settings(tmp_path / "r.png")
    assert s["prompt"] == "red circle, blue square" and s["reasoner"] == "api"
    assert s["refined_prompt"].startswith("a large red circle")
    assert KEY not in (tmp_path / "r.png").read_bytes().decode("latin-1")
    # The image is the one the refined prompt gives without a reasoner.
    assert _run(["--prompt", s["refined_prompt"], *common, "--output", tmp_path / "d.png"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "r.png")), np.asarray(Image.open(tmp_path / "d.png")))


def test_cli_reasoner_api_needs_an_endpoint(tmp_path, tiny_pipeline, capsys):
    assert _run(["--prompt", "x", "--model", tiny_pipeline, "--reasoner", "api", "--reasoner-model", "m",
                 "--output", tmp_path / "o.png"]) == 2
    assert "api_base_url" in capsys.readouterr().err


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_cli_runs_a_gguf_mmdit(tmp_path, tiny_pipeline, qtype):
    """`--transformer x.gguf` goes through lens_core.loading's GGUF dispatch (weights stay quantised)."""
    from quant.convert import convert_mmdit

    gguf = convert_mmdit(tiny_pipeline / "transformer", tmp_path / f"lens-{qtype}.gguf", qtype).path
    common = ["--prompt", "a red circle", "--text-encoder", tiny_pipeline, "--vae", tiny_pipeline,
              "--width", 32, "--height", 32, "--steps", 2, "--seed", 9]
    assert _run([*common, "--transformer", gguf, "--output", tmp_path / "g.png"]) == 0
    assert _run([*common, "--transformer", tiny_pipeline, "--output", tmp_path / "s.png"]) == 0
    a = np.asarray(Image.open(tmp_path / "g.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "s.png")).astype(int)
    if qtype == "F32":
        np.testing.assert_array_equal(a, b)  # lossless GGUF: the same image
    else:
        assert np.abs(a - b).mean() < 8  # 8-bit weights: close to the safetensors image


def test_cli_fp8_matmul_switch(tmp_path, tiny_pipeline, monkeypatch):
    """`--fp8-matmul` on a scaled-fp8 MMDiT: every fp8 matrix multiplies through torch._scaled_mm (the CPU
    declared fp8-capable, as CUDA sm>=8.9 is), the image stays close to the decoding path's, and the
    PNG records it. Without the flag no fp8 matmul runs."""
    from quant import fp_formats
    from quant.comfy_quant import convert_mmdit_comfy

    fp8 = tmp_path / "lens-fp8_scaled.safetensors"
    convert_mmdit_comfy(tiny_pipeline / "transformer", fp8, "fp8_scaled")
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(fp_formats, "fp8_matmul_supported", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = ["--prompt", "a red circle", "--text-encoder", tiny_pipeline, "--vae", tiny_pipeline,
              "--transformer", fp8, "--width", 32, "--height", 32, "--steps", 2, "--seed", 9]
    assert _run([*common, "--output", tmp_path / "decode.png"]) == 0
    assert calls == [] and "fp8_matmul" not in read_settings(tmp_path / "decode.png")
    assert _run([*common, "--fp8-matmul", "--output", tmp_path / "mm.png"]) == 0
    assert calls and read_settings(tmp_path / "mm.png")["fp8_matmul"] is True
    a = np.asarray(Image.open(tmp_path / "decode.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "mm.png")).astype(int)
    assert np.abs(a - b).mean() < 8  # activations rounded to fp8: close, not equal


def test_model_declared_resolution_is_the_default_size(tmp_path, tiny_pipeline):
    """A pipeline folder's ``default_resolution`` (Lens-Toy: 128) is the size when none is asked for;
    without it the default is Lens's 1024 buckets; a bad value names the file."""
    import json
    import shutil

    from lens_core.errors import CheckpointError
    from lens_core.pipeline import declared_resolution

    root = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline, root)
    index = root / "model_index.json"
    data = json.loads(index.read_text()) if index.exists() else {}
    assert declared_resolution(root / "transformer") == 1024
    index.write_text(json.dumps({**data, "default_resolution": 64}))
    out = tmp_path / "img.png"
    assert _run(["--prompt", "a red circle", "--model", root, "--steps", 1, "--aspect-ratio", "16:9", "--output", out]) == 0
    with Image.open(out) as im:
        assert im.size == (80, 48)  # 1376x768 scaled to base 64, snapped to 16
    index.write_text(json.dumps({**data, "default_resolution": "big"}))
    with pytest.raises(CheckpointError, match="model_index.json.*default_resolution"):
        declared_resolution(root / "transformer")
