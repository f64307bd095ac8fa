// Shows the Lens Reasoner's refined prompt inside the node. The node already returns the text to
// the UI (ui.PreviewText), but the frontend draws such text only for its own "Preview as Text" and
// "Save Text" nodes; this gives the Lens Reasoner the same text preview widget, through the API the
// frontend exports for it (window.comfyAPI.textPreviewWidgets). Older frontends (ComfyUI 0.22
// pins 1.43, which lacks that API) get a read-only multiline text widget of the same name instead,
// made with the frontend's own STRING widget factory. Frontends with neither are left as they are.
import { app } from "../../scripts/app.js";

const PREVIEW = "preview_text";

// The fallback preview: a read-only, never-saved multiline text widget named like the frontend's.
const fallbackPreview = (factories) => ({
  addTextPreviewWidgets(node) {
    const widget = factories.STRING(node, PREVIEW, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;
    widget.options.serialize = false;
    widget.options.read_only = true;
    if (widget.element) widget.element.readOnly = true;
  },
  updateTextPreviewWidgets(node, output) {
    const widget = node.widgets?.find((w) => w.name === PREVIEW);
    const text = output?.text;
    if (widget && text !== undefined) widget.value = Array.isArray(text) ? text.join("\n\n") : String(text);
  },
});

function previewApi() {
  const api = window.comfyAPI;
  if (api?.textPreviewWidgets?.addTextPreviewWidgets) return api.textPreviewWidgets;
  const factories = api?.widgets?.ComfyWidgets;
  return factories?.STRING ? fallbackPreview(factories) : null;
}

app.registerExtension({
  name: "ComfyUI-Lens.ReasonerText",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LensReasoner") return;
    const preview = previewApi();
    if (!preview) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      preview.addTextPreviewWidgets(this);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      preview.updateTextPreviewWidgets(this, output);
    };
  },
});
