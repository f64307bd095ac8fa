// Shows the Lens Reasoner's refined prompt inside the node. The node already returns the text to
// the UI (ui.PreviewText), but the frontend draws such text only for its own "Preview as Text" and
// "Save Text" nodes; this gives the Lens Reasoner the same text preview widget, through the API the
// frontend exports for it (window.comfyAPI.textPreviewWidgets). Frontends without that API are left
// as they are.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "ComfyUI-Lens.ReasonerText",
  beforeRegisterNodeDef(nodeType, nodeData) {
    const preview = window.comfyAPI?.textPreviewWidgets;
    if (nodeData.name !== "LensReasoner" || !preview?.addTextPreviewWidgets) return;
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
