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
    EXTENSION_NAME,
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
    "lens-Q4_K.gguf": "lens_tiny-Q4_K.gguf",
    "gpt-oss-20b-Q4_K_M.gguf": "gpt_oss_tiny-Q8_0.gguf",
}
# The tiny models as GGUF files (write_tiny_ggufs): key -> (folder, file name).
GGUF_FILES = {
    "lens_gguf_f32": ("diffusion_models", "lens_tiny-F32.gguf"),
    "lens_gguf_q8": ("diffusion_models", "lens_tiny-Q8_0.gguf"),
    "lens_gguf_q4": ("diffusion_models", "lens_tiny-Q4_K.gguf"),
    "text_encoder_gguf_f32": ("text_encoders", "gpt_oss_tiny-F32.gguf"),
    "text_encoder_gguf_q8": ("text_encoders", "gpt_oss_tiny-Q8_0.gguf"),
}
# The tiny MMDiT in ComfyUI's quantised safetensors layouts (write_tiny_comfy_quants): lens-quantize type ->
# file name; the key in tiny_models is lens_<type>.
COMFY_QUANT_FILES = {qtype: f"lens_tiny-{qtype}.safetensors" for qtype in ("fp8_e4m3fn", "fp8_scaled", "mxfp8", "nvfp4")}
# What the Lens Model Loader logs for their packed layers (quant's format names).
PACKED_FORMAT = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_scaled": "float8_e4m3fn", "mxfp8": "mxfp8", "nvfp4": "nvfp4"}
NATIVE_ENCODER = "gpt_oss_tiny_native.safetensors"  # the tiny encoder in ComfyUI's own GPT-OSS layout
NATIVE_CLIP_NODE = REPO / "tests" / "comfy_native_clip_node.py"  # test-only loader for it
TOLERANCE = 2  # 8-bit levels
BUILTIN = "lens-toy (built-in)"  # the loaders' entry for Lens-Toy, the model that ships in lens_core/default_model
TOY_BASE = "128 (Lens-Toy)"  # Lens Resolution's base for it
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


def fit_lora(lora: Path, model: Path, folder: Path) -> Path:
    """``lora`` (any naming) for the MMDiT file ``model``: the file itself when it fits, else a copy in
    ``folder`` whose matrices are zero-padded to the model's layer sizes.

    ComfyUI's mxfp8/nvfp4 files store matrices zero-padded to multiples of 32/16 without saying so,
    and the tiny MMDiT's MLP width (341) is not one: such a file is a 352-wide model whose extra
    units are zero, and the padded LoRA makes the same update on it. (Lens's sizes are all multiples
    of 32: no real file is padded.)"""
    import torch
    import torch.nn.functional as F

    from lens_core.loading import load_mmdit_config
    from lens_core.lora import linear_weight_shapes, load_lora_file, parse_lora
    from lens_core.mmdit import LensMMDiT
    from lens_core.safetensors_io import save_file_atomic

    with torch.device("meta"):
        shapes = linear_weight_shapes(LensMMDiT(load_mmdit_config(model)))
    tensors, metadata = load_lora_file(lora)
    modules, unmatched = parse_lora(tensors, shapes, metadata)
    assert not unmatched, unmatched
    padded = {}
    for (name, part), m in modules.items():
        out, inp = shapes[name]
        rows = out if part is None else out // 3
        for key in m.source_keys:  # parse_lora keeps the file's tensor objects
            if tensors[key] is m.down and m.down.shape[1] != inp:
                padded[key] = F.pad(m.down, (0, inp - m.down.shape[1]))
            elif tensors[key] is m.up and m.up.shape[0] != rows:
                padded[key] = F.pad(m.up, (0, 0, 0, rows - m.up.shape[0]))
    if not padded:
        return lora
    padded = tensors | padded
    return save_file_atomic(padded, folder / f"{model.stem}-{lora.name}", metadata)


