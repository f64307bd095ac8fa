"""The shipped workflows agree with each other, no ComfyUI needed.

``workflows/api/X.json`` (the prompt format POST /prompt takes) and ``workflows/ui/X.json`` (what
the ComfyUI frontend saves) must describe the same graph: node ids and types, widget values,
links. ``example_workflows/`` (ComfyUI's template folder for custom nodes) holds copies of the
UI graphs. The server tests in ``test_nodes_comfyui.py`` check both formats against /object_info.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
API = REPO / "workflows" / "api"
UI = REPO / "workflows" / "ui"
EXAMPLES = REPO / "example_workflows"
NAMES = sorted(p.stem for p in API.glob("*.json"))
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# File names as the public repositories name them (the text encoder as the openai/gpt-oss-20b folder, the
# GGUF encoder as unsloth/gpt-oss-20b-GGUF names it); lens-Q4_K.gguf is what `lens-quantize` is told to write.
PUBLIC_FILES = {"lens_bf16.safetensors", "lens_turbo_bf16.safetensors", "gpt-oss-20b/", "flux2-vae.safetensors",
                "lens-Q4_K.gguf", "gpt-oss-20b-Q4_K_M.gguf"}
BUILTIN = "lens-toy (built-in)"  # the loaders' entry for Lens-Toy, which ships in lens_core/default_model
LOADER_INPUTS = ("unet_name", "text_encoder_name", "vae_name")


def load(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


def ui_widgets(node: dict) -> dict:
    """Widget name -> value of a UI node: widget inputs in order, control_after_generate values skipped."""
    names = [i["widget"]["name"] for i in node.get("inputs", []) if i.get("widget")]
    values = list(node.get("widgets_values", []))
    out, k = {}, 0
    for name in names:
        out[name] = values[k]
        k += 1
        if k < len(values) and name.endswith("seed") and values[k] in CONTROL_VALUES:
            k += 1
    assert k == len(values), f"node {node['id']} ({node['type']}): {len(values) - k} widget value(s) without a name"
    return out


def test_the_expected_workflows_exist():
    assert {"lens_t2i", "lens_turbo_t2i", "lens_t2i_lora", "lens_t2i_reasoner", "lens_t2i_gguf",
            "lens_t2i_aspect_batch", "lens_toy_t2i"} <= set(NAMES)
    assert sorted(p.stem for p in UI.glob("*.json")) == NAMES


def test_no_json_directly_in_workflows():
    """ComfyUI lists every *.json in a custom node's workflows/ folder as a template; keep the two
    formats in subfolders so only example_workflows/ is listed."""
    assert not list((REPO / "workflows").glob("*.json"))


@pytest.mark.parametrize("name", NAMES)
def test_example_workflows_are_the_ui_graphs(name):
    assert (EXAMPLES / f"{name}.json").read_bytes() == (UI / f"{name}.json").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_describe_the_same_graph(name):
    api, ui = load(API, name), load(UI, name)
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(nodes) == set(api)
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"]), "duplicate link ids"
    assert ui["last_node_id"] >= max(int(i) for i in nodes) and ui["last_link_id"] >= max(links, default=0)
    for nid, node in nodes.items():
        entry = api[nid]
        assert node["type"] == entry["class_type"], nid
        # A widget turned into a socket (e.g. Lens Text Encode's prompt fed by the Lens Reasoner) keeps a
        # value in widgets_values, but the API format carries only its link.
        fed = {i["name"] for i in node.get("inputs", []) if i.get("widget") and i.get("link") is not None}
        widgets = {k: v for k, v in ui_widgets(node).items() if k not in fed}
        sockets = {i["name"]: i for i in node.get("inputs", []) if not i.get("widget") or i["name"] in fed}
        api_links = {k: v for k, v in entry["inputs"].items() if isinstance(v, list)}
        api_values = {k: v for k, v in entry["inputs"].items() if not isinstance(v, list)}
        assert widgets == api_values, f"node {nid} ({node['type']})"
        linked = {k: s for k, s in sockets.items() if s.get("link") is not None}
        assert set(linked) == set(api_links), f"node {nid}: linked inputs differ"
        for inp, sock in linked.items():
            link_id, src, src_slot, dst, dst_slot, typ = links[sock["link"]]
            assert [str(src), src_slot] == api_links[inp], f"node {nid} input {inp}"
            assert dst == node["id"] and node["inputs"][dst_slot]["name"] == inp
            assert sock["type"] in (typ, "*")  # "*": an any-type input (Preview as Text)
            assert link_id in nodes[str(src)]["outputs"][src_slot]["links"]
            assert nodes[str(src)]["outputs"][src_slot]["type"] == typ
    used = {link[0] for link in ui["links"]}
    listed = {lid for n in ui["nodes"] for o in n.get("outputs", []) for lid in o.get("links") or []}
    assert listed == used, "output link lists and the links table disagree"


@pytest.mark.parametrize("name", NAMES)
def test_workflows_use_the_public_file_names(name):
    """Each workflow names public files, or only the built-in Lens-Toy (a model from one and a VAE from
    the other would not fit together)."""
    api = load(API, name)
    names = {v for n in api.values() for k, v in n["inputs"].items() if k in LOADER_INPUTS}
    assert names and (names <= PUBLIC_FILES or names == {BUILTIN}), names


def test_presets_in_the_sampler_workflows():
    sampler = next(n for n in load(API, "lens_t2i").values() if n["class_type"] == "LensSampler")["inputs"]
    assert (sampler["preset"], sampler["steps"], sampler["cfg"]) == ("lens", 20, 5.0)
    sampler = next(n for n in load(API, "lens_turbo_t2i").values() if n["class_type"] == "LensSampler")["inputs"]
    assert (sampler["preset"], sampler["steps"], sampler["cfg"]) == ("turbo", 4, 1.0)
    loader = next(n for n in load(API, "lens_turbo_t2i").values() if n["class_type"] == "LensModelLoader")["inputs"]
    assert loader["unet_name"] == "lens_turbo_bf16.safetensors"


def _of(api: dict, class_type: str) -> tuple[str, dict]:
    return next((k, n["inputs"]) for k, n in api.items() if n["class_type"] == class_type)


def test_lora_workflow_puts_the_lora_between_loader_and_sampler():
    api = load(API, "lens_t2i_lora")
    loader, _ = _of(api, "LensModelLoader")
    lora_id, lora = _of(api, "LensLoraLoader")
    _, sampler = _of(api, "LensSampler")
    assert lora["model"] == [loader, 0] and sampler["model"] == [lora_id, 0]
    assert lora["lora_name"].endswith(".safetensors") and lora["strength"] == 1.0
    assert _of(api, "LensModelLoader")[1]["unet_name"] == "lens_bf16.safetensors"  # LoRAs are trained on base Lens


def test_reasoner_workflow_feeds_the_refined_prompt_to_the_encoder():
    api = load(API, "lens_t2i_reasoner")
    clip_id, _ = _of(api, "LensTextEncoderLoader")
    reasoner_id, reasoner = _of(api, "LensReasoner")
    encoders = [n["inputs"] for n in api.values() if n["class_type"] == "LensTextEncode"]
    assert [e["prompt"] for e in encoders] == [[reasoner_id, 0], ""]  # positive refined, negative empty
    assert reasoner["clip"] == [clip_id, 0] and reasoner["mode"] == "local"
    assert _of(api, "PreviewAny")[1]["source"] == [reasoner_id, 0]
    # No endpoint and no key in a shipped workflow: only the NAME of the key's environment variable.
    assert reasoner["api_base_url"] == "" and reasoner["api_key_env"] == "OPENAI_API_KEY"
    assert reasoner["prompt"].strip() and reasoner["system_prompt"] == ""


def test_gguf_workflow_is_lens_t2i_with_gguf_files():
    api, t2i = load(API, "lens_t2i_gguf"), load(API, "lens_t2i")
    assert _of(api, "LensModelLoader")[1]["unet_name"] == "lens-Q4_K.gguf"
    assert _of(api, "LensTextEncoderLoader")[1]["text_encoder_name"] == "gpt-oss-20b-Q4_K_M.gguf"

    def without_file_names(graph: dict) -> dict:
        return {nid: (n["class_type"], {k: v for k, v in n["inputs"].items() if k not in ("unet_name", "text_encoder_name")})
                for nid, n in graph.items()}

    assert without_file_names(api) == without_file_names(t2i)


def test_aspect_batch_workflow_renders_one_prompt_at_several_ratios():
    api = load(API, "lens_t2i_aspect_batch")
    samplers = {nid: n["inputs"] for nid, n in api.items() if n["class_type"] == "LensSampler"}
    assert len(samplers) >= 3
    shared = ("model", "positive", "negative", "preset", "steps", "cfg", "seed")
    assert len({repr({k: s[k] for k in shared}) for s in samplers.values()}) == 1, "samplers differ beyond the size"
    ratios, prefixes = [], []
    for sid, sampler in samplers.items():
        resolution = api[sampler["latent"][0]]
        assert resolution["class_type"] == "LensResolution" and sampler["latent"][1] == 2
        assert resolution["inputs"]["mode"] == "bucket" and resolution["inputs"]["batch_size"] == 1
        ratios.append(resolution["inputs"]["aspect_ratio"])
        [decode] = [n for n in api.values() if n["class_type"] == "VAEDecode" and n["inputs"]["samples"] == [sid, 0]]
        decode_id = next(k for k, n in api.items() if n is decode)
        [save] = [n for n in api.values() if n["class_type"] == "SaveImage" and n["inputs"]["images"] == [decode_id, 0]]
        prefixes.append(save["inputs"]["filename_prefix"])
    assert len(set(ratios)) == len(ratios) and len(set(prefixes)) == len(prefixes)
    assert {"16:9 (landscape)", "1:1 (square)", "9:16 (portrait)"} <= set(ratios)


def test_lens_toy_workflow_needs_no_downloads():
    """lens_toy_t2i: the three loaders on the built-in Lens-Toy, its 128 base at 1:1, the lens preset
    with a fixed seed, and a ToyEval-style prompt (what Lens-Toy was trained on)."""
    api, ui = load(API, "lens_toy_t2i"), load(UI, "lens_toy_t2i")
    loaders = {n["class_type"]: n["inputs"] for n in api.values() if any(k in n["inputs"] for k in LOADER_INPUTS)}
    assert {c: next(v for k, v in i.items() if k in LOADER_INPUTS) for c, i in loaders.items()} == {
        "LensModelLoader": BUILTIN, "LensTextEncoderLoader": BUILTIN, "LensVAELoader": BUILTIN}
    _, resolution = _of(api, "LensResolution")
    assert (resolution["mode"], resolution["base_resolution"], resolution["aspect_ratio"]) == (
        "bucket", "128 (Lens-Toy)", "1:1 (square)")
    _, sampler = _of(api, "LensSampler")
    assert (sampler["preset"], sampler["steps"], sampler["cfg"]) == ("lens", 20, 5.0)
    [ui_sampler] = [n for n in ui["nodes"] if n["type"] == "LensSampler"]
    assert ui_sampler["widgets_values"][-1] == "fixed"
    assert api[sampler["positive"][0]]["inputs"]["prompt"].startswith("a photo of ")
    assert sorted(n["class_type"] for n in api.values()) == sorted(
        ["LensModelLoader", "LensTextEncoderLoader", "LensVAELoader", "LensTextEncode", "LensTextEncode",
         "LensResolution", "LensSampler", "VAEDecode", "SaveImage"])
