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
import os
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
from .test_reasoner_api import KEY, KEY_ENV, ChatServer, ok_reply

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
    "LensLoraLoader": ["model", "lora_name", "strength"],
    "LensReasoner": ["prompt", "mode", "clip", "api_base_url", "api_model", "api_key_env", "system_prompt", "seed",
                     "temperature", "max_new_tokens", "on_error"],
}
TINY = {  # public name in the workflows -> tiny stand-in written by write_tiny_models
    "lens_bf16.safetensors": "lens_tiny.safetensors",
    "lens_turbo_bf16.safetensors": "lens_turbo_tiny.safetensors",
    "gpt-oss-20b/": "gpt-oss-tiny/",
    "flux2-vae.safetensors": "flux2-vae-tiny.safetensors",
    "lens_lora.safetensors": "lens_lora_tiny.safetensors",
}
TOLERANCE = 2  # 8-bit levels
# The same LoRA in the namings met in the wild (see write_tiny_loras); file name -> what it tests.
LORA_FILES = {
    "lens_lora_tiny.safetensors": "OneTrainer: transformer.<path>.lora_down/up + .alpha, split q/k/v",
    "lens_lora_comfy_ab.safetensors": "ComfyUI / ai-toolkit: diffusion_model.<path>.lora_A/lora_B + .alpha",
    "lens_lora_comfy_updown.safetensors": "ComfyUI: diffusion_model.<path>.lora_down/lora_up + .alpha",
    "lens_lora_kohya.safetensors": "musubi-tuner / kohya: lora_unet_<path_>.lora_down/up + .alpha",
}
STOCK_LOADER_FILES = ["lens_lora_comfy_ab.safetensors", "lens_lora_comfy_updown.safetensors",
                      "lens_lora_kohya.safetensors"]


def _loud_skip(reason: str):
    warnings.warn(f"ComfyUI node tests SKIPPED: {reason}", stacklevel=2)
    pytest.skip(f"ComfyUI node tests SKIPPED: {reason}")


INSTALLS = comfyui_installs()


def write_tiny_loras(folder: Path, mmdit_path: Path) -> dict[str, Path]:
    """One random rank-4 LoRA on every block projection of the tiny MMDiT, written in each naming
    of LORA_FILES. All files hold the same update, so they all give the same image."""
    import torch

    from lens_core.loading import load_mmdit_config
    from lens_core.lora import (
        LoraModule,
        lens_lora_targets,
        linear_weight_shapes,
        to_kohya_state_dict,
        to_peft_state_dict,
    )
    from lens_core.mmdit import LensMMDiT
    from lens_core.safetensors_io import save_file_atomic

    config = load_mmdit_config(mmdit_path)
    with torch.device("meta"):
        shapes = linear_weight_shapes(LensMMDiT(config))
    g = torch.Generator().manual_seed(11)
    fused, split = {}, {}
    for name in lens_lora_targets(config.num_layers):
        out, inp = shapes[name]
        m = LoraModule(name, 0.3 * torch.randn(4, inp, generator=g), 0.3 * torch.randn(out, 4, generator=g), 2.0)
        fused[(name, None)] = m
        if name.endswith("qkv"):
            for part, up in enumerate(m.up.chunk(3)):
                split[(name, part)] = LoraModule(name, m.down, up.contiguous(), 2.0, part)
        else:
            split[(name, None)] = m

    def alphas(sd: dict) -> dict:
        stems = {k.rsplit(".lora_", 1)[0] for k in sd}
        return {f"{stem}.alpha": torch.tensor(2.0) for stem in stems}

    def down_up(sd: dict) -> dict:
        return {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in sd.items()}

    onetrainer = down_up(to_peft_state_dict(split, "transformer."))
    comfy_ab = to_peft_state_dict(fused, "diffusion_model.")
    files = {
        "lens_lora_tiny.safetensors": onetrainer | alphas(onetrainer),
        "lens_lora_comfy_ab.safetensors": comfy_ab | alphas(comfy_ab),
        "lens_lora_comfy_updown.safetensors": down_up(comfy_ab) | alphas(comfy_ab),
        "lens_lora_kohya.safetensors": to_kohya_state_dict(fused),
    }
    assert set(files) == set(LORA_FILES)
    folder.mkdir(parents=True, exist_ok=True)
    return {name: save_file_atomic({k: v.clone().contiguous() for k, v in sd.items()}, folder / name)
            for name, sd in files.items()}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lens-comfy-models")
    paths = write_tiny_models(root / "models", root / "scratch")
    paths["loras"] = write_tiny_loras(root / "models" / "loras", paths["lens"])
    return paths


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
    (srv.models / "loras").mkdir(exist_ok=True)
    for sub in ("diffusion_models", "text_encoders", "vae", "loras"):
        for item in (models / sub).iterdir():
            (srv.models / sub / item.name).symlink_to(item, target_is_directory=item.is_dir())
    had_key = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY  # the reasoner tests' API key, seen only by the server process
    try:
        srv.start()
    finally:
        if had_key is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = had_key
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
                assert kind == "*" or out_types[value[1]] == kind, f"node {nid}.{key}: {out_types[value[1]]} into {kind}"
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