def write_tiny_ggufs(models: Path, paths: dict[str, Path]) -> dict[str, Path]:
    """The tiny MMDiT and encoder as GGUF files (GGUF_FILES): the MMDiT through lens-quantize's
    converter (F32, Q8_0, Q4_K), the encoder as llama.cpp lays out gpt-oss (F32; Q8_0 weights with
    MXFP4 experts), tokenizer in the metadata."""
    from safetensors.torch import load_file

    from lens_core.text_encoder import GptOssConfig
    from quant.convert import convert_mmdit
    from quant.gpt_oss_gguf import write_gpt_oss_gguf

    out = {key: models / folder / name for key, (folder, name) in GGUF_FILES.items()}
    for key, qtype in (("lens_gguf_f32", "F32"), ("lens_gguf_q8", "Q8_0"), ("lens_gguf_q4", "Q4_K")):
        convert_mmdit(paths["lens"], out[key], qtype)
    folder = paths["text_encoder_folder"]
    config = GptOssConfig.from_json(folder / "config.json")
    state = load_file(paths["text_encoder_file"])
    write_gpt_oss_gguf(state, config, out["text_encoder_gguf_f32"], tokenizer_json=folder / "tokenizer.json")
    write_gpt_oss_gguf(state, config, out["text_encoder_gguf_q8"], expert_type="MXFP4", weight_type="Q8_0",
                       tokenizer_json=folder / "tokenizer.json")
    return out


def write_tiny_comfy_quants(models: Path, mmdit_path: Path) -> dict[str, Path]:
    """The tiny MMDiT as ComfyUI quantised safetensors (COMFY_QUANT_FILES), written by lens-quantize:
    plain fp8, legacy scaled fp8 (``scaled_fp8`` marker + ``scale_weight``) and ``comfy_quant``
    mxfp8/nvfp4 (modulation and input/output layers kept in fp32, as Comfy-Org's lens_mxfp8)."""
    from quant.convert import main as lens_quantize

    out = {}
    for qtype, name in COMFY_QUANT_FILES.items():
        out[f"lens_{qtype}"] = models / "diffusion_models" / name
        assert lens_quantize([str(mmdit_path), str(out[f"lens_{qtype}"]), "--type", qtype, "--quiet"]) == 0
    return out


def write_native_lens_encoder(paths: dict[str, Path], dst: Path) -> Path:
    """The tiny encoder as ComfyUI's own Lens text encoder holds GPT-OSS: bare module names
    (``layers.N...``), each MoE projection one ``[experts, out, in]`` bank with its biases, the
    tokenizer JSON as a uint8 tensor ``tokenizer_json``; the size (that of the ``config.json`` of
    the tiny folder: top-2 routing, which the bare safetensors file cannot say) as ``gpt_oss_config``
    metadata for the test loader node (tests/comfy_native_clip_node.py)."""
    import torch
    from safetensors.torch import load_file

    from lens_core.safetensors_io import save_file_atomic
    from lens_core.text_encoder import GptOssConfig

    folder = paths["text_encoder_folder"]
    cfg = GptOssConfig.from_json(folder / "config.json")
    sd = {}
    for key, t in load_file(paths["text_encoder_file"]).items():
        name = key.removeprefix("model.")
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # HF [E, in, out]
            sd[f"{name}.weight"] = t.transpose(1, 2).contiguous()
        elif name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):
            sd[name.removesuffix("_bias") + ".bias"] = t
        else:
            sd[name] = t
    tokenizer = (folder / "tokenizer.json").read_bytes()
    sd["tokenizer_json"] = torch.frombuffer(bytearray(tokenizer), dtype=torch.uint8)
    rope = cfg.rope_scaling
    size = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "num_local_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types), "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_factor": rope["factor"], "rope_beta_fast": rope["beta_fast"],
        "rope_beta_slow": rope["beta_slow"], "rope_truncate": rope["truncate"],
        "original_max_position_embeddings": rope["original_max_position_embeddings"],
        "moe_alpha": cfg.swiglu_alpha, "moe_limit": cfg.swiglu_limit,
    }
    return save_file_atomic(sd, dst, {"gpt_oss_config": json.dumps(size)})


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lens-comfy-models")
    paths = write_tiny_models(root / "models", root / "scratch")
    paths["loras"] = write_tiny_loras(root / "models" / "loras", paths["lens"])
    paths.update(write_tiny_ggufs(root / "models", paths))
    paths.update(write_tiny_comfy_quants(root / "models", paths["lens"]))
    paths["native_encoder"] = write_native_lens_encoder(paths, root / "models" / "text_encoders" / NATIVE_ENCODER)
    return paths


