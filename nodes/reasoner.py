"""The prompt reasoner inside ComfyUI: lens_core's :func:`~lens_core.reasoner.refine` with the Lens CLIP.

``local`` mode generates with the GPT-OSS weights the Lens Text Encoder Loader already holds (the
CLIP's encoder, loaded by ComfyUI's model management); only the LM head, the final norm and any
layers past the last feature layer are read from the encoder's checkpoint, once per encoder.
Generation checks ComfyUI's interrupt after every token and reports progress. ``api`` mode calls an
OpenAI-compatible server; the key is read from the environment variable the node names.
Rewrites are cached by lens_core's LRU (prompt, seed, sampling settings, model, system prompt).
"""

from __future__ import annotations

import logging
import weakref

import comfy.model_management
import comfy.utils
import torch

from lens_core.reasoner import LocalReasoner, ReasonerError, ReasonerSettings, RefinedPrompt, refine

from .text import LensClip

log = logging.getLogger("ComfyUI-Lens")


class ComfyLocalReasoner(LocalReasoner):
    """LocalReasoner that stops on ComfyUI's interrupt and drives the node's progress bar."""

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, stop=None,
                 prefill_chunk=512):
        mm = comfy.model_management
        bar = comfy.utils.ProgressBar(max_new_tokens)
        count = 0

        def check(token: int) -> bool:
            nonlocal count
            count += 1
            bar.update_absolute(count, max_new_tokens)
            mm.throw_exception_if_processing_interrupted()  # a BaseException: refine does not swallow it
            return bool(stop(token)) if stop is not None else False

        mm.throw_exception_if_processing_interrupted()
        return super().generate(prompt_ids, max_new_tokens, temperature, top_p, seed, check, prefill_chunk)


# One reasoner per loaded encoder, so the LM head is read once; detached (no reference to the
# encoder) between runs, so ComfyUI can still free the encoder.
_LOCAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach_local(clip) -> ComfyLocalReasoner:
    """The local reasoner on ``clip``'s encoder, with the encoder loaded on its device.

    Call :func:`release_local` when done.
    """
    if not isinstance(clip, LensClip):
        raise ReasonerError(
            "Lens Reasoner mode 'local' needs the clip input connected to a Lens Text Encoder Loader "
            f"(got {type(clip).__name__ if clip is not None else 'nothing'}); or use mode 'api'"
        )
    if clip.path is None:
        raise ReasonerError("Lens Reasoner mode 'local': this Lens CLIP does not know its checkpoint file")
    clip.load_model()
    encoder = clip.encoder
    reasoner = _LOCAL.get(encoder)
    if reasoner is None:
        reasoner = _LOCAL[encoder] = ComfyLocalReasoner(encoder, clip.path, clip.tokenizer)
    else:
        reasoner.attach(encoder)
    return reasoner


def release_local(clip, reasoner: ComfyLocalReasoner) -> None:
    """Forget the encoder; the LM head goes where ComfyUI parks the encoder."""
    patcher = clip.patcher
    reasoner.detach(patcher.offload_device if patcher.offload_device != patcher.load_device else None)


def refine_prompt(prompt: str, settings: ReasonerSettings, clip=None) -> RefinedPrompt:
    """One prompt through the reasoner (``settings.mode`` off / local / api)."""
    if settings.mode != "local" or not prompt.strip():
        return refine([prompt], settings)[0]
    try:
        reasoner = attach_local(clip)
    except ReasonerError as e:  # no usable CLIP: the node's on_error decides
        if settings.on_error == "fail":
            raise
        log.warning("Lens Reasoner fell back to the prompt: %s", e)
        return RefinedPrompt(prompt, prompt, settings.mode, True, (str(e),))
    try:
        with torch.inference_mode():
            return refine([prompt], settings, reasoner)[0]
    finally:
        release_local(clip, reasoner)


def preview_text(result: RefinedPrompt) -> str:
    """What the node shows: the text it outputs, plus why it fell back (never a key: lens_core redacts)."""
    if result.fell_back:
        return f"{result.text}\n\n[reasoner fell back to the prompt: {'; '.join(result.warnings)}]"
    return result.text
