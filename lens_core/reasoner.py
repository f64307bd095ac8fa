"""The Lens prompt reasoner: rewrite a short request into the dense caption style Lens was trained on.

Lens was trained on ~109-word captions; a three-word prompt leaves most of what the model expects
unsaid. The reasoner is an LLM placed in front of the text encoder that expands the request. Three
modes, chosen by :class:`ReasonerSettings.mode`:

* ``"off"`` (default): prompts pass through unchanged;
* ``"local"``: the GPT-OSS weights that already serve as the text encoder generate the rewrite
  (:class:`LocalReasoner`): no second copy of the model. The encoder's own layer modules run
  under a KV cache written here; only what the encoder never built (decoder layers after the last
  selected one, ``model.norm``, ``lm_head``) is read lazily from the checkpoint;
* ``"api"``: any OpenAI-compatible ``POST {base_url}/chat/completions`` (:class:`ApiReasoner`),
  stdlib ``urllib`` only, with timeouts, retries and an API key read from an environment variable.

One entry point, :func:`refine`, returns a :class:`RefinedPrompt` per prompt (the text, the mode that
produced it, whether it fell back to the user's prompt and why). Successful rewrites are cached in
memory (LRU) by everything that determines them, so re-queueing a ComfyUI workflow is free.

Local generation renders the harmony chat format of GPT-OSS (system block with ``Reasoning: low``,
our system prompt as the developer instructions, the user turn, then ``<|start|>assistant``),
decodes with temperature / top-p from a seeded ``torch.Generator``, and keeps only the text of the
``final`` channel; the model's ``analysis`` channel is discarded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError, LensError
from .layers import RMSNorm
from .loading import build_and_load, component_path
from .safetensors_io import TensorSource
from .text_encoder import (
    SLIDING,
    GptOssDecoderLayer,
    GptOssEncoder,
    expert_format_of,
    rope_inverse_frequencies,
)
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MODES = ("off", "local", "api")
ON_ERROR = ("fail", "passthrough")
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_SYSTEM_PROMPT_FILE = Path(__file__).with_name("reasoner_prompt.txt")

# o200k_harmony special tokens used by the chat format.
ENDOFTEXT_ID = 199999
RETURN_ID = 200002
CONSTRAIN_ID = 200003
CHANNEL_ID = 200005
START_ID = 200006
END_ID = 200007
MESSAGE_ID = 200008
CALL_ID = 200012

HARMONY_DATE = "2026-05-23"
"""Fixed "Current date" of the harmony system block, so one prompt always renders to the same tokens
(the same date :mod:`lens_core.prompt` uses)."""


class ReasonerError(LensError, RuntimeError):
    """The reasoner could not produce a rewrite (network, HTTP, malformed reply, missing weights...)."""


# ----------------------------------------------------------------------------------------------
# Settings and results


@dataclass(frozen=True)
class ReasonerSettings:
    """Everything that decides how prompts are rewritten.

    Mode and prompt:
        mode: ``"off"`` (pass through), ``"local"`` (the GPT-OSS encoder weights) or ``"api"``.
        system_prompt: the instructions as a string; overrides ``system_prompt_file``.
        system_prompt_file: a UTF-8 text file with the instructions; default: the packaged
            ``lens_core/reasoner_prompt.txt``.
        on_error: ``"fail"`` raises :class:`ReasonerError`; ``"passthrough"`` returns the user's
            prompt unchanged with a warning.
        use_cache: look up / store successful rewrites in the in-memory LRU cache.

    Sampling (both backends):
        temperature: 0 = greedy (local); ``top_p`` nucleus mass; ``max_new_tokens`` covers the
            analysis channel as well as the answer; ``seed`` makes sampling reproducible (None =
            fresh randomness, never cached); ``reasoning_effort`` goes into the harmony system block
            (local) and is not sent to APIs unless put in ``api_params``.

    API:
        api_base_url: the server root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``
            (``/chat/completions`` is appended unless already there).
        api_model: model name sent in the request (required in ``"api"`` mode).
        api_key_env: NAME of the environment variable holding the key (the key itself is never
            stored, logged or put in an error message). Unset = no ``Authorization`` header.
        api_timeout_s: per attempt; api_max_retries: further attempts after timeouts, connection
            errors, HTTP 408/429/5xx; api_backoff_s: first wait, doubled each retry (a server's
            ``Retry-After`` wins when longer, capped at ``api_max_backoff_s``).
        api_params: extra JSON body fields merged over the defaults; a value of None removes a
            default field (e.g. ``{"max_tokens": None, "max_completion_tokens": 4096,
            "temperature": None}`` for models that reject those).
    """

    mode: str = "off"
    system_prompt: str | None = None
    system_prompt_file: str | None = None
    on_error: str = "fail"
    use_cache: bool = True
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 4096
    seed: int | None = 0
    reasoning_effort: str = "low"
    api_base_url: str = ""  # no default endpoint: nothing is contacted unless the user names one
    api_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    api_timeout_s: float = 120.0
    api_max_retries: int = 3
    api_backoff_s: float = 1.0
    api_max_backoff_s: float = 30.0
    api_params: Mapping[str, Any] | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.mode not in MODES:
            raise ValueError(f"reasoner mode must be one of {MODES}, got {self.mode!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"reasoner on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(
                f"reasoning_effort must be one of {REASONING_EFFORTS}, got {self.reasoning_effort!r}"
            )
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.api_timeout_s <= 0 or self.api_max_retries < 0 or self.api_backoff_s < 0:
            raise ValueError("api_timeout_s must be > 0, api_max_retries and api_backoff_s >= 0")
        if self.mode == "api" and not self.api_model.strip():
            raise ValueError("reasoner mode 'api' needs api_model (the model name the server expects)")
        if self.mode == "api" and not re.match(r"https?://[^/\s]+", self.api_base_url):
            raise ValueError(
                "reasoner mode 'api' needs api_base_url, the server root starting with http:// or https:// "
                f"(e.g. http://127.0.0.1:8000/v1), got {self.api_base_url!r}"
            )
        if not self.api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError("api_key_env must be the NAME of an environment variable, e.g. OPENAI_API_KEY")


@dataclass(frozen=True)
class RefinedPrompt:
    """One rewrite. ``text`` is what to encode; ``original`` the user's prompt.

    ``mode`` is the mode that ran (``"off"`` for a passthrough by choice); ``fell_back`` is True when
    the rewrite failed and ``text`` is the user's prompt; ``warnings`` say why (or note, e.g., a
    truncated answer); ``cached`` marks a cache hit.
    """

    text: str
    original: str
    mode: str
    fell_back: bool = False
    warnings: tuple[str, ...] = ()
    cached: bool = False


@dataclass
class Completion:
    """What a backend produced for one prompt: the answer (``None`` when there was none) and notes."""

    text: str | None
    warnings: list[str] = field(default_factory=list)


class ReasonerBackend(Protocol):
    """A source of rewrites. ``identity`` names the model for the cache key."""

    @property
    def identity(self) -> str: ...

    def complete(self, system_prompt: str, user_prompt: str, settings: ReasonerSettings) -> Completion: ...


def load_system_prompt(settings: ReasonerSettings) -> str:
    """The instructions to use: ``system_prompt`` string, else ``system_prompt_file``, else the packaged one."""
    if settings.system_prompt is not None and settings.system_prompt.strip():
        return settings.system_prompt.strip()
    path = (
        Path(settings.system_prompt_file).expanduser()
        if settings.system_prompt_file
        else DEFAULT_SYSTEM_PROMPT_FILE
    )
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ReasonerError(f"{path}: cannot read the reasoner system prompt ({e})") from e
    if not text:
        raise ReasonerError(f"{path}: the reasoner system prompt file is empty")
    return text


# ----------------------------------------------------------------------------------------------
# Harmony chat format


def render_harmony(
    instructions: str, user_prompt: str, reasoning_effort: str = "low", date: str = HARMONY_DATE
) -> str:
    """The GPT-OSS conversation asking for an answer to ``user_prompt`` under ``instructions``.

    Same layout as gpt-oss's chat template with a system message (which the template turns into
    the developer block) and ``add_generation_prompt=True``: it ends with ``<|start|>assistant``,
    so the model writes the channel header itself.
    """
    return (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        f"Knowledge cutoff: 2024-06\nCurrent date: {date}\n\nReasoning: {reasoning_effort}\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
        "<|end|>"
        f"<|start|>developer<|message|># Instructions\n\n{instructions}\n\n<|end|>"
        f"<|start|>user<|message|>{user_prompt}<|end|>"
        "<|start|>assistant"
    )


@dataclass
class HarmonyMessage:
    """One parsed message: ``complete`` is False when the tokens ran out before its end token."""

    role: str
    channel: str | None
    text: str
    complete: bool
    end_token: int | None = None


_CHANNEL_RX = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")


class HarmonyStream:
    """Incremental parser of generated harmony tokens (the prompt ended with ``<|start|>{role}``).

    :meth:`push` takes one token and says whether generation should stop: at ``<|return|>``,
    ``<|call|>``, ``<|endoftext|>``, or at ``<|end|>`` when it closes a ``final`` message.
    An ``<|end|>`` that closes an ``analysis`` message does not stop: GPT-OSS writes its answer
    in a second message after it (``<|start|>assistant<|channel|>final<|message|>...``).
    """

    STOP_ALWAYS = frozenset({RETURN_ID, CALL_ID, ENDOFTEXT_ID})
    MESSAGE_ENDS = frozenset({END_ID, RETURN_ID, CALL_ID})

    def __init__(self, tokenizer: Tokenizer, role: str = "assistant") -> None:
        self._tok = tokenizer
        self.messages: list[HarmonyMessage] = []
        self._role: str | None = role  # role of the message being read (known from the prompt)
        self._in_header = True
        self._header: list[int] = []
        self._content: list[int] = []
        self._channel: str | None = None
        self._open = True  # a message (header or body) is in progress

    def _parse_header(self) -> None:
        text = self._tok.decode(self._header) if self._header else ""
        before = text.split("<|channel|>", 1)[0].split()
        if before and self._role is None:
            self._role = before[0]
        m = _CHANNEL_RX.search(text)
        self._channel = m.group(1) if m else None

    def _close(self, complete: bool, end_token: int | None) -> None:
        if self._open and (self._header or self._content or complete):
            if self._in_header:
                self._parse_header()
            text = self._tok.decode(self._content) if self._content else ""
            self.messages.append(HarmonyMessage(self._role or "", self._channel, text, complete, end_token))
        self._open = False
        self._in_header, self._header, self._content, self._channel, self._role = True, [], [], None, None

    def push(self, token: int) -> bool:
        token = int(token)
        if token == START_ID:
            if self._open:
                self._close(False, None)  # malformed: a new message without an end token
            self._open = True
            return False
        if token == ENDOFTEXT_ID:
            self._close(False, None)
            return True
        if not self._open:
            # Text between messages (after <|end|>, before <|start|>): treat as an unlabelled message.
            self._open = True
        if self._in_header:
            if token == MESSAGE_ID:
                self._parse_header()
                self._in_header = False
            elif token in self.MESSAGE_ENDS:
                self._close(False, token)
                return token in self.STOP_ALWAYS
            else:
                self._header.append(token)
            return False
        if token in self.MESSAGE_ENDS:
            channel = self._channel
            self._close(True, token)
            return token in self.STOP_ALWAYS or channel == "final"
        self._content.append(token)
        return False

    def finish(self) -> list[HarmonyMessage]:
        """Close whatever is in progress (as incomplete) and return all messages."""
        if self._open:
            self._close(False, None)
        return self.messages


def parse_harmony(
    tokens: Sequence[int], tokenizer: Tokenizer, role: str = "assistant"
) -> list[HarmonyMessage]:
    """All messages in generated ``tokens`` (see :class:`HarmonyStream`), parsing past stop tokens."""
    stream = HarmonyStream(tokenizer, role)
    for t in tokens:
        stream.push(t)
    return stream.finish()


def final_channel_text(messages: Sequence[HarmonyMessage]) -> tuple[str | None, list[str]]:
    """The text of the last complete ``final`` message (else the last truncated one, with a warning)."""
    finals = [m for m in messages if m.channel == "final" and m.role in ("assistant", "")]
    complete = [m for m in finals if m.complete and m.text.strip()]
    if complete:
        return complete[-1].text.strip(), []
    partial = [m for m in finals if m.text.strip()]
    if partial:
        return partial[-1].text.strip(), [
            "the answer has no end token (cut off by max_new_tokens?); using it as is"
        ]
    return None, []


_THINK_RX = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_SPECIAL_RX = re.compile(r"<\|[a-z_]+\|>")


def clean_answer(text: str) -> str:
    """Tidy an answer from an API: keep a harmony ``final`` part if markup leaked, drop ``<think>``
    blocks, stray special tokens, a Markdown fence and quotes around the whole answer; one line."""
    if "<|channel|>final<|message|>" in text:
        text = text.rsplit("<|channel|>final<|message|>", 1)[1]
        text = re.split(r"<\|(?:end|return|call)\|>", text, maxsplit=1)[0]
    text = _THINK_RX.sub(" ", text)
    if "</think>" in text.lower():
        text = re.split(r"</think>", text, flags=re.IGNORECASE)[-1]
    text = _SPECIAL_RX.sub(" ", text).strip()
    fence = re.fullmatch(r"```[^\n]*\n(.*)\n```", text, flags=re.DOTALL)
    if fence:
        text = fence.group(1).strip()
    quoted = len(text) >= 2 and (
        text[0] == text[-1] and text[0] in "\"'" or (text[0], text[-1]) == ("“", "”")
    )
    if quoted:
        text = text[1:-1].strip()
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Next token from ``logits`` ``[V]``: greedy when ``temperature == 0``, else softmax(logits / T)
    restricted to the smallest set of most likely tokens whose mass reaches ``top_p``.

    The nucleus is found with ``topk`` on the logits' device (growing k until the mass is reached,
    so the result equals a full sort); the draw itself is one uniform number from the CPU
    ``generator`` and an inverse-CDF lookup in fp64, so a seed replays exactly.
    """
    if temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.detach().float() / temperature, dim=-1)
    index: torch.Tensor | None = None
    if top_p < 1.0:
        vocab = probs.shape[-1]
        k = 64
        while True:
            k = min(k, vocab)
            values, index = torch.topk(probs, k)  # sorted, most likely first
            if k == vocab or float(values.sum()) >= top_p:
                break
            k *= 8
        before = torch.cumsum(values, dim=-1) - values  # mass of the better tokens
        keep = int((before < top_p).sum())  # >= 1: the first token always stays
        probs, index = values[:keep], index[:keep]
    cdf = torch.cumsum(probs.cpu().double(), dim=-1)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    j = min(int(torch.searchsorted(cdf, u, right=True)), cdf.shape[0] - 1)
    return int(index[j]) if index is not None else j