def reference(paths: dict, transformer: str, text_encoder: str, loras=(), **call) -> list[np.ndarray]:
    from lens_core.pipeline import LensPipeline

    pipe = LensPipeline(transformer=paths[transformer], text_encoder=paths[text_encoder], vae=paths["vae"], device="cpu",
                        loras=loras)
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
    assert input_spec(object_info, "LensLoraLoader")["lora_name"][1]["options"] == sorted(LORA_FILES)
    reasoner = input_spec(object_info, "LensReasoner")
    assert reasoner["mode"][1]["options"] == ["off", "local", "api"]
    assert reasoner["api_key_env"][1]["default"] == "OPENAI_API_KEY" and reasoner["api_base_url"][1]["default"] == ""
    assert object_info["LensReasoner"]["output"] == ["STRING"]


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


# -- LoRA -------------------------------------------------------------------------------------------

LORA_CALL = dict(steps=4, cfg=5.0, width=96, height=64, seed=42)


def _lora_prompt(**overrides) -> dict:
    return with_tiny_models(workflow("lens_t2i_lora"), LensResolution={"mode": "custom", "width": 96, "height": 64},
                            LensSampler={"steps": 4}, **overrides)


@pytest.fixture(scope="module")
def lora_references(tiny_models) -> dict:
    """lens_core's images for the LoRA tests: without LoRA, and with it at 0.8."""
    text = node_of(workflow("lens_t2i_lora"), "LensTextEncode")["inputs"]["prompt"]
    call = dict(prompt=text, negative_prompt="", **LORA_CALL)
    plain = reference(tiny_models, "lens", "text_encoder_folder", **call)[0]
    lora = tiny_models["loras"]["lens_lora_tiny.safetensors"]
    with_lora = reference(tiny_models, "lens", "text_encoder_folder", loras=[(lora, 0.8)], **call)[0]
    assert np.abs(with_lora - plain).max() > 20, "the test LoRA should change the image"
    return {"plain": plain, "lora": with_lora, "call": call}


def test_lora_workflow_same_pixels_as_lens_core_and_unpatches(server, lora_references):
    """Lens LoRA Loader (OneTrainer naming, split q/k/v) = lens_core with the LoRA merged; the next
    workflow without the LoRA gets the plain weights back (ComfyUI unpatched the shared model)."""
    got = pixels(server.images(run_ok(server, _lora_prompt(LensLoraLoader={"strength": 0.8})))[0])
    assert_same_image(got, lora_references["lora"])
    plain = with_tiny_models(workflow("lens_t2i"), LensResolution={"mode": "custom", "width": 96, "height": 64},
                             LensSampler={"steps": 4})
    assert_same_image(pixels(server.images(run_ok(server, plain))[0]), lora_references["plain"])
    # strength 0 is the model itself
    zero = pixels(server.images(run_ok(server, _lora_prompt(LensLoraLoader={"strength": 0.0})))[0])
    assert_same_image(zero, lora_references["plain"])


@pytest.mark.parametrize("lora_name", STOCK_LOADER_FILES)
def test_stock_lora_loader_with_comfyui_naming(server, lora_references, lora_name):
    """ComfyUI's own LoraLoaderModelOnly maps diffusion_model.<path> and lora_unet_<path_> LoRAs onto
    the Lens MODEL through its generic key map: same pixels as lens_core with the LoRA."""
    prompt = _lora_prompt()
    lora_id = next(k for k, n in prompt.items() if n["class_type"] == "LensLoraLoader")
    prompt[lora_id] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": prompt[lora_id]["inputs"]["model"], "lora_name": lora_name, "strength_model": 0.8}}
    got = pixels(server.images(run_ok(server, prompt))[0])
    assert_same_image(got, lora_references["lora"])


