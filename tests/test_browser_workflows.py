"""Each UI workflow in a real browser, used as an artist uses it.

Headless Chromium opens ComfyUI's own frontend, loads every ``workflows/ui/*.json`` with
``app.loadGraphData`` (what dropping the file on the canvas does), checks that the frontend knows
every node type and flags no node (missing node types become placeholder nodes, missing model files
red nodes), queues it with ``app.queuePrompt`` (what the Run button calls) and waits until
``/history`` has the images and every Save/Preview Image node shows them, and each Lens Reasoner
its rewritten prompt (the text preview widget of ``web/lens_reasoner.js``).

Model names are mapped to the tiny stand-ins of ``test_nodes_comfyui`` before loading; in the page,
sizes and steps are then made small through the nodes' widgets, and the Lens Reasoner is pointed
at a local chat-completions server. One ComfyUI server per checkout found (see
``comfy_server.py``), one browser for all. Skipped, saying why, without a ComfyUI checkout, without
the ``browser`` extra (Playwright) or without Chromium (``$LENS_CHROMIUM``, else the Debian
``chromium`` at /usr/bin/chromium; Playwright's own browser downloads are not used).

README screenshots: ``LENS_SCREENSHOT_DIR=docs/screenshots COMFYUI_PATH=~/ComfyUI pytest
tests/test_browser_workflows.py`` also saves ``<workflow>.png``, the canvas once its images are
shown (the workflows' own steps then, and 384-pixel images so that they read in the picture).
"""

from __future__ import annotations

import copy
import io
import json
import operator
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from . import test_nodes_comfyui as node_tests
from .test_nodes_comfyui import REFINED, TINY, resolution_size
from .test_reasoner_api import KEY_ENV, ChatServer, ok_reply

# The node tests' fixtures: tiny models, and one server per ComfyUI checkout (module scope: for this module).
server = node_tests.server
tiny_models = node_tests.tiny_models

REPO = Path(__file__).resolve().parents[1]
UI_WORKFLOWS = sorted((REPO / "workflows" / "ui").glob("*.json"))
CHROMIUM = Path(os.environ.get("LENS_CHROMIUM", "/usr/bin/chromium"))
# Flags for a closed network: no sandbox (containers), no GPU, nothing fetched in the background.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
SCREENSHOT_DIR = os.environ.get("LENS_SCREENSHOT_DIR")
# Long side of the generated images (aspect ratios kept), and steps (screenshots: the workflows' own).
# Screenshot images stay small too: the frontend gives up on an image that takes 8 s to load, which
# a 1024x1024 noise PNG can while a starved CPU computes the next branch.
LONG_SIDE = 384 if SCREENSHOT_DIR else 128
MAX_STEPS = 4
OUTPUT_NODES = ("SaveImage", "PreviewImage")

READY_JS = """() => Boolean(window.app?.vueAppReady && window.app.canvas?.graph
                         && Object.keys(window.LiteGraph?.registered_node_types ?? {}).length)"""
# Returns the node types the frontend does not know, or, once loaded, the nodes' state and widgets.
LOAD_JS = """async ([graph, name]) => {
  const missing = [...new Set(graph.nodes.map(n => n.type))].filter(t => !(t in LiteGraph.registered_node_types));
  if (missing.length) return {missing};
  await app.loadGraphData(graph, true, true, name);
  const nodes = app.canvas.graph.nodes;
  return {
    missing: nodes.filter(n => n.last_serialization).map(n => n.type),
    flagged: nodes.filter(n => n.has_errors).map(n => `${n.id} ${n.type}`),
    dialogs: [...document.querySelectorAll('[role=dialog]')].filter(d => d.getClientRects().length)
                                                             .map(d => d.innerText.slice(0, 500)),
    widgets: Object.fromEntries(nodes.map(n => [n.id, {type: n.type,
      values: Object.fromEntries((n.widgets ?? []).map(w => [w.name, w.value]))}])),
  };
}"""
SET_WIDGETS_JS = """(settings) => {
  for (const [id, values] of Object.entries(settings)) {
    const node = app.canvas.graph.getNodeById(Number(id));
    for (const [name, value] of Object.entries(values)) {
      const widget = node.widgets?.find(w => w.name === name);
      if (!widget) throw new Error(`node ${id} (${node.type}) has no widget ${name}`);
      widget.value = value;
      widget.callback?.(value, app.canvas, node);
    }
  }
  app.canvas.setDirty(true, true);
}"""
CLOSE_JS = """async () => {
  const workflows = app.extensionManager.workflow;
  if (workflows.activeWorkflow) await workflows.closeWorkflow(workflows.activeWorkflow);
}"""
# Fit the graph to the canvas (an animation: wait until the scale holds still), then zoom in a
# little, as the fit leaves wide margins.
FIT_JS = """async () => {
  const ds = app.canvas.ds, frame = () => new Promise(r => requestAnimationFrame(r));
  await app.extensionManager.command.execute('Comfy.Canvas.FitView');
  for (let still = 0, last = ds.scale, n = 0; still < 10 && n < 300; n++) {
    await frame();
    still = ds.scale === last ? still + 1 : 0;
    last = ds.scale;
  }
  ds.changeScale(ds.scale * 1.2);
  app.canvas.setDirty(true, true);
  await frame();
}"""
# node id -> file names of the images its node shows (fully loaded ones only).
SHOWN_JS = """(ids) => Object.fromEntries(ids.map(id => {
  const imgs = app.canvas.graph.getNodeById(Number(id))?.imgs ?? [];
  return [id, imgs.filter(i => i.complete && i.naturalWidth > 0)
                  .map(i => new URL(i.src, location.href).searchParams.get('filename'))];
}))"""
# node id -> the text in its text preview widget (the frontend's, which web/lens_reasoner.js gives the
# Lens Reasoner), or null without one.
PREVIEW_TEXT_JS = """(ids) => Object.fromEntries(ids.map(id => [id,
  app.canvas.graph.getNodeById(Number(id))?.widgets?.find(w => w.name === 'preview_text')?.value ?? null]))"""


