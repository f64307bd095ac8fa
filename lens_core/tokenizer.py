"""The o200k_harmony tokenizer of GPT-OSS, from wherever the user's files keep it.

Lens encodes prompts with GPT-OSS-20B, so token ids must be exactly o200k_harmony's. The
tokenizer can come from a Hugging Face ``tokenizer.json`` (diffusers/transformers folders), from
the ``tokenizer_json`` byte tensor that ComfyUI embeds in its single-file encoder, or, with no file
at all, from the ``quicktok`` package, which bundles the vocabulary. Whatever the source, the
vocabulary is checked before use: a tokenizer of another model would silently produce garbage
features.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import quicktok
import tokenizers

from .errors import TokenizerError

ENCODING_NAME = "o200k_harmony"
PAD_ID = 199999

# Ids the rest of Lens relies on; a tokenizer that disagrees on any of them is rejected.
SPECIAL_IDS: dict[str, int] = {
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
}

# Ordinary text with its o200k ids: tells o200k apart from other byte-level BPEs that happen to
# share the special tokens.
_PROBE_TEXT = "hello world"
_PROBE_IDS = [24912, 2375]

# The o200k pre-tokenizer split (public in tiktoken); needed to write a tokenizer.json.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# Names tried inside a folder, in order: the folder itself (a tokenizer folder or a flat
# checkpoint), a ``tokenizer/`` subfolder (a pipeline root), and the sibling ``tokenizer/`` of a
# diffusers component folder such as ``text_encoder/``.
_FOLDER_CANDIDATES = ("tokenizer.json", "tokenizer/tokenizer.json", "../tokenizer/tokenizer.json")
_EMBEDDED_KEY = "tokenizer_json"


@runtime_checkable
class Tokenizer(Protocol):
    """What Lens needs from a tokenizer: special-token-aware encode, decode, the pad id."""

    pad_id: int
    source: str  # where the vocabulary came from, for messages

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings such as ``<|start|>`` become their ids."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens written out."""
        ...