def test_lens_lora_loader_reads_every_naming(server, lora_references):
    for name in LORA_FILES:
        got = pixels(server.images(run_ok(server, _lora_prompt(LensLoraLoader={"lora_name": name, "strength": 0.8})))[0])
        assert_same_image(got, lora_references["lora"])


def test_lens_lora_loader_refuses_other_files(server, tiny_models):
    folder = server.models / "loras"
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
              folder / "sdxl_style.safetensors")
    entry = server.run(_lora_prompt(LensLoraLoader={"lora_name": "sdxl_style.safetensors"}))
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "LensLoraLoader"
    assert "no LoRA weights for this model" in errors[0]["exception_message"]


def test_lens_lora_loader_on_comfyuis_native_lens_model(server, tiny_models, lora_references):
    if not (server.comfy_root / "comfy" / "ldm" / "lens").is_dir():
        pytest.skip(f"ComfyUI {server.version} has no native Lens model")
    prompt = with_tiny_models(workflow("lens_t2i_custom_sampler"),
                              LensResolution={"mode": "custom", "width": 96, "height": 64},
                              LensScheduler={"steps": 4}, LensNoise={"noise_seed": 42}, LensGuider={"cfg": 5.0})
    loader = next(k for k, n in prompt.items() if n["class_type"] == "LensModelLoader")
    prompt[loader] = {"class_type": "UNETLoader", "inputs": {"unet_name": "lens_tiny.safetensors", "weight_dtype": "default"}}
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if value == [loader, 0]:
                node["inputs"][key] = ["95", 0]
    prompt["95"] = {"class_type": "LensLoraLoader", "inputs": {"model": [loader, 0], "lora_name": "lens_lora_tiny.safetensors",
                                                               "strength": 0.8}}
    text = node_of(prompt, "LensTextEncode")["inputs"]["prompt"]
    want = reference(tiny_models, "lens", "text_encoder_folder", prompt=text, negative_prompt="",
                     loras=[(tiny_models["loras"]["lens_lora_tiny.safetensors"], 0.8)], **LORA_CALL)[0]
    assert_same_image(pixels(server.images(run_ok(server, prompt))[0]), want)


# -- Reasoner ---------------------------------------------------------------------------------------

REFINED = ("A glossy ceramic teapot shaped like a curled sleeping fox, orange glaze with white tips, resting on a "
           "worn oak table by a bright window.")


@pytest.fixture
def chat():
    s = ChatServer()
    yield s
    s.close()


def _reasoner_prompt(chat_server, **reasoner) -> dict:
    settings = {"mode": "api", "api_base_url": chat_server.url, "api_model": "test-model", "api_key_env": KEY_ENV,
                "seed": 3, **reasoner}
    return with_tiny_models(workflow("lens_t2i_reasoner"), LensReasoner=settings,
                            LensResolution={"mode": "custom", "width": 96, "height": 64}, LensSampler={"steps": 4})


def _ui_text(entry: dict, prompt: dict, class_type: str) -> str:
    nid = next(k for k, n in prompt.items() if n["class_type"] == class_type)
    return "\n".join(entry["outputs"][nid]["text"])


def test_reasoner_workflow_api_same_pixels_as_lens_core(server, tiny_models, chat):
    """The Lens Reasoner (api mode, a local chat-completions server) feeds Lens Text Encode: the image
    is lens_core's for the refined prompt; the node shows the refined text; the key stays in the env."""
    chat.script = [ok_reply(REFINED), ok_reply("a second rewrite")]
    prompt = _reasoner_prompt(chat)
    entry = run_ok(server, prompt)
    got = pixels(server.images(entry)[0])
    want = reference(tiny_models, "lens", "text_encoder_folder", prompt=REFINED, negative_prompt="",
                     steps=4, cfg=5.0, width=96, height=64, seed=42)[0]
    assert_same_image(got, want)
    assert _ui_text(entry, prompt, "LensReasoner") == REFINED
    assert _ui_text(entry, prompt, "PreviewAny") == REFINED
    [request] = chat.requests
    assert request["path"] == "/v1/chat/completions" and request["body"]["model"] == "test-model"
    assert request["body"]["messages"][-1] == {"role": "user", "content": "a teapot shaped like a sleeping fox"}
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in json.dumps(entry) and KEY not in server.log_path.read_text(errors="replace")

    # Re-queued with another image seed: the rewrite is not asked for again.
    run_ok(server, with_tiny_models(prompt, LensSampler={"seed": 43}))
    assert len(chat.requests) == 1
    # Another prompt asks once; going back to the first one is served from the reasoner's cache.
    other = with_tiny_models(prompt, LensReasoner={"prompt": "a lighthouse at dusk"})
    assert _ui_text(run_ok(server, other), other, "LensReasoner") == "a second rewrite"
    run_ok(server, prompt)
    assert len(chat.requests) == 2