def _loud_skip(reason: str):
    warnings.warn(f"browser workflow tests SKIPPED: {reason}", stacklevel=2)
    pytest.skip(f"browser workflow tests SKIPPED: {reason}")


def tiny_graph(graph: dict) -> dict:
    """The UI graph with the public model file names replaced by the tiny stand-ins."""
    graph = copy.deepcopy(graph)
    for node in graph["nodes"]:
        node["widgets_values"] = [TINY.get(v, v) if isinstance(v, str) else v for v in node.get("widgets_values", [])]
    return graph


def quick_settings(widgets: dict, reasoner_url: str) -> dict:
    """Widget values (node id -> name -> value) that make each node quick on tiny models: images no
    larger than LONG_SIDE, of the same aspect ratio (smaller ones, such as Lens-Toy's, stay as they
    are), fewer steps (unless screenshots are asked for), the Lens Reasoner on the local chat server."""
    settings = {}
    for nid, node in widgets.items():
        values, new = node["values"], {}
        if "steps" in values and not SCREENSHOT_DIR:
            new["steps"] = min(values["steps"], MAX_STEPS)
        if node["type"] == "LensResolution":
            width, height = resolution_size(values)
            scale = LONG_SIDE / max(width, height)
            if scale < 1:
                new.update(mode="custom", **{k: max(16, round(v * scale / 16) * 16) for k, v in (("width", width), ("height", height))})
        if node["type"] == "LensReasoner":
            new.update(mode="api", api_base_url=reasoner_url, api_model="test-model", api_key_env=KEY_ENV)
        if new:
            settings[nid] = new
    return settings


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium, checked before any server starts so a machine without it skips at once."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _loud_skip("Playwright is not installed (pip install -e '.[browser]')")
    if not CHROMIUM.is_file():
        _loud_skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set LENS_CHROMIUM)")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    except Exception as e:
        playwright.stop()
        pytest.fail(f"Chromium at {CHROMIUM} did not start: {e}")
    try:
        yield chromium
    finally:
        chromium.close()
        playwright.stop()


@pytest.fixture(scope="module")
def reasoner_api():
    chat = ChatServer()
    chat.script = [ok_reply(REFINED)]
    yield chat
    chat.close()