class QuicktokTokenizer:
    """o200k_harmony as bundled by quicktok: needs no file, so Lens works without a tokenizer.json."""

    pad_id = PAD_ID

    def __init__(self) -> None:
        self._enc = quicktok.get_encoding(ENCODING_NAME)
        self.source = f"quicktok {quicktok.__version__} ({ENCODING_NAME})"

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_with_special(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


class JsonTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer.json, encoded without any added BOS/EOS."""

    pad_id = PAD_ID

    def __init__(self, tok: tokenizers.Tokenizer, source: str) -> None:
        self._tok = tok
        self.source = source

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(source: str | Path | None = None) -> Tokenizer:
    """Load and validate the o200k_harmony tokenizer.

    ``source`` may be a ``tokenizer.json``, a folder holding one (also looked for in ``tokenizer/``
    and in ``../tokenizer/``, the diffusers layout seen from ``text_encoder/``), a ``.safetensors``
    file with an embedded uint8 ``tokenizer_json`` tensor (ComfyUI's gpt_oss files), or None for
    quicktok's bundled copy. Raises TokenizerError naming the file and the problem.
    """
    if source is None:
        tok: Tokenizer = QuicktokTokenizer()
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            path = _find_in_folder(path)
        elif not path.is_file():
            raise TokenizerError(f"{path}: no such file or folder")
        path = path.resolve()
        stat = path.stat()
        tok = _load_file(path, stat.st_size, stat.st_mtime_ns)
    validate_tokenizer(tok)
    return tok


@functools.lru_cache(maxsize=4)
def _load_file(path: Path, size: int, mtime_ns: int) -> JsonTokenizer:
    """Parse a tokenizer file once per (path, size, mtime): parsing 200k merges takes a second or two."""
    if path.suffix == ".safetensors":
        text = _read_embedded_json(path)
        label = f"{path} (embedded {_EMBEDDED_KEY})"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{path}: cannot read tokenizer JSON ({err})") from err
        label = str(path)
    return JsonTokenizer(_parse_json(text, label), label)


def _find_in_folder(folder: Path) -> Path:
    for name in _FOLDER_CANDIDATES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(folder / name) for name in _FOLDER_CANDIDATES)
    raise TokenizerError(f"{folder}: no tokenizer.json found (looked for {tried})")


def _read_embedded_json(path: Path) -> str:
    """Read only the ``tokenizer_json`` bytes of a safetensors file (which may be many GB).

    The header is parsed directly rather than through ``safe_open`` so that a file holding dtypes
    the installed safetensors does not know (new quantised formats) still yields its tokenizer.
    """
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > path.stat().st_size:
                raise ValueError(f"header length {header_len} exceeds the file size")
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            key = next((k for k in header if k.rsplit(".", 1)[-1] == _EMBEDDED_KEY), None)
            info = header.get(key, {})
            start, end = info.get("data_offsets", (0, 0))
            f.seek(8 + header_len + start)
            data = f.read(end - start)
    except (OSError, struct.error, ValueError, TypeError) as err:
        raise TokenizerError(f"{path}: not a readable safetensors file ({err})") from err
    if key is None:
        raise TokenizerError(
            f"{path}: no '{_EMBEDDED_KEY}' tensor in this safetensors file; "
            "pass a tokenizer.json (or no tokenizer, to use the bundled one)"
        )
    if info.get("dtype") != "U8" or len(info.get("shape", ())) != 1:
        raise TokenizerError(
            f"{path}: tensor '{key}' should be 1-D uint8 bytes, found {info.get('dtype')} {info.get('shape')}"
        )
    if len(data) != end - start:
        raise TokenizerError(f"{path}: file ends inside tensor '{key}' (truncated download?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{path}: tensor '{key}' is not UTF-8 JSON text ({err})") from err


def _parse_json(text: str, label: str) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises plain Exception for every parse problem
        raise TokenizerError(f"{label}: not a valid tokenizer.json ({err})") from err


def validate_tokenizer(tok: Tokenizer) -> None:
    """Reject anything that is not o200k_harmony, saying which id or probe disagreed."""
    for text, expected in SPECIAL_IDS.items():
        got = tok.encode(text)
        if got != [expected]:
            raise TokenizerError(
                f"{tok.source}: not the GPT-OSS o200k_harmony vocabulary: "
                f"{text} encodes to {got}, expected [{expected}]"
            )
    got = tok.encode(_PROBE_TEXT)
    if got != _PROBE_IDS:
        raise TokenizerError(
            f"{tok.source}: not the GPT-OSS o200k_harmony vocabulary: "
            f"{_PROBE_TEXT!r} encodes to {got}, expected {_PROBE_IDS}"
        )


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE JSON files."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tokenizer_json(path: str | Path) -> Path:
    """Write o200k_harmony as a Hugging Face tokenizer.json built from quicktok's ranks.

    Lets test checkpoints ship a tokenizer.json in the real layout. The BPE merges are derived
    from the ranks: every split of a token into two tokens is a merge whose priority is the
    token's rank, and ``ignore_merges`` makes whole-piece vocabulary hits win first; together
    this reproduces tiktoken-style rank-ordered BPE. Written atomically (temp file + rename).
    """
    enc = quicktok.get_encoding(ENCODING_NAME)
    n_ranked = min(enc.encode_single_token(t) for t in enc.special_tokens_set)
    pieces = [enc.decode_single_token_bytes(i) for i in range(n_ranked)]
    rank = {piece: i for i, piece in enumerate(pieces)}
    # Byte-level BPE files spell each byte as a printable character; latin-1 maps byte b to chr(b).
    byte_chars = str.maketrans(_byte_to_unicode())
    shown = [piece.decode("latin-1").translate(byte_chars) for piece in pieces]

    merges: list[tuple[int, int]] = []
    for piece in pieces:  # rank order, so the merge list comes out in priority order
        merges.extend(
            sorted(
                (rank[piece[:k]], rank[piece[k:]])
                for k in range(1, len(piece))
                if piece[:k] in rank and piece[k:] in rank
            )
        )

    # Two names share id 200018 (<|endofprompt|> and <|reserved_200018|>); keep the real one.
    specials: dict[int, str] = {}
    for name in sorted(enc.special_tokens_set, key=lambda s: s.startswith("<|reserved_")):
        specials.setdefault(enc.encode_single_token(name), name)

    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": specials[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in sorted(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": O200K_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {text: i for i, text in enumerate(shown)},
            "merges": [[shown[left], shown[right]] for left, right in merges],
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, ensure_ascii=False))  # one C-encoder call: 5x faster than dump()
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a checkpoint file should be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
