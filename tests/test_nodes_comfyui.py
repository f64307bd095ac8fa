"""The Lens nodes in a real ComfyUI server, on tiny random-weight models in the real file layouts.

Skipped (with a message saying why) when no ComfyUI checkout is found; see
``tests/comfy_server.py`` for where it is looked for (``$COMFYUI_PATH``, ``~/ComfyUI``...). Every
found checkout is tested (one server each). Images are compared with ``lens_core``'s own
pipeline on the same files, seed, steps, cfg and size: ComfyUI saves by truncating to 8 bits and
the pipeline rounds, so pixels may differ by a level or two, no more.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .comfy_server import (
    ComfyServer,
    comfyui_installs,
    comfyui_python,
    comfyui_version,
    missing_requirements,
    write_tiny_models,
)

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
LENS_NODES = {
    "LensModelLoader": ["unet_name", "weight_dtype"],
    "LensTextEncoderLoader": ["text_encoder_name", "weight_dtype", "device"],
    "LensVAELoader": ["vae_name", "weight_dtype"],
    "LensTextEncode": ["clip", "prompt"],
    "LensResolution": ["mode", "base_resolution", "aspect_ratio", "width", "height", "batch_size"],
    "LensScheduler": ["latent", "steps", "denoise"],
    "LensGuider": ["model", "positive", "negative", "cfg"],
    "LensNoise": ["noise_seed"],
    "LensSampler": ["model", "positive", "negative", "latent", "preset", "steps", "cfg", "seed"],
}
TINY = {  # public name in the workflows -> tiny stand-in written by write_tiny_models
    "lens_bf16.safetensors": "lens_tiny.safetensors",
    "lens_turbo_bf16.safetensors": "lens_turbo_tiny.safetensors",
    "gpt-oss-20b/": "gpt-oss-tiny/",
    "flux2-vae.safetensors": "flux2-vae-tiny.safetensors",
}
TOLERANCE = 2  # 8-bit levels


def _loud_skip(reason: str):
    warnings.warn(f"ComfyUI node tests SKIPPED: {reason}", stacklevel=2)
    pytest.skip(f"ComfyUI node tests SKIPPED: {reason}")


INSTALLS = comfyui_installs()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lens-comfy-models")
    return write_tiny_models(root / "models", root / "scratch")


@pytest.fixture(
    scope="module",
    params=INSTALLS or [None],
    ids=[f"comfyui-{comfyui_version(p)}" for p in INSTALLS] or ["no-comfyui"],
)
def server(request, tmp_path_factory):
    root = request.param
    if root is None:
        _loud_skip("no ComfyUI checkout found (set COMFYUI_PATH, or put one at ~/ComfyUI)")
    python = comfyui_python(root)
    problem = missing_requirements(python)
    if problem:
        _loud_skip(f"{python} cannot run ComfyUI at {root} ({problem}); set COMFYUI_PYTHON")
    tiny_models = request.getfixturevalue("tiny_models")
    base = tmp_path_factory.mktemp(f"comfy-base-{comfyui_version(root)}")
    srv = ComfyServer(root, base, python)
    models = tiny_models["lens"].parents[1]
    for sub in ("diffusion_models", "text_encoders", "vae"):
        for item in (models / sub).iterdir():
            (srv.models / sub / item.name).symlink_to(item, target_is_directory=item.is_dir())
    srv.start()
    srv.version = comfyui_version(root)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


# -- helpers ----------------------------------------------------------------------------------------


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))


def with_tiny_models(prompt: dict, **overrides) -> dict:
    """The workflow with the tiny model names, and ``class_type={input: value}`` overrides."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if isinstance(value, str) and value in TINY:
                node["inputs"][key] = TINY[value]
        node["inputs"].update(overrides.get(node["class_type"], {}))
    return prompt


def node_of(prompt: dict, class_type: str) -> dict:
    return next(n for n in prompt.values() if n["class_type"] == class_type)