@pytest.fixture(scope="module")
def page(browser, server):
    """ComfyUI's frontend, fresh profile, requests outside the server refused (closed network)."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url) else route.abort())
    settings = {"Comfy.TutorialCompleted": True}  # a returning user: no template browser over the canvas
    if SCREENSHOT_DIR:  # no minimap or frame statistics; node contents drawn also when zoomed out
        settings.update({"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                         "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.3})
    user = server.base / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    (user / "comfy.settings.json").write_text(json.dumps(settings), encoding="utf-8")
    page.goto(server.url)
    try:
        page.wait_for_function(READY_JS, timeout=180_000)
    except Exception as e:
        pytest.fail(f"ComfyUI {server.version}'s frontend did not start: {e}\npage errors: {page.errors}")
    yield page
    context.close()


def read_graph(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@contextmanager
def opened(page, graph: dict, name: str) -> Iterator[dict]:
    """The graph loaded as a user loads it (the loaded nodes' widgets), or a failure naming what is
    missing; its workflow tab is closed afterwards, so each test starts from the same page."""
    try:
        state = page.evaluate(LOAD_JS, [graph, name])
        assert not state["missing"], f"{name}: node types unknown to the frontend: {state['missing']}"
        assert not state["flagged"], f"{name}: the frontend flags nodes (missing model files?): {state['flagged']}"
        assert not state["dialogs"], f"{name}: dialogs open after loading: {state['dialogs']}"
        yield state["widgets"]
    finally:
        page.evaluate(CLOSE_JS)


def queue(page, server) -> str:
    """Queue the loaded workflow from the page; the prompt id, or a failure with ComfyUI's errors."""
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as answer:
        page.evaluate("() => app.queuePrompt(0, 1)")
    body = answer.value.json()
    assert answer.value.status == 200 and body.get("prompt_id"), f"ComfyUI rejected the prompt: {json.dumps(body)[:3000]}"
    return body["prompt_id"]


def wait_until_shown(page, script: str, expected: dict, shows: Callable[[Any, Any], bool], what: str,
                     timeout: float = 60.0) -> None:
    """Until ``shows(shown, expected)`` for each node, ``script`` reading node id -> what the node shows
    (the frontend updates the nodes from its websocket, after /history has the outputs)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = page.evaluate(script, list(expected))
        if all(shows(shown[nid], want) for nid, want in expected.items()):
            return
        assert time.monotonic() < deadline, f"{what} not shown in the nodes: expected {expected}, shown {shown}"
        time.sleep(0.25)


def reasoner_texts(widgets: dict, entry: dict) -> dict[str, str]:
    """Lens Reasoner node id -> its rewrite in /history, as a text preview widget shows it (a list
    of texts joined by blank lines)."""
    return {nid: "\n\n".join(entry["outputs"][nid]["text"]) for nid, node in widgets.items()
            if node["type"] == "LensReasoner"}


def save_screenshot(page, name: str, version: str) -> Path:
    """The canvas fitted to the graph, as a small palette PNG."""
    from lens_core.image_io import save_png

    page.evaluate(FIT_JS)
    with Image.open(io.BytesIO(page.screenshot())) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    return save_png(small, Path(SCREENSHOT_DIR) / f"{name}.png", {"workflow": name, "comfyui": version})


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_ui_workflow_runs_in_the_browser(server, page, reasoner_api, path):
    with opened(page, tiny_graph(read_graph(path)), path.stem) as widgets:
        settings = quick_settings(widgets, reasoner_api.url)
        page.evaluate(SET_WIDGETS_JS, settings)
        entry = server.wait(queue(page, server), timeout=300)
        status = entry["status"]
        assert status["status_str"] == "success", json.dumps(status["messages"], indent=1)[-3000:]

        outputs = [nid for nid, node in widgets.items() if node["type"] in OUTPUT_NODES]
        assert outputs, f"{path.name} has no Save/Preview Image node"
        expected = {nid: [img["filename"] for img in entry["outputs"].get(nid, {}).get("images", [])] for nid in outputs}
        assert all(expected.values()), f"/history has no image for some output nodes: {expected}"
        sizes = {resolution_size(node["values"] | settings.get(nid, {})) for nid, node in widgets.items()
                 if node["type"] == "LensResolution"}
        for file in server.images(entry) if sizes else []:
            with Image.open(file) as im:
                assert im.size in sizes, f"{file.name} is {im.size}, the Lens Resolution nodes say {sizes}"
        wait_until_shown(page, SHOWN_JS, expected, lambda shown, want: set(want) <= set(shown), "images")
        texts = reasoner_texts(widgets, entry)
        assert all(text == REFINED for text in texts.values()), f"the Lens Reasoner did not rewrite the prompt: {texts}"
        wait_until_shown(page, PREVIEW_TEXT_JS, texts, operator.eq, "the Lens Reasoner's rewrite")
        errors, page.errors[:] = list(page.errors), []
        assert not errors, f"errors in the page: {errors}"
        if SCREENSHOT_DIR:
            save_screenshot(page, path.stem, server.version)


def test_lens_toy_workflow_shows_lens_toys_image(server, page):
    """lens_toy_t2i as shipped (built-in models, its own size and steps): the image its Save Image node
    shows is the one lens_core's LensPipeline makes with its default model, Lens-Toy."""
    path = REPO / "workflows" / "ui" / "lens_toy_t2i.json"
    with opened(page, read_graph(path), path.stem) as widgets:
        entry = server.wait(queue(page, server), timeout=300)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"], indent=1)[-3000:]
        [file] = server.images(entry)
        want = node_tests.lens_toy_reference(node_tests.workflow(path.stem))
        node_tests.assert_pixel_for_pixel(node_tests.pixels(file), want)
        [save] = [nid for nid, node in widgets.items() if node["type"] == "SaveImage"]
        wait_until_shown(page, SHOWN_JS, {save: [file.name]}, lambda shown, want: set(want) <= set(shown), "images")


def test_missing_node_types_and_models_are_reported(page):
    """The checks above can fail: an unknown node type, and model files the server does not have."""
    graph = read_graph(REPO / "workflows" / "ui" / "lens_t2i.json")
    unknown = copy.deepcopy(graph)
    unknown["nodes"][0]["type"] = "LensNoSuchNode"
    with pytest.raises(AssertionError, match=r"unknown to the frontend: \['LensNoSuchNode'\]"), \
            opened(page, tiny_graph(unknown), "unknown-node"):
        pass
    with pytest.raises(AssertionError, match=r"flags nodes .*LensVAELoader"), opened(page, graph, "public-model-names"):
        pass
