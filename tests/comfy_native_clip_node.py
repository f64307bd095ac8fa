"""Test-only ComfyUI node (linked into the test server's custom_nodes): ComfyUI's own Lens text
encoder, loaded the way the stock CLIPLoader(type="lens") loads it, at the size of a tiny file.

ComfyUI builds its GPT-OSS encoder at the fixed GPT-OSS-20B size (``GptOss20BConfig`` in
``comfy/text_encoders/gpt_oss.py``: 2880 wide, 24 layers, 32 experts, 201088 tokens); nothing in the
file changes it and CLIPLoader has no input for it, so a tiny encoder fails there with size
mismatches. This node makes the same ``comfy.sd.load_clip`` call as CLIPLoader with
``clip_type=LENS``, adding only ``model_options["gpt_oss_config"]`` (read by ComfyUI's
``LensGptOssClipModel``), taken from the file's ``gpt_oss_config`` metadata, and fp32 weights (what
``--fp32-text-enc`` gives: ComfyUI's CPU default, fp16, moves a random tiny encoder's features by
up to 10%, which is a precision question, not an interop one). Tokenizer, prompt template, model
code and conditioning are ComfyUI's own.
"""

import json

import comfy.sd
import folder_paths
import torch
from safetensors import safe_open


class LensTestNativeLensCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "testing"

    def load_clip(self, clip_name):
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        with safe_open(path, framework="pt") as f:
            size = json.loads(f.metadata()["gpt_oss_config"])
        clip = comfy.sd.load_clip(ckpt_paths=[path], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                  clip_type=comfy.sd.CLIPType.LENS, model_options={"gpt_oss_config": size, "dtype": torch.float32})
        return (clip,)


NODE_CLASS_MAPPINGS = {"LensTestNativeLensCLIPLoader": LensTestNativeLensCLIPLoader}