def test_reasoner_passthrough_shows_why_and_retries_on_requeue(server, chat):
    chat.script = [(400, {}, json.dumps({"error": {"message": "model not found"}}).encode()), ok_reply(REFINED)]
    prompt = _reasoner_prompt(chat, prompt="a fox in the snow", on_error="passthrough", seed=8)
    entry = run_ok(server, prompt)
    shown = _ui_text(entry, prompt, "LensReasoner")
    assert shown.startswith("a fox in the snow") and "HTTP 400" in shown and "model not found" in shown
    assert _ui_text(entry, prompt, "PreviewAny") == "a fox in the snow"  # the STRING output is the prompt itself
    entry = run_ok(server, prompt)  # a fallback is not kept: re-queueing asks again
    assert len(chat.requests) == 2 and _ui_text(entry, prompt, "LensReasoner") == REFINED


def test_reasoner_api_error_fails_the_node(server, chat):
    chat.script = [(401, {}, b'{"error": {"message": "bad key"}}')]
    entry = server.run(_reasoner_prompt(chat, prompt="a fox at night"))
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "LensReasoner"
    message = errors[0]["exception_message"]
    assert "HTTP 401" in message and KEY_ENV in message and KEY not in message


def test_reasoner_local_mode_uses_the_lens_clip(server):
    """local mode reaches the GPT-OSS checkpoint behind the connected Lens CLIP; the tiny encoder has
    no LM head, which is the error (or, with passthrough, the reason shown) that proves it."""
    prompt = with_tiny_models(workflow("lens_t2i_reasoner"), LensReasoner={"prompt": "a red cube", "max_new_tokens": 8},
                              LensResolution={"mode": "custom", "width": 32, "height": 32}, LensSampler={"steps": 1})
    entry = server.run(prompt)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "LensReasoner"
    assert "lm_head" in errors[0]["exception_message"] and "gpt-oss-tiny" in errors[0]["exception_message"]

    passthrough = with_tiny_models(prompt, LensReasoner={"on_error": "passthrough"})
    entry = run_ok(server, passthrough)
    shown = _ui_text(entry, passthrough, "LensReasoner")
    assert shown.startswith("a red cube") and "lm_head" in shown

    no_clip = with_tiny_models(prompt, LensReasoner={"on_error": "fail"})
    del node_of(no_clip, "LensReasoner")["inputs"]["clip"]
    entry = server.run(no_clip)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "clip input" in errors[0]["exception_message"]


def test_reasoner_local_mode_generates_with_the_clips_encoder(server, tiny_models):
    """With an LM head beside the tiny encoder, local mode really decodes with the CLIP's encoder
    under ComfyUI's model management. Random weights never write a harmony 'final' answer, so the
    rewrite falls back after exactly max_new_tokens tokens, and the node says so."""
    import shutil

    import torch

    from lens_core.safetensors_io import save_file_atomic

    folder = server.models / "text_encoders" / "gpt-oss-tiny-lm"
    if not folder.exists():
        shutil.copytree(tiny_models["text_encoder_folder"], folder)
        assert not list(folder.glob("*.index.json"))
        config = json.loads((folder / "config.json").read_text())
        g = torch.Generator().manual_seed(99)
        save_file_atomic({"model.norm.weight": torch.ones(config["hidden_size"]),
                          "lm_head.weight": torch.randn(config["vocab_size"], config["hidden_size"], generator=g)},
                         folder / "model-head.safetensors")
    prompt = with_tiny_models(workflow("lens_t2i_reasoner"),
                              LensTextEncoderLoader={"text_encoder_name": "gpt-oss-tiny-lm/"},
                              LensReasoner={"prompt": "a red cube", "max_new_tokens": 6, "on_error": "passthrough",
                                            "temperature": 0.0},
                              LensResolution={"mode": "custom", "width": 32, "height": 32}, LensSampler={"steps": 1})
    entry = run_ok(server, prompt)
    shown = _ui_text(entry, prompt, "LensReasoner")
    assert shown.startswith("a red cube") and "no 'final' answer within max_new_tokens=6" in shown, shown