def input_spec(info: dict, class_type: str) -> dict:
    spec = info[class_type]["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


def validate_against_object_info(prompt: dict, info: dict) -> None:
    """Node types, input names, required inputs, combo values and link types as ComfyUI declares them."""
    for nid, node in prompt.items():
        ctype = node["class_type"]
        assert ctype in info, f"node {nid}: unknown node type {ctype}"
        spec = input_spec(info, ctype)
        required = info[ctype]["input"].get("required", {})
        missing = [k for k in required if k not in node["inputs"]]
        assert not missing, f"node {nid} ({ctype}) lacks required inputs {missing}"
        for key, value in node["inputs"].items():
            assert key in spec, f"node {nid} ({ctype}): no input named {key!r}"
            kind, opts = spec[key][0], (spec[key][1] if len(spec[key]) > 1 else {})
            if isinstance(value, list):
                src = prompt[value[0]]
                out_types = info[src["class_type"]]["output"]
                assert value[1] < len(out_types), f"node {nid}.{key}: output slot {value[1]} of {src['class_type']}"
                assert out_types[value[1]] == kind, f"node {nid}.{key}: {out_types[value[1]]} into {kind}"
                continue
            if isinstance(kind, list) or kind == "COMBO":
                options = kind if isinstance(kind, list) else opts.get("options", [])
                assert value in options, f"node {nid} ({ctype}).{key}: {value!r} not in {options}"
            elif kind == "INT":
                assert isinstance(value, int) and opts.get("min", value) <= value <= opts.get("max", value), (nid, key)
            elif kind == "FLOAT":
                assert isinstance(value, (int, float)) and opts.get("min", value) <= value <= opts.get("max", value), (nid, key)
            elif kind == "STRING":
                assert isinstance(value, str), (nid, key)


def widget_names(info: dict, class_type: str) -> list[str]:
    """Widget inputs in the order ComfyUI declares them (what a UI node's widgets_values follows)."""
    spec = info[class_type]["input"]
    order = info[class_type].get("input_order") or {k: list(v) for k, v in spec.items()}
    names = []
    for section in ("required", "optional"):
        for key in order.get(section, []):
            kind = spec[section][key][0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(key)
    return names


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def reference(paths: dict, transformer: str, text_encoder: str, **call) -> list[np.ndarray]:
    from lens_core.pipeline import LensPipeline

    pipe = LensPipeline(transformer=paths[transformer], text_encoder=paths[text_encoder], vae=paths["vae"], device="cpu")
    return [np.asarray(im).astype(np.int16) for im in pipe(**call).images]


def assert_same_image(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.std() > 5, "blank image"
    diff = np.abs(got - want)
    assert diff.max() <= TOLERANCE, f"max pixel difference {diff.max()} (mean {diff.mean():.3f})"


def run_ok(server: ComfyServer, prompt: dict) -> dict:
    entry = server.run(prompt)
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"], indent=1)[-3000:]
    return entry


# -- tests -------------------------------------------------------------------------------------------


def test_object_info_lists_the_lens_nodes(object_info):
    for node, inputs in LENS_NODES.items():
        assert node in object_info, f"{node} missing from /object_info"
        info = object_info[node]
        assert info["category"] == "Lens"
        spec = input_spec(object_info, node)
        assert sorted(spec) == sorted(inputs)
        for name, entry in spec.items():
            assert len(entry) > 1 and entry[1].get("tooltip"), f"{node}.{name} has no tooltip"
    assert input_spec(object_info, "LensTextEncoderLoader")["text_encoder_name"][1]["options"] == [
        "gpt-oss-tiny/", "gpt_oss_tiny.safetensors"]
    assert input_spec(object_info, "LensVAELoader")["vae_name"][1]["options"] == [
        "flux2-vae-tiny-diffusers/", "flux2-vae-tiny.safetensors"]
    aspect = input_spec(object_info, "LensResolution")["aspect_ratio"][1]["options"]
    assert "16:9 (landscape)" in aspect and "9:16 (portrait)" in aspect and "1:1 (square)" in aspect
    assert len(aspect) == 9


@pytest.mark.parametrize("name", sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")))
def test_api_workflow_validates(object_info, name):
    validate_against_object_info(with_tiny_models(workflow(name)), object_info)


@pytest.mark.parametrize("name", sorted(p.stem for p in (WORKFLOWS / "ui").glob("*.json")))
def test_ui_workflow_widgets_follow_object_info(object_info, name):
    ui = json.loads((WORKFLOWS / "ui" / f"{name}.json").read_text(encoding="utf-8"))
    for node in ui["nodes"]:
        declared = widget_names(object_info, node["type"])
        listed = [i["widget"]["name"] for i in node["inputs"] if i.get("widget")]
        assert listed == declared, f"{node['type']}: UI widgets {listed}, ComfyUI declares {declared}"
        sockets = [i["name"] for i in node["inputs"] if not i.get("widget")]
        assert set(sockets) <= set(input_spec(object_info, node["type"]))


def test_t2i_workflow_same_pixels_as_lens_core(server, tiny_models):
    prompt = with_tiny_models(workflow("lens_t2i"), LensResolution={"mode": "custom", "width": 128, "height": 96},
                              LensSampler={"steps": 6})
    images = server.images(run_ok(server, prompt))
    assert len(images) == 1
    got = pixels(images[0])
    assert got.shape == (96, 128, 3)
    want = reference(tiny_models, "lens", "text_encoder_folder", prompt=node_of(prompt, "LensTextEncode")["inputs"]["prompt"],
                     negative_prompt="", steps=6, cfg=5.0, width=128, height=96, seed=42)[0]
    assert_same_image(got, want)


def test_turbo_workflow_same_pixels_as_lens_core(server, tiny_models):
    prompt = with_tiny_models(
        workflow("lens_turbo_t2i"),
        LensTextEncoderLoader={"text_encoder_name": "gpt_oss_tiny.safetensors"},
        LensResolution={"mode": "custom", "width": 96, "height": 128},
        LensSampler={"seed": 7},
    )
    got = pixels(server.images(run_ok(server, prompt))[0])
    assert got.shape == (128, 96, 3)
    want = reference(tiny_models, "lens_turbo", "text_encoder_file", prompt=node_of(prompt, "LensTextEncode")["inputs"]["prompt"],
                     preset="turbo", width=96, height=128, seed=7)[0]
    assert_same_image(got, want)


def test_custom_sampler_workflow_same_pixels_as_lens_core(server, tiny_models):
    """SamplerCustomAdvanced + Lens Noise/Guider/Scheduler + stock euler = the lens_core sampler."""
    prompt = with_tiny_models(workflow("lens_t2i_custom_sampler"),
                              LensResolution={"mode": "custom", "width": 128, "height": 96},
                              LensScheduler={"steps": 5}, LensNoise={"noise_seed": 3}, LensGuider={"cfg": 4.0})
    got = pixels(server.images(run_ok(server, prompt))[0])
    want = reference(tiny_models, "lens", "text_encoder_folder", prompt=node_of(prompt, "LensTextEncode")["inputs"]["prompt"],
                     steps=5, cfg=4.0, width=128, height=96, seed=3)[0]
    assert_same_image(got, want)


def test_batch_and_stock_text_encode_same_pixels(server, tiny_models):
    """Two images in one batch, conditioning from the stock CLIP Text Encode node."""
    prompt = with_tiny_models(workflow("lens_t2i"), LensResolution={"mode": "custom", "width": 64, "height": 80, "batch_size": 2},
                              LensSampler={"steps": 3, "cfg": 3.0, "seed": 11})
    for nid, node in prompt.items():
        if node["class_type"] == "LensTextEncode":
            prompt[nid] = {"class_type": "CLIPTextEncode", "inputs": {"clip": node["inputs"]["clip"], "text": node["inputs"]["prompt"]}}
    images = sorted(server.images(run_ok(server, prompt)))
    assert len(images) == 2
    text = node_of(prompt, "CLIPTextEncode")["inputs"]["text"]
    want = reference(tiny_models, "lens", "text_encoder_folder", prompt=text, steps=3, cfg=3.0, width=64, height=80,
                     seed=11, num_images_per_prompt=2)
    for path, ref in zip(images, want, strict=True):
        assert_same_image(pixels(path), ref)


def test_vae_encode_decode_round_trip(server, tiny_models):
    """Stock VAE Encode / VAE Decode with the Lens VAE (diffusers folder layout) on a Lens image."""
    import torch

    from lens_core.image_io import to_pil
    from lens_core.loading import load_vae
    from lens_core.vae import unpack_latents

    prompt = with_tiny_models(workflow("lens_turbo_t2i"), LensResolution={"mode": "custom", "width": 64, "height": 48},
                              LensSampler={"seed": 5})
    vae_id = next(k for k, n in prompt.items() if n["class_type"] == "LensVAELoader")
    decode_id = next(k for k, n in prompt.items() if n["class_type"] == "VAEDecode")
    save_id = next(k for k, n in prompt.items() if n["class_type"] == "SaveImage")
    prompt[vae_id]["inputs"]["vae_name"] = "flux2-vae-tiny-diffusers/"
    prompt["90"] = {"class_type": "VAEEncode", "inputs": {"pixels": [decode_id, 0], "vae": [vae_id, 0]}}
    prompt["91"] = {"class_type": "VAEDecode", "inputs": {"samples": ["90", 0], "vae": [vae_id, 0]}}
    prompt[save_id]["inputs"]["images"] = ["91", 0]
    got = pixels(server.images(run_ok(server, prompt))[0])
    assert got.shape == (48, 64, 3)

    from lens_core.pipeline import LensPipeline

    pipe = LensPipeline(transformer=tiny_models["lens_turbo"], text_encoder=tiny_models["text_encoder_folder"],
                        vae=tiny_models["vae_folder"], device="cpu")
    out = pipe(node_of(prompt, "LensTextEncode")["inputs"]["prompt"], preset="turbo", width=64, height=48, seed=5)
    vae = load_vae(tiny_models["vae"], "cpu", torch.float32)
    with torch.inference_mode():
        image = vae.decode(unpack_latents(out.latents, 3, 4))
        again = vae.decode(vae.encode(image))
    assert_same_image(got, np.asarray(to_pil(again)[0]).astype(np.int16))


def test_ksampler_runs_with_a_lens_model(server):
    """The stock KSampler (its own noise and schedule, so not the CLI's pixels) drives the Lens MODEL."""
    prompt = with_tiny_models(workflow("lens_t2i"), LensResolution={"mode": "custom", "width": 80, "height": 64})
    sampler_id = next(k for k, n in prompt.items() if n["class_type"] == "LensSampler")
    s = prompt[sampler_id]["inputs"]
    prompt[sampler_id] = {"class_type": "KSampler", "inputs": {
        "model": s["model"], "positive": s["positive"], "negative": s["negative"], "latent_image": s["latent"],
        "seed": 5, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    got = pixels(server.images(run_ok(server, prompt))[0])
    assert got.shape == (64, 80, 3) and got.std() > 5


def test_custom_resolution_snaps_and_warns(server):
    prompt = with_tiny_models(workflow("lens_turbo_t2i"), LensResolution={"mode": "custom", "width": 330, "height": 100})
    got = pixels(server.images(run_ok(server, prompt))[0])
    assert got.shape == (96, 336, 3)
    assert "outside the trained" in server.log_path.read_text(errors="replace")


def test_unknown_aspect_ratio_is_rejected_at_validation(server):
    prompt = with_tiny_models(workflow("lens_t2i"), LensResolution={"aspect_ratio": "5:4 (landscape)"})
    status, body = server.post("/prompt", {"prompt": prompt})
    assert status == 400
    errors = json.dumps(body.get("node_errors", {}))
    assert "aspect_ratio" in errors and "5:4" in errors


def test_missing_or_broken_model_file_is_an_execution_error(server):
    folder = server.models / "diffusion_models"
    (folder / "gone.safetensors").symlink_to(folder / "does-not-exist.safetensors")  # e.g. an unmounted drive
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    for name, expected in (("gone.safetensors", "not found"), ("broken.safetensors", "broken.safetensors")):
        prompt = with_tiny_models(workflow("lens_turbo_t2i"), LensModelLoader={"unet_name": name})
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "error"
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert errors and errors[0]["node_type"] == "LensModelLoader"
        assert expected in errors[0]["exception_message"], errors[0]["exception_message"]
    assert server.alive() and server.get("/system_stats")["system"]
    run_ok(server, with_tiny_models(workflow("lens_turbo_t2i"), LensResolution={"mode": "custom", "width": 32, "height": 32}))


def test_lens_sampler_stops_when_interrupted(server):
    # Warm up: loaders and the prompt's encoding are then cached, so the long run is all sampling.
    run_ok(server, with_tiny_models(workflow("lens_turbo_t2i"), LensSampler={"steps": 1},
                                    LensResolution={"mode": "custom", "width": 32, "height": 32}))
    prompt = with_tiny_models(workflow("lens_turbo_t2i"), LensResolution={"mode": "custom", "width": 512, "height": 512},
                              LensSampler={"steps": 1000})
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + 60
    while not server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    started = time.monotonic()
    server.post("/interrupt", {})
    entry = server.wait(prompt_id, timeout=120)
    assert time.monotonic() - started < 30
    kinds = {m[0]: m[1] for m in entry["status"]["messages"]}
    assert "execution_interrupted" in kinds, entry["status"]
    assert kinds["execution_interrupted"]["node_type"] == "LensSampler"


def test_native_lens_model_with_lens_conditioning(server, tiny_models):
    """ComfyUI's own Lens model (0.23+) reads this package's conditioning and, driven by Lens
    Noise/Guider/Scheduler, gives lens_core's pixels: the two implementations and the
    conditioning layout agree."""
    if not (server.comfy_root / "comfy" / "ldm" / "lens").is_dir():
        pytest.skip(f"ComfyUI {server.version} has no native Lens model")
    prompt = with_tiny_models(workflow("lens_t2i_custom_sampler"),
                              LensResolution={"mode": "custom", "width": 96, "height": 64},
                              LensScheduler={"steps": 4}, LensNoise={"noise_seed": 9},
                              LensTextEncoderLoader={"text_encoder_name": "gpt_oss_tiny.safetensors"})
    loader = next(k for k, n in prompt.items() if n["class_type"] == "LensModelLoader")
    prompt[loader] = {"class_type": "UNETLoader", "inputs": {"unet_name": "lens_tiny.safetensors", "weight_dtype": "default"}}
    got = pixels(server.images(run_ok(server, prompt))[0])
    want = reference(tiny_models, "lens", "text_encoder_file", prompt=node_of(prompt, "LensTextEncode")["inputs"]["prompt"],
                     steps=4, cfg=5.0, width=96, height=64, seed=9)[0]
    assert_same_image(got, want)
