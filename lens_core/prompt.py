"""Turn prompts into the token batches and text-feature layout the Lens MMDiT was trained on.

Lens wraps every prompt in a fixed GPT-OSS harmony conversation, encodes it, and keeps only the
encoder features after the fixed 97-token prefix (system + developer blocks + the user-turn
header). The helpers here do everything around the encoder call: rendering, tokenising, padding,
dropping the prefix, the empty negative prompt, and padding cond/uncond to a common length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tokenizer import Tokenizer

TEXT_OFFSET = 97  # tokens of the rendered prefix, through "<|start|>user<|message|>"
MAX_TOKENS = 512  # the reference truncates the rendered prompt (prefix included) to this

# The gpt-oss chat template fills "Current date" from the clock; Lens fixes the date it was
# released with so that the same prompt always gives the same tokens.
_SYSTEM = (
    "You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n"
    "Current date: 2026-05-23\n\n"
    "Reasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
)
_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background."
)
_ANALYSIS = "Need to generate one image according to the description."


def render_prompt(prompt: str) -> str:
    """The harmony conversation Lens encodes for ``prompt``.

    Equal to gpt-oss's chat template applied to [system: instruction, user: prompt,
    assistant: analysis + empty final] with add_generation_prompt=False, cut at the first
    ``<|return|>`` as the reference pipeline does (the instruction, given as a system message,
    becomes the template's developer block). The prompt is not stripped or escaped.
    """
    rendered = (
        f"<|start|>system<|message|>{_SYSTEM}<|end|>"
        f"<|start|>developer<|message|># Instructions\n\n{_INSTRUCTION}\n\n<|end|>"
        f"<|start|>user<|message|>{prompt}<|end|>"
        f"<|start|>assistant<|channel|>analysis<|message|>{_ANALYSIS}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|><|return|>"
    )
    return rendered.split("<|return|>", 1)[0]


def tokenize_prompts(
    prompts: Sequence[str], tokenizer: Tokenizer, max_length: int = MAX_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render, tokenise, truncate to ``max_length`` and right-pad with the pad id (199999).

    Returns ``(ids, mask)``: int64 ``[B, S]`` and bool ``[B, S]`` (True on real tokens), with S
    the longest row after truncation.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("tokenize_prompts expects a non-empty sequence of prompt strings")
    rows = [tokenizer.encode(render_prompt(p))[:max_length] for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def split_features(
    layer_feats: Sequence[torch.Tensor], mask: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Drop the fixed 97-token prefix: ``[B, S, D]`` features -> ``[B, S-97, D]``, mask likewise.

    The MMDiT only ever saw the tokens after ``<|start|>user<|message|>``.
    """
    return [f[:, TEXT_OFFSET:] for f in layer_feats], mask[:, TEXT_OFFSET:]


def empty_features(
    like_feats: Sequence[torch.Tensor], like_mask: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The empty negative prompt: zero features with an all-False mask, shaped like the positive.

    Lens does not encode an empty string for the unconditional branch; it attends to no text.
    """
    return [torch.zeros_like(f) for f in like_feats], torch.zeros_like(like_mask, dtype=torch.bool)


def pad_to_length(
    feats: Sequence[torch.Tensor], mask: torch.Tensor, length: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Right-pad ``[B, S, D]`` features with zeros and the ``[B, S]`` mask with False to ``length``.

    Lets cond and uncond of different lengths share one ``[2B, length, D]`` batch; padded tokens
    are masked out, so they change nothing.
    """
    extra = length - mask.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad text of {mask.shape[1]} tokens to the shorter length {length}")
    padded = [torch.nn.functional.pad(f, (0, 0, 0, extra)) for f in feats]
    return padded, torch.nn.functional.pad(mask.bool(), (0, extra), value=False)