# ----------------------------------------------------------------------------------------------
# KV cache


class LayerKV:
    """Keys/values of one layer, ``[B, nKV, T, D]`` in the activations' dtype, plus each key's position.

    Full-attention layers keep every key in a buffer grown by doubling (appends are in place);
    sliding-window layers keep only the last ``window`` keys, which is all a later query can see.
    Keys are stored after RoPE, so their order in the buffer does not matter.
    """

    def __init__(self, window: int | None) -> None:
        self.window = window
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.length = 0

    def extend(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add ``S`` new keys; return every key the new queries may need (old ones first)."""
        s = k.shape[2]
        if self.window is not None:
            if self.k is None:
                keys, values, positions = k, v, pos
            else:
                keys = torch.cat((self.k, k), dim=2)
                values = torch.cat((self.v, v), dim=2)
                positions = torch.cat((self.pos, pos))
            self.k, self.v, self.pos = (
                keys[:, :, -self.window :],
                values[:, :, -self.window :],
                positions[-self.window :],
            )
            self.length = self.k.shape[2]
            return keys, values, positions
        need = self.length + s
        if self.k is None or need > self.k.shape[2]:
            capacity = max(need, 2 * (self.k.shape[2] if self.k is not None else 0), 64)
            b, h, _, d = k.shape
            new_k = k.new_empty(b, h, capacity, d)
            new_v = v.new_empty(b, h, capacity, d)
            new_pos = pos.new_empty(capacity)
            if self.k is not None:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
                new_pos[: self.length] = self.pos[: self.length]
            self.k, self.v, self.pos = new_k, new_v, new_pos
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.pos[self.length : need] = pos
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need], self.pos[:need]


@dataclass
class KVCache:
    """One :class:`LayerKV` per decoder layer and the number of tokens seen so far."""

    layers: list[LayerKV]
    seen: int = 0


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the HF "rotate half" pairing (i, i + D/2); ``x`` ``[B, S, h, D]``, cos/sin ``[1, S, 1, D/2]``."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    sinks: torch.Tensor,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """GQA attention with one learned sink logit per head, computed in fp32.

    Args:
        q: ``[B, nH, S, D]``; k, v: ``[B, nKV, T, D]``; q_pos ``[S]``, k_pos ``[T]`` absolute positions.
        sinks: ``[nH]``; window: sliding window (a key is visible when ``0 <= q - k < window``) or None.

    Returns:
        ``[B, nH, S, D]`` fp32. Query head ``h`` reads KV head ``h // (nH / nKV)``.
    """
    b, n_heads, s, d = q.shape
    n_kv = k.shape[1]
    groups = n_heads // n_kv
    qg = q.float().reshape(b, n_kv, groups, s, d)
    scores = torch.matmul(qg, k.float().unsqueeze(2).transpose(-1, -2)).mul_(scale)  # [B, nKV, G, S, T]
    offset = q_pos[:, None] - k_pos[None, :]
    allowed = offset >= 0
    if window is not None:
        allowed &= offset < window
    scores.masked_fill_(~allowed, float("-inf"))
    sink = sinks.float().view(1, n_kv, groups, 1, 1).expand(b, -1, -1, s, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    out = torch.matmul(probs, v.float().unsqueeze(2))  # [B, nKV, G, S, D]
    return out.reshape(b, n_heads, s, d)


# ----------------------------------------------------------------------------------------------
# Local backend: GPT-OSS generation on the encoder's own weights


@dataclass
class GenerationResult:
    """Generated token ids (stop token included) and why decoding ended: ``"stop"`` or ``"length"``."""

    tokens: list[int]
    finish_reason: str


def _file_identity(path: Path) -> str:
    try:
        files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    except OSError:
        stats = []
    return f"{path.resolve()}|{hashlib.sha256(repr(stats).encode()).hexdigest()[:16]}"


class LocalReasoner:
    """GPT-OSS text generation that reuses a loaded :class:`GptOssEncoder`.

    Args:
        encoder: the loaded feature encoder (dense or MXFP4 experts). Its embedding and decoder
            layers run as they are, on whatever device they sit on; nothing is copied.
        checkpoint: the encoder's checkpoint (a file, a folder, a pipeline root, or a mapping of
            HF-named tensors). Read lazily, on the first generation, for what the encoder does not
            hold: decoder layers after ``max(selected_layers)`` (none for Lens, which reads layer
            23 of 24), ``model.norm.weight`` and ``lm_head.weight``.
        tokenizer: the o200k_harmony tokenizer (:func:`lens_core.tokenizer.load_tokenizer`).
        identity: the model's name in the cache key; default: the checkpoint path and file stats.

    Raises (on first use) :class:`ReasonerError` when the checkpoint lacks the LM head: some
    text-encoder-only files strip it, and generation is impossible without it.
    """

    def __init__(
        self,
        encoder: GptOssEncoder,
        checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        tokenizer: Tokenizer,
        identity: str | None = None,
    ) -> None:
        self.encoder = encoder
        self.config = encoder.config
        self.tokenizer = tokenizer
        self._checkpoint = checkpoint
        inv_freq, gain = rope_inverse_frequencies(self.config)
        self._inv_freq, self._rope_gain = inv_freq, gain
        self._extra_layers: list[GptOssDecoderLayer] | None = None
        self._norm: RMSNorm | None = None
        self._lm_head: torch.Tensor | None = None
        self._lock = threading.Lock()
        self._detached_depth: int | None = None
        if identity is None:
            if isinstance(checkpoint, Mapping):
                identity = f"mapping@{id(checkpoint):x}"
            else:
                identity = _file_identity(component_path(checkpoint, "text_encoder"))
        self._identity = identity

    # -- weights ----------------------------------------------------------------------------

    def _encoder_or_raise(self) -> GptOssEncoder:
        if self.encoder is None:
            raise ReasonerError("the local reasoner has no encoder attached (call attach(encoder))")
        return self.encoder

    @property
    def device(self) -> torch.device:
        return self._encoder_or_raise().model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._encoder_or_raise().model.embed_tokens.weight.dtype

    @property
    def identity(self) -> str:
        encoder = self._encoder_or_raise()
        return f"local|{self._identity}|{encoder.expert_format}|{self.dtype}|{self.device.type}"

    def _open_checkpoint(self) -> tuple[Mapping[str, torch.Tensor], str, Any]:
        """(tensors, prefix in front of ``layers.0...``, label for messages)."""
        if isinstance(self._checkpoint, Mapping):
            source: Mapping[str, torch.Tensor] = self._checkpoint
            label: Any = "the given tensors"
        else:
            source = TensorSource.open(component_path(self._checkpoint, "text_encoder"))
            label = source.root
        anchor = "layers.0.self_attn.q_proj.weight"
        hits = [k for k in source if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")]
        if not hits:
            raise ReasonerError(f"{label}: not a GPT-OSS checkpoint (no tensor '*{anchor}')")
        return source, min(hits, key=len)[: -len(anchor)], label

    def _ensure_weights(self) -> None:
        """Load (once) the pieces the encoder lacks, then move them next to the encoder."""
        with self._lock:
            if self._lm_head is None:
                source, prefix, label = self._open_checkpoint()
                cfg, dtype = self.config, self.dtype
                # "model.layers.0..." -> lm_head is beside "model."; bare "layers.0..." -> top level.
                top = prefix[: -len("model.")] if prefix.endswith("model.") else prefix
                head_keys = [top + "lm_head.weight", "lm_head.weight"]
                head_key = next((k for k in head_keys if k in source), None)
                norm_key = prefix + "norm.weight"
                if head_key is None or norm_key not in source:
                    missing = "lm_head.weight" if head_key is None else norm_key
                    raise ReasonerError(
                        f"{label}: the encoder checkpoint has no '{missing}', so it cannot generate text "
                        "(text-encoder-only files strip the LM head). Point the reasoner at the full "
                        "GPT-OSS checkpoint (e.g. openai/gpt-oss-20b) or use the API mode."
                    )
                built = len(self.encoder.model.layers)
                extra: list[GptOssDecoderLayer] = []
                if built < cfg.num_hidden_layers:
                    if not hasattr(source, "renamed"):
                        source = _MappingSource(source)
                    fmt = expert_format_of(k for k in source if k.startswith(prefix))
                    for i in range(built, cfg.num_hidden_layers):
                        layer_prefix = f"{prefix}layers.{i}."
                        view = source.renamed(
                            {k: k[len(layer_prefix) :] for k in source if k.startswith(layer_prefix)}
                        )
                        try:
                            layer = build_and_load(
                                lambda i=i, fmt=fmt: GptOssDecoderLayer(cfg, i, fmt, dtype=dtype),
                                view,
                                f"GPT-OSS decoder layer {i}",
                                "cpu",
                            )
                        except CheckpointError as e:
                            raise ReasonerError(f"cannot load decoder layer {i} for generation: {e}") from e
                        extra.append(layer)
                norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
                with torch.no_grad():
                    norm.weight.copy_(source[norm_key].to(dtype))
                head = source[head_key]
                if tuple(head.shape) != (cfg.vocab_size, cfg.hidden_size):
                    raise ReasonerError(
                        f"{label}: '{head_key}' has shape {tuple(head.shape)}, expected "
                        f"{(cfg.vocab_size, cfg.hidden_size)}"
                    )
                self._extra_layers, self._norm = extra, norm.requires_grad_(False)
                self._lm_head = head.to(dtype)
            device = self.device
            if self._lm_head.device != device:
                self._lm_head = self._lm_head.to(device)
                self._norm.to(device)
                for layer in self._extra_layers or []:
                    layer.to(device)

    def release(self) -> None:
        """Drop the lazily loaded pieces (LM head, final norm, extra layers); reloaded when needed."""
        with self._lock:
            self._extra_layers, self._norm, self._lm_head = None, None, None

    def attach(self, encoder: GptOssEncoder) -> None:
        """Generate with ``encoder`` from now on (e.g. the same checkpoint reloaded by a pipeline).

        The lazily loaded pieces are kept when the new encoder has the same config and depth,
        dropped otherwise.
        """
        depth = len(self.encoder.model.layers) if self.encoder is not None else self._detached_depth
        if encoder.config != self.config or len(encoder.model.layers) != depth:
            self.release()
        self.encoder, self.config = encoder, encoder.config

    def detach(self, offload_to: torch.device | str | None = None) -> None:
        """Forget the encoder (so a pipeline can free it); move the loaded pieces to ``offload_to``."""
        with self._lock:
            if offload_to is not None and self._lm_head is not None:
                self._lm_head = self._lm_head.to(offload_to)
                self._norm.to(offload_to)
                for layer in self._extra_layers or []:
                    layer.to(offload_to)
        self._detached_depth = len(self.encoder.model.layers) if self.encoder is not None else None
        self.encoder = None

    def _all_layers(self) -> list[nn.Module]:
        return [*self.encoder.model.layers, *(self._extra_layers or [])]

    # -- forward passes ---------------------------------------------------------------------

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self._inv_freq.to(positions.device)[None]
        cos = (angles.cos() * self._rope_gain).to(dtype)[None, :, None, :]
        sin = (angles.sin() * self._rope_gain).to(dtype)[None, :, None, :]
        return cos, sin

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm(x), self._lm_head).float()

    def new_cache(self) -> KVCache:
        """An empty cache for every layer (loads the missing weights first, as it must know them)."""
        self._ensure_weights()
        window = self.config.sliding_window
        return KVCache(
            [LayerKV(window if layer.layer_type == SLIDING else None) for layer in self._all_layers()]
        )

    @torch.inference_mode()
    def forward_cached(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run ``ids`` ``[B, S]`` (positions continuing ``cache.seen``) through every layer,
        appending to ``cache``; returns fp32 logits of the last position ``[B, V]``.

        Each decoder layer is the encoder's own module; only attention is recomputed here so that
        it can read cached keys: norms, q/k/v/o projections, sinks and the MoE (dense or MXFP4
        experts) are called as they are.
        """
        self._ensure_weights()
        device = self.device
        ids = ids.to(device)
        bsz, seq = ids.shape
        x = self.encoder.model.embed_tokens(ids)
        positions = torch.arange(cache.seen, cache.seen + seq, device=device)
        cos, sin = self._rope(positions, x.dtype)
        window = self.config.sliding_window
        for layer, kv in zip(self._all_layers(), cache.layers, strict=True):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = _rotate_half(attn.q_proj(h).view(bsz, seq, attn.num_heads, attn.head_dim), cos, sin)
            k = _rotate_half(attn.k_proj(h).view(bsz, seq, attn.num_kv_heads, attn.head_dim), cos, sin)
            v = attn.v_proj(h).view(bsz, seq, attn.num_kv_heads, attn.head_dim)
            keys, values, key_pos = kv.extend(k.transpose(1, 2), v.transpose(1, 2), positions)
            out = sink_attention(
                q.transpose(1, 2),
                keys,
                values,
                positions,
                key_pos,
                attn.sinks,
                window if layer.layer_type == SLIDING else None,
                attn.scale,
            )
            out = out.to(x.dtype).transpose(1, 2).reshape(bsz, seq, attn.num_heads * attn.head_dim)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.seen += seq
        return self._logits(x[:, -1])

    @torch.inference_mode()
    def forward_full(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits ``[B, S, V]`` (fp32) for every position (``[B, V]`` of the last one with
        ``last_only``), recomputed from scratch with no cache.

        Uses the decoder layers' own ``forward`` (the encoder's attention code), so it is an
        independent check of :meth:`forward_cached`.
        """
        self._ensure_weights()
        device = self.device
        ids = ids.to(device)
        bsz, seq = ids.shape
        x = self.encoder.model.embed_tokens(ids)
        positions = torch.arange(seq, device=device)
        cos, sin = self._rope(positions, x.dtype)
        cos, sin = cos.expand(bsz, -1, -1, -1), sin.expand(bsz, -1, -1, -1)
        offset = positions[:, None] - positions[None, :]
        full = (offset >= 0)[None].expand(bsz, -1, -1)
        window = self.config.sliding_window
        sliding = full & (offset < window)[None] if window is not None else full
        for layer in self._all_layers():
            x = layer(x, cos, sin, sliding if layer.layer_type == SLIDING else full)
        return self._logits(x[:, -1] if last_only else x)

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        stop: Callable[[int], bool] | None = None,
        prefill_chunk: int = 512,
    ) -> GenerationResult:
        """Decode up to ``max_new_tokens`` after ``prompt_ids`` with the KV cache.

        ``stop(token)`` is called after each token (default: never stop); decoding ends after the
        token for which it returns True. The prompt is prefilled ``prefill_chunk`` tokens at a time.
        """
        if not prompt_ids:
            raise ValueError("generate needs at least one prompt token")
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        cache = self.new_cache()
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        # Prefill in chunks: attention scores are [S, cached + S] per head, so a long prompt in one
        # piece would need O(S^2) memory.
        for start in range(0, ids.shape[1], prefill_chunk):
            logits = self.forward_cached(ids[:, start : start + prefill_chunk], cache)[0]
        tokens: list[int] = []
        while True:
            token = sample_token(logits, temperature, top_p, generator)
            tokens.append(token)
            if stop is not None and stop(token):
                return GenerationResult(tokens, "stop")
            if len(tokens) >= max_new_tokens:
                return GenerationResult(tokens, "length")
            logits = self.forward_cached(torch.tensor([[token]], dtype=torch.long), cache)[0]

    def complete(self, system_prompt: str, user_prompt: str, settings: ReasonerSettings) -> Completion:
        """Rewrite ``user_prompt``: harmony prompt, sampling, ``final``-channel extraction."""
        rendered = render_harmony(system_prompt, user_prompt, settings.reasoning_effort)
        prompt_ids = self.tokenizer.encode(rendered)
        stream = HarmonyStream(self.tokenizer)
        result = self.generate(
            prompt_ids,
            settings.max_new_tokens,
            settings.temperature,
            settings.top_p,
            settings.seed,
            stop=stream.push,
        )
        text, warnings = final_channel_text(stream.finish())
        if text is None:
            why = (
                f"no 'final' answer within max_new_tokens={settings.max_new_tokens}"
                if result.finish_reason == "length"
                else "the model stopped without a 'final' answer"
            )
            warnings.append(why)
        return Completion(text, warnings)


class _MappingSource(Mapping[str, torch.Tensor]):
    """A plain tensor mapping with :meth:`renamed`, enough for :func:`lens_core.loading.build_and_load`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], mapping: Mapping[str, str] | None = None) -> None:
        self._tensors = tensors
        self._names = dict(mapping) if mapping is not None else {k: k for k in tensors}
        self.root = None
        self.shapes = {new: tuple(tensors[old].shape) for old, new in self._names.items()}
        self._back = {new: old for old, new in self._names.items()}

    def renamed(self, mapping: Mapping[str, str]) -> _MappingSource:
        return _MappingSource(self._tensors, {self._back[old]: new for old, new in mapping.items()})

    def file_of(self, name: str) -> None:
        return None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[self._back[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._back)

    def __len__(self) -> int:
        return len(self._back)


class PipelineLocalReasoner:
    """The local backend for a :class:`lens_core.pipeline.LensPipeline`: borrows its text encoder.

    Generation runs inside ``pipe.use("text_encoder")``, so the pipeline's offloading keeps
    working and its encoder object is the one that runs; :func:`refine` holds it for a whole batch
    of prompts via :meth:`session`. Between sessions the reasoner keeps no reference to the encoder
    (the pipeline may free it) and, when the pipeline offloads, parks the LM head in host memory.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._reasoner: LocalReasoner | None = None
        self._active = False
        self._identity = _file_identity(component_path(pipe.paths["text_encoder"], "text_encoder"))

    @property
    def identity(self) -> str:
        return f"local|{self._identity}|{self.pipe.dtype}|{self.pipe.device.type}"

    @contextlib.contextmanager
    def session(self) -> Iterator[LocalReasoner]:
        with self.pipe.use("text_encoder") as encoder:
            if self._reasoner is None:
                self._reasoner = LocalReasoner(
                    encoder, self.pipe.paths["text_encoder"], self.pipe.tokenizer, self._identity
                )
            else:
                self._reasoner.attach(encoder)
            self._active = True
            try:
                yield self._reasoner
            finally:
                self._active = False
                self._reasoner.detach("cpu" if getattr(self.pipe, "offload", False) else None)

    def complete(self, system_prompt: str, user_prompt: str, settings: ReasonerSettings) -> Completion:
        if not self._active:
            with self.session() as reasoner:
                return reasoner.complete(system_prompt, user_prompt, settings)
        return self._reasoner.complete(system_prompt, user_prompt, settings)


# ----------------------------------------------------------------------------------------------
# API backend: OpenAI-compatible chat completions over urllib


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


class ApiReasoner:
    """Rewrites through ``POST {api_base_url}/chat/completions`` (OpenAI schema), stdlib only.

    Retries (``api_max_retries`` more attempts, exponential backoff from ``api_backoff_s``) on
    timeouts, refused/reset connections, HTTP 408, 429 and 5xx. Everything else fails at once with
    a :class:`ReasonerError` that names the URL and the problem. The API key is read from the
    environment at each call, sent only as ``Authorization: Bearer``, and scrubbed from every message.
    """

    RETRY_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))

    def __init__(self, settings: ReasonerSettings, sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = settings.api_base_url.rstrip("/")
        self.model = settings.api_model
        self._sleep = sleep

    @property
    def url(self) -> str:
        return (
            self.base_url
            if self.base_url.endswith("/chat/completions")
            else self.base_url + "/chat/completions"
        )

    @property
    def identity(self) -> str:
        return f"api|{self.url}|{self.model}"

    def _body(self, system_prompt: str, user_prompt: str, s: ReasonerSettings) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": system_prompt},
                {"role": "user", "content": user_prompt},
            ],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
        }
        if s.seed is not None:
            body["seed"] = s.seed
        for key, value in (s.api_params or {}).items():
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
        return json.dumps(body).encode("utf-8")

    def complete(self, system_prompt: str, user_prompt: str, settings: ReasonerSettings) -> Completion:
        key = os.environ.get(settings.api_key_env) or None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = self._body(system_prompt, user_prompt, settings)
        attempts = settings.api_max_retries + 1
        url = _redact(self.url, key)  # as shown in messages (the request uses self.url)
        last_problem = ""
        for attempt in range(attempts):
            wait: float | None = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=settings.api_timeout_s) as response:
                    raw = response.read()
                return self._parse(raw, url, key)
            except urllib.error.HTTPError as e:
                detail = _redact(_error_detail(e), key)
                problem = f"HTTP {e.code} {e.reason} from {url}" + (f": {detail}" if detail else "")
                if e.code in (401, 403):
                    problem += f" (the key comes from the environment variable {settings.api_key_env}, " + (
                        "which is set)" if key else "which is not set)"
                    )
                if e.code not in self.RETRY_STATUS:
                    raise ReasonerError(f"reasoner API: {problem}") from None
                wait = _retry_after(e.headers)
                last_problem = problem
            except TimeoutError:
                last_problem = f"no answer from {url} within {settings.api_timeout_s:g} s (timeout)"
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, TimeoutError):
                    last_problem = f"no answer from {url} within {settings.api_timeout_s:g} s (timeout)"
                else:
                    last_problem = f"cannot reach {url}: {_redact(str(reason), key)}"
                    if not isinstance(reason, (ConnectionError, OSError)) or isinstance(
                        reason, socket.gaierror
                    ):
                        raise ReasonerError(f"reasoner API: {last_problem}") from None
            except (ConnectionError, http.client.HTTPException) as e:
                last_problem = f"connection to {url} failed: {_redact(type(e).__name__ + ' ' + str(e), key)}"
            if attempt + 1 < attempts:
                delay = settings.api_backoff_s * (2**attempt)
                if wait is not None:
                    delay = max(delay, wait)
                delay = min(delay, settings.api_max_backoff_s)
                logger.warning(
                    "reasoner API: %s; retrying in %.1f s (attempt %d of %d)",
                    last_problem,
                    delay,
                    attempt + 2,
                    attempts,
                )
                self._sleep(delay)
        raise ReasonerError(f"reasoner API: {last_problem} (gave up after {attempts} attempt(s))")

    @staticmethod
    def _parse(raw: bytes, url: str, key: str | None) -> Completion:
        def snippet() -> str:
            return _redact(raw[:300].decode("utf-8", "replace"), key)

        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ReasonerError(
                f"reasoner API: the reply from {url} is not JSON ({e}): {snippet()!r}"
            ) from None
        try:
            choice = payload["choices"][0]
            message = choice["message"]
            content = message["content"]
        except (KeyError, IndexError, TypeError):
            if isinstance(payload, dict) and "error" in payload:
                raise ReasonerError(f"reasoner API: {url} returned an error: {snippet()}") from None
            raise ReasonerError(
                f"reasoner API: the reply from {url} has no choices[0].message.content: {snippet()!r}"
            ) from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is not None and not isinstance(content, str):
            raise ReasonerError(
                f"reasoner API: choices[0].message.content from {url} is not text: {snippet()!r}"
            )
        warnings = []
        if choice.get("finish_reason") == "length":
            warnings.append("the API answer was cut off by the token limit")
        text = clean_answer(content or "")
        if not text:
            refusal = message.get("refusal") if isinstance(message, dict) else None
            warnings.append(f"the API returned no answer{': ' + str(refusal) if refusal else ''}")
            return Completion(None, warnings)
        return Completion(text, warnings)


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The server's error message (OpenAI ``{"error": {"message"}}`` or the first 300 bytes)."""
    try:
        raw = e.read()
    except Exception:
        return ""
    finally:
        e.close()
    try:
        payload = json.loads(raw)
        message = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
        if isinstance(message, str):
            return message[:300]
    except (ValueError, AttributeError):
        pass
    return raw[:300].decode("utf-8", "replace").strip()


# ----------------------------------------------------------------------------------------------
# Cache and entry point


class RefinementCache:
    """Thread-safe LRU of rewrites keyed by everything that determines them."""

    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[tuple, tuple[str, tuple[str, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[str, tuple[str, ...]] | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: tuple, value: tuple[str, tuple[str, ...]]) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


CACHE = RefinementCache()


def cache_key(settings: ReasonerSettings, identity: str, system_prompt: str, prompt: str) -> tuple:
    """(mode, model identity, system prompt digest, prompt, seed, sampling settings)."""
    params = json.dumps(dict(settings.api_params or {}), sort_keys=True, default=str)
    return (
        settings.mode,
        identity,
        hashlib.sha256(system_prompt.encode("utf-8")).hexdigest(),
        prompt,
        settings.seed,
        float(settings.temperature),
        float(settings.top_p),
        int(settings.max_new_tokens),
        settings.reasoning_effort,
        params,
    )


def refine(
    prompts: Sequence[str],
    settings: ReasonerSettings,
    backend: ReasonerBackend | None = None,
    cache: RefinementCache | None = None,
) -> list[RefinedPrompt]:
    """Rewrite each prompt according to ``settings``; one :class:`RefinedPrompt` per prompt, in order.

    Args:
        prompts: the user's prompts (a single string is one prompt).
        settings: mode, system prompt, sampling, API and error policy.
        backend: the rewriter; needed for ``"local"`` (a :class:`LocalReasoner` or
            :class:`PipelineLocalReasoner`); for ``"api"`` one is built from the settings when None.
            Any object with ``identity`` and ``complete`` works (tests use scripted ones).
        cache: the LRU to use (default: the module-wide :data:`CACHE`).

    Empty prompts are returned unchanged. A failure raises :class:`ReasonerError` when
    ``on_error == "fail"``; with ``"passthrough"`` the prompt comes back unchanged with
    ``fell_back=True`` and the reason in ``warnings``. Fallbacks are never cached.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    settings.validate()
    if settings.mode == "off":
        return [RefinedPrompt(p, p, "off") for p in prompts]
    cache = CACHE if cache is None else cache

    def fallback(prompt: str, why: str) -> RefinedPrompt:
        logger.warning("reasoner (%s) fell back to the user prompt: %s", settings.mode, why)
        return RefinedPrompt(prompt, prompt, settings.mode, True, (why,))

    def failed(prompt: str, err: BaseException) -> RefinedPrompt:
        if settings.on_error == "fail":
            if isinstance(err, ReasonerError):
                raise err
            raise ReasonerError(f"reasoner ({settings.mode}): {type(err).__name__}: {err}") from err
        return fallback(
            prompt, f"{type(err).__name__}: {err}" if not isinstance(err, ReasonerError) else str(err)
        )

    try:
        system_prompt = load_system_prompt(settings)
        if backend is None:
            if settings.mode == "api":
                backend = ApiReasoner(settings)
            else:
                raise ReasonerError(
                    "reasoner mode 'local' needs the GPT-OSS encoder: pass a LocalReasoner "
                    "(or PipelineLocalReasoner) as the backend"
                )
        identity = backend.identity
    except ReasonerError as e:
        return [RefinedPrompt(p, p, settings.mode) if not p.strip() else failed(p, e) for p in prompts]

    use_cache = settings.use_cache and settings.seed is not None
    out: list[RefinedPrompt | None] = [None] * len(prompts)

    def lookup(i: int) -> bool:
        prompt = prompts[i]
        if not prompt.strip():
            out[i] = RefinedPrompt(prompt, prompt, settings.mode)
            return True
        hit = cache.get(cache_key(settings, identity, system_prompt, prompt)) if use_cache else None
        if hit is not None:
            out[i] = RefinedPrompt(hit[0], prompt, settings.mode, False, hit[1], cached=True)
        return hit is not None

    todo = [i for i in range(len(prompts)) if not lookup(i)]
    if todo:
        session = getattr(backend, "session", None)
        with session() if callable(session) else contextlib.nullcontext():
            for i in todo:
                if lookup(i):  # a repeat of a prompt rewritten earlier in this call
                    continue
                prompt = prompts[i]
                try:
                    completion = backend.complete(system_prompt, prompt, settings)
                except Exception as e:  # noqa: BLE001 - the policy decides: raise or pass through
                    out[i] = failed(prompt, e)
                    continue
                if completion.text is None or not completion.text.strip():
                    why = "; ".join(completion.warnings) or "the reasoner produced no answer"
                    if settings.on_error == "fail":
                        raise ReasonerError(f"reasoner ({settings.mode}): {why}")
                    out[i] = fallback(prompt, why)
                    continue
                warnings = tuple(completion.warnings)
                if use_cache:
                    cache.put(
                        cache_key(settings, identity, system_prompt, prompt), (completion.text, warnings)
                    )
                out[i] = RefinedPrompt(completion.text, prompt, settings.mode, False, warnings)
    return out  # type: ignore[return-value]


def settings_from_dict(d: Mapping[str, Any]) -> ReasonerSettings:
    """Build settings from a plain dict (unknown keys rejected), e.g. from a node's widgets or JSON."""
    names = {f.name for f in dataclasses.fields(ReasonerSettings)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown reasoner setting(s): {', '.join(unknown)}")
    s = ReasonerSettings(**dict(d))
    s.validate()
    return s