def usable_python(root: Path | None) -> str:
    """The Python that runs the ComfyUI checkout ``root``, or a loud skip saying what is missing."""
    if root is None:
        _loud_skip("no ComfyUI checkout found (set COMFYUI_PATH, or put one at ~/ComfyUI)")
    python = comfyui_python(root)
    problem = missing_requirements(python)
    if problem:
        _loud_skip(f"{python} cannot run ComfyUI at {root} ({problem}); set COMFYUI_PYTHON")
    return python


# One server per ComfyUI checkout found.
PER_INSTALL = {"scope": "module", "params": INSTALLS or [None],
               "ids": [f"comfyui-{comfyui_version(p)}" for p in INSTALLS] or ["no-comfyui"]}


@pytest.fixture(**PER_INSTALL)
def server(request, tmp_path_factory):
    root = request.param
    python = usable_python(root)
    tiny_models = request.getfixturevalue("tiny_models")
    base = tmp_path_factory.mktemp(f"comfy-base-{comfyui_version(root)}")
    srv = ComfyServer(root, base, python)
    (srv.base / "custom_nodes" / NATIVE_CLIP_NODE.name).symlink_to(NATIVE_CLIP_NODE)
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


@pytest.fixture(**PER_INSTALL)
def bare_server(request, tmp_path_factory):
    """A server with empty model folders, as a new user has before downloading anything."""
    root = request.param
    python = usable_python(root)
    with ComfyServer(root, tmp_path_factory.mktemp(f"comfy-bare-{comfyui_version(root)}"), python) as srv:
        yield srv


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


def combo_options(info: dict, class_type: str, name: str) -> list:
    """A combo input's values, in either /object_info form (V1: a list; V3: COMBO + options)."""
    kind, *rest = input_spec(info, class_type)[name]
    return kind if isinstance(kind, list) else rest[0]["options"]


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


def resolution_size(inputs: dict) -> tuple[int, int]:
    """(width, height) that a Lens Resolution node with these inputs makes (base "1024" or "128 (Lens-Toy)")."""
    from lens_core.resolution import scaled_bucket, snap_to_multiple

    if inputs["mode"] == "custom":
        return snap_to_multiple(inputs["width"]), snap_to_multiple(inputs["height"])
    return scaled_bucket(int(inputs["base_resolution"].split(" ", 1)[0]), inputs["aspect_ratio"])


def lens_toy_reference(prompt: dict) -> np.ndarray:
    """What LensPipeline with its default model (Lens-Toy) makes for a one-sampler API workflow, as
    Save Image stores it: the decoded image in [0, 1] times 255, truncated to 8 bits (the CLI rounds
    instead), so the workflow's file must equal it exactly."""
    from lens_core.pipeline import LensPipeline

    sampler = node_of(prompt, "LensSampler")["inputs"]
    encode = prompt[sampler["positive"][0]]["inputs"]
    negative = prompt[sampler["negative"][0]]["inputs"]["prompt"] if "negative" in sampler else ""
    width, height = resolution_size(prompt[sampler["latent"][0]]["inputs"])
    pipe = LensPipeline(device="cpu")
    out = pipe(encode["prompt"], negative_prompt=negative, preset=sampler["preset"], steps=sampler["steps"] or None,
               cfg=sampler["cfg"] or None, width=width, height=height, seed=sampler["seed"])
    unit = ((pipe.decode(out.latents, (height // 16, width // 16)).float() + 1.0) * 0.5)[0].movedim(0, -1).numpy()
    return np.clip(255.0 * unit, 0, 255).astype(np.uint8).astype(np.int16)


def assert_pixel_for_pixel(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.std() > 5, "blank image"
    diff = np.abs(got - want)
    assert diff.max() == 0, f"{np.count_nonzero(diff)} values differ, by up to {diff.max()}"


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
    assert combo_options(object_info, "LensTextEncoderLoader", "text_encoder_name") == [
        BUILTIN, "gpt-oss-tiny/", "gpt_oss_tiny-F32.gguf", "gpt_oss_tiny-Q8_0.gguf", "gpt_oss_tiny.safetensors",
        NATIVE_ENCODER]
    assert combo_options(object_info, "LensModelLoader", "unet_name") == [
        BUILTIN, "lens_tiny-F32.gguf", "lens_tiny-Q4_K.gguf", "lens_tiny-Q8_0.gguf",
        *sorted(COMFY_QUANT_FILES.values()), "lens_tiny.safetensors", "lens_turbo_tiny.safetensors"]
    assert input_spec(object_info, "LensVAELoader")["vae_name"][1]["options"] == [
        BUILTIN, "flux2-vae-tiny-diffusers/", "flux2-vae-tiny.safetensors"]
    for node, name in (("LensModelLoader", "unet_name"), ("LensTextEncoderLoader", "text_encoder_name"),
                       ("LensVAELoader", "vae_name")):
        assert input_spec(object_info, node)[name][1]["default"] == BUILTIN, node
    base = input_spec(object_info, "LensResolution")["base_resolution"][1]
    assert base["options"] == ["1024", "1440", TOY_BASE] and base["default"] == "1024"
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

SMALL_CALL = dict(steps=4, cfg=5.0, width=96, height=64, seed=42)  # what _small_prompt / _lora_prompt run


def _small_prompt(**overrides) -> dict:
    """lens_t2i at SMALL_CALL's size and steps."""
    return with_tiny_models(workflow("lens_t2i"), LensResolution={"mode": "custom", "width": 96, "height": 64},
                            LensSampler={"steps": 4}, **overrides)


def _lora_prompt(**overrides) -> dict:
    return with_tiny_models(workflow("lens_t2i_lora"), LensResolution={"mode": "custom", "width": 96, "height": 64},
                            LensSampler={"steps": 4}, **overrides)


@pytest.fixture(scope="module")
def lora_references(tiny_models) -> dict:
    """lens_core's images for the LoRA tests: without LoRA, and with it at 0.8."""
    text = node_of(workflow("lens_t2i_lora"), "LensTextEncode")["inputs"]["prompt"]
    call = dict(prompt=text, negative_prompt="", **SMALL_CALL)
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
    assert_same_image(pixels(server.images(run_ok(server, _small_prompt()))[0]), lora_references["plain"])
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
                     loras=[(tiny_models["loras"]["lens_lora_tiny.safetensors"], 0.8)], **SMALL_CALL)[0]
    assert_same_image(pixels(server.images(run_ok(server, prompt))[0]), want)


# -- GGUF -------------------------------------------------------------------------------------------


def test_only_the_lens_loaders_list_gguf_files(object_info):
    """.gguf is registered for the Lens loaders alone: ComfyUI's own loaders (which cannot read these
    files) and the Lens LoRA/VAE loaders list what they listed before."""
    for class_type, name in (("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("LoraLoaderModelOnly", "lora_name"),
                             ("CheckpointLoaderSimple", "ckpt_name"), ("LensVAELoader", "vae_name"),
                             ("LensLoraLoader", "lora_name")):
        options = combo_options(object_info, class_type, name)
        assert not [o for o in options if o.endswith(".gguf")], (class_type, options)
    assert "lens_tiny.safetensors" in combo_options(object_info, "UNETLoader", "unet_name")
    assert "gpt_oss_tiny.safetensors" in combo_options(object_info, "CLIPLoader", "clip_name")


def test_gguf_f32_same_pixels_as_the_safetensors_files(server, tiny_models):
    """F32 GGUFs of the MMDiT (lens-quantize) and of the encoder (llama.cpp layout, tokenizer from the
    metadata) hold the safetensors values: lens_core's pixels for the safetensors files."""
    prompt = _small_prompt(LensModelLoader={"unet_name": "lens_tiny-F32.gguf"},
                           LensTextEncoderLoader={"text_encoder_name": "gpt_oss_tiny-F32.gguf"})
    got = pixels(server.images(run_ok(server, prompt))[0])
    want = reference(tiny_models, "lens", "text_encoder_folder", prompt=node_of(prompt, "LensTextEncode")["inputs"]["prompt"],
                     negative_prompt="", **SMALL_CALL)[0]
    assert_same_image(got, want)


def test_gguf_q8_same_pixels_as_lens_core_and_close_to_the_original(server, tiny_models):
    from quant.gguf_reader import GGUFFile

    with GGUFFile(tiny_models["lens_gguf_q8"]) as f:
        assert f.tensors["transformer_blocks.0.attn.img_qkv.weight"].ggml_type.name == "Q8_0"
    prompt = _small_prompt(LensModelLoader={"unet_name": "lens_tiny-Q8_0.gguf"})
    text = node_of(prompt, "LensTextEncode")["inputs"]["prompt"]
    got = pixels(server.images(run_ok(server, prompt))[0])
    assert_same_image(got, reference(tiny_models, "lens_gguf_q8", "text_encoder_folder", prompt=text,
                                     negative_prompt="", **SMALL_CALL)[0])
    original = reference(tiny_models, "lens", "text_encoder_folder", prompt=text, negative_prompt="", **SMALL_CALL)[0]
    assert np.abs(got - original).mean() < 2.0, np.abs(got - original).mean()


def test_gguf_workflow_same_pixels_as_lens_core(server, tiny_models):
    """lens_t2i_gguf (a lens-quantize MMDiT, a llama.cpp GPT-OSS GGUF with Q8_0 weights and MXFP4
    experts) = lens_core on the same two files."""
    prompt = with_tiny_models(workflow("lens_t2i_gguf"), LensResolution={"mode": "custom", "width": 96, "height": 64},
                              LensSampler={"steps": 4})
    got = pixels(server.images(run_ok(server, prompt))[0])
    want = reference(tiny_models, "lens_gguf_q4", "text_encoder_gguf_q8", negative_prompt="",
                     prompt=node_of(prompt, "LensTextEncode")["inputs"]["prompt"], **SMALL_CALL)[0]
    assert_same_image(got, want)


@pytest.mark.parametrize(("unet_name", "key"), [
    ("lens_tiny-Q8_0.gguf", "lens_gguf_q8"),
    *((COMFY_QUANT_FILES[q], f"lens_{q}") for q in ("fp8_scaled", "mxfp8", "nvfp4")),
])
def test_loras_on_a_packed_model(server, tiny_models, unet_name, key):
    """Lens LoRA Loader and the stock LoraLoaderModelOnly on a packed MODEL (a Q8_0 GGUF; scaled fp8,
    comfy_quant mxfp8 and nvfp4 safetensors): the packed layers apply ComfyUI's patches at each call,
    = lens_core with the LoRA on the same file (which differs from the image without it, so an
    ignored LoRA fails); the next run without a LoRA is the plain packed model again. The LoRA is
    the one of the other LoRA tests, zero-padded where the file pads the matrices (see fit_lora)."""
    packed = {"LensModelLoader": {"unet_name": unet_name}}
    text = node_of(_small_prompt(), "LensTextEncode")["inputs"]["prompt"]
    call = dict(prompt=text, negative_prompt="", **SMALL_CALL)
    lens_lora, stock_lora = (fit_lora(tiny_models["loras"][name], tiny_models[key], server.models / "loras")
                             for name in ("lens_lora_tiny.safetensors", "lens_lora_comfy_ab.safetensors"))
    want = reference(tiny_models, key, "text_encoder_folder", loras=[(lens_lora, 0.8)], **call)[0]
    plain = reference(tiny_models, key, "text_encoder_folder", **call)[0]
    assert np.abs(want - plain).max() > 20, "the test LoRA should change the image"

    lens = _lora_prompt(LensLoraLoader={"lora_name": lens_lora.name, "strength": 0.8}, **packed)
    assert_same_image(pixels(server.images(run_ok(server, lens))[0]), want)
    stock = _lora_prompt(**packed)
    lora_id = next(k for k, n in stock.items() if n["class_type"] == "LensLoraLoader")
    stock[lora_id] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": stock[lora_id]["inputs"]["model"], "lora_name": stock_lora.name, "strength_model": 0.8}}
    assert_same_image(pixels(server.images(run_ok(server, stock))[0]), want)
    assert_same_image(pixels(server.images(run_ok(server, _small_prompt(**packed)))[0]), plain)


# -- fp8 and ComfyUI quantised safetensors ------------------------------------------------------------


def loader_log_line(server: ComfyServer, file_name: str) -> str:
    """The Lens Model Loader's last log line for the MMDiT file ``file_name``."""
    lines = [line for line in server.log_path.read_text(errors="replace").splitlines()
             if "Lens MMDiT " in line and f"/{file_name}:" in line]
    assert lines, f"the Lens Model Loader logged no load of {file_name}"
    return lines[-1]


@pytest.mark.parametrize("qtype", list(COMFY_QUANT_FILES))
def test_fp8_and_comfy_quant_mmdit_same_pixels_as_lens_core(server, tiny_models, qtype):
    """fp8, scaled fp8 and ComfyUI's comfy_quant mxfp8/nvfp4 MMDiTs (lens-quantize) load in the Lens Model
    Loader = lens_core's pixels for the same file; every layer the file packs stays packed (the
    loader logs how many layers hold each packed format)."""
    from lens_core.loading import open_mmdit

    name = COMFY_QUANT_FILES[qtype]
    prompt = _small_prompt(LensModelLoader={"unet_name": name})
    got = pixels(server.images(run_ok(server, prompt))[0])
    want = reference(tiny_models, f"lens_{qtype}", "text_encoder_folder", negative_prompt="",
                     prompt=node_of(prompt, "LensTextEncode")["inputs"]["prompt"], **SMALL_CALL)[0]
    assert_same_image(got, want)
    source, _ = open_mmdit(tiny_models[f"lens_{qtype}"])
    assert source.packed_names, "the file should hold packed layers"
    assert f"packed layers: {len(source.packed_names)} {PACKED_FORMAT[qtype]}, compute" in loader_log_line(server, name)


def test_fast_fp8_matrix_mult_switches_packed_fp8_layers_to_fp8_matmul(server, tmp_path):
    """ComfyUI started with ``--fast fp8_matrix_mult`` (its fp8-matmul switch): the Lens Model Loader turns
    fp8 matmuls on for a scaled-fp8 MMDiT and says so. This CPU server has no fp8 kernel, so the layers
    keep decoding and the image is the one the server without the flag makes."""
    name = COMFY_QUANT_FILES["fp8_scaled"]
    prompt = _small_prompt(LensModelLoader={"unet_name": name})
    plain = pixels(server.images(run_ok(server, prompt))[0])
    assert "fp8 matmul" not in loader_log_line(server, name)
    fast = ComfyServer(server.comfy_root, tmp_path / "base", server.python, ["--fast", "fp8_matrix_mult"])
    for item in (server.models / "diffusion_models").iterdir():
        (fast.models / "diffusion_models" / item.name).symlink_to(item.resolve())
    for sub in ("text_encoders", "vae"):
        for item in (server.models / sub).iterdir():
            (fast.models / sub / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    with fast:
        got = pixels(fast.images(run_ok(fast, prompt))[0])
        assert "fp8 matmul where supported" in loader_log_line(fast, name)
    np.testing.assert_array_equal(got, plain)


def test_plain_float_mmdit_keeps_comfyuis_own_loading(server):
    """A plain float safetensors MMDiT still takes ComfyUI's native loading (comfy.ops layers, its weight
    dtype), not the packed path."""
    run_ok(server, _small_prompt())
    line = loader_log_line(server, TINY["lens_bf16.safetensors"])
    assert "packed" not in line and "weights torch.float32" in line, line


# -- aspect ratios ----------------------------------------------------------------------------------


def test_aspect_batch_workflow_same_pixels_as_lens_core(server, tiny_models):
    """lens_t2i_aspect_batch: one image per Lens Resolution bucket, each lens_core's image at that size."""
    prompt = with_tiny_models(workflow("lens_t2i_aspect_batch"), LensSampler={"steps": 2})
    entry = run_ok(server, prompt)
    text = node_of(prompt, "LensTextEncode")["inputs"]["prompt"]
    sizes = set()
    for nid, node in prompt.items():
        if node["class_type"] != "SaveImage":
            continue
        decode = prompt[node["inputs"]["images"][0]]
        sampler = prompt[decode["inputs"]["samples"][0]]["inputs"]
        resolution = prompt[sampler["latent"][0]]["inputs"]
        width, height = resolution_size(resolution)
        [image] = [server.output / i["subfolder"] / i["filename"] for i in entry["outputs"][nid]["images"]]
        got = pixels(image)
        assert got.shape == (height, width, 3), resolution["aspect_ratio"]
        want = reference(tiny_models, "lens", "text_encoder_folder", prompt=text, negative_prompt="", steps=2,
                         cfg=sampler["cfg"], width=width, height=height, seed=sampler["seed"])[0]
        assert_same_image(got, want)
        sizes.add((width, height))
    assert len(sizes) == 3


# -- the built-in Lens-Toy ---------------------------------------------------------------------------


def test_lens_toy_workflow_runs_with_no_model_files(bare_server):
    """lens_toy_t2i as shipped, on a ComfyUI with empty model folders: a 128x128 image, pixel for pixel
    lens_core's LensPipeline's with its default model for the same prompt, seed, steps and cfg."""
    info = bare_server.get("/object_info")
    for node, name in (("LensModelLoader", "unet_name"), ("LensTextEncoderLoader", "text_encoder_name"),
                       ("LensVAELoader", "vae_name")):
        assert combo_options(info, node, name) == [BUILTIN], node
    assert not any(p.is_file() for p in bare_server.models.rglob("*"))
    prompt = workflow("lens_toy_t2i")
    validate_against_object_info(prompt, info)
    [image] = bare_server.images(run_ok(bare_server, prompt))
    got = pixels(image)
    assert got.shape == (128, 128, 3)
    assert_pixel_for_pixel(got, lens_toy_reference(prompt))


def test_lens_toy_aspect_ratio_buckets(bare_server):
    """The toy base with 16:9: Lens' 1024 bucket scaled to 128 (176x96), lens_core's image at that size."""
    prompt = copy.deepcopy(workflow("lens_toy_t2i"))
    node_of(prompt, "LensResolution")["inputs"]["aspect_ratio"] = "16:9 (landscape)"
    node_of(prompt, "LensSampler")["inputs"]["steps"] = 4
    [image] = bare_server.images(run_ok(bare_server, prompt))
    got = pixels(image)
    assert got.shape == (96, 176, 3)
    assert_pixel_for_pixel(got, lens_toy_reference(prompt))


@pytest.mark.parametrize(("node", "name", "value"), [
    ("LensModelLoader", "unet_name", "../../../lens_core/default_model/transformer/diffusion_pytorch_model.safetensors"),
    ("LensModelLoader", "unet_name", f"{BUILTIN}/../transformer"),
    ("LensTextEncoderLoader", "text_encoder_name", f"{BUILTIN}/"),
    ("LensVAELoader", "vae_name", "/etc/passwd"),
])
def test_names_other_than_the_listed_ones_are_rejected(bare_server, node, name, value):
    """Only listed names pass validation: the built-in entry is a fixed name, not a path to extend."""
    prompt = workflow("lens_toy_t2i")
    node_of(prompt, node)["inputs"][name] = value
    status, body = bare_server.post("/prompt", {"prompt": prompt})
    assert status == 400
    errors = json.dumps(body.get("node_errors", {}))
    assert name in errors and node in errors, errors


# -- native Lens interop ----------------------------------------------------------------------------


def test_native_lens_clip_conditioning_with_lens_model(server, tiny_models):
    """ComfyUI's own Lens text encoder (the CLIPLoader type=lens code path, see
    tests/comfy_native_clip_node.py for why a test node loads it) and the stock CLIP Text Encode
    condition the Lens Model Loader's MODEL: lens_core's pixels for the same encoder weights."""
    if not (server.comfy_root / "comfy" / "text_encoders" / "gpt_oss.py").is_file():
        pytest.skip(f"ComfyUI {server.version} has no native Lens text encoder")
    prompt = _small_prompt()
    loader = next(k for k, n in prompt.items() if n["class_type"] == "LensTextEncoderLoader")
    text = node_of(prompt, "LensTextEncode")["inputs"]["prompt"]
    for nid, node in prompt.items():
        if node["class_type"] == "LensTextEncode":
            prompt[nid] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [loader, 0], "text": node["inputs"]["prompt"]}}

    # The stock loader builds the 20B-sized model whatever the file holds (when this changes, use it here).
    prompt[loader] = {"class_type": "CLIPLoader", "inputs": {"clip_name": NATIVE_ENCODER, "type": "lens"}}
    errors = [m[1] for m in server.run(prompt)["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "size mismatch for embed_tokens.weight" in errors[0]["exception_message"], errors

    prompt[loader] = {"class_type": "LensTestNativeLensCLIPLoader", "inputs": {"clip_name": NATIVE_ENCODER}}
    got = pixels(server.images(run_ok(server, prompt))[0])
    want = reference(tiny_models, "lens", "text_encoder_folder", prompt=text, negative_prompt="", **SMALL_CALL)[0]
    assert_same_image(got, want)


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


def test_reasoner_text_display_is_served_to_the_frontend(server):
    """web/lens_reasoner.js (the refined prompt drawn inside the Lens Reasoner node) is registered."""
    assert f"/extensions/{EXTENSION_NAME}/lens_reasoner.js" in server.get("/extensions")


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
