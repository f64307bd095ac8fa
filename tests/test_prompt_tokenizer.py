"""Prompt rendering and o200k_harmony tokenisation: quicktok, a written tokenizer.json, and a plain BPE agree."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import quicktok
import regex
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from lens_core.errors import TokenizerError
from lens_core.prompt import (
    MAX_TOKENS,
    TEXT_OFFSET,
    empty_features,
    pad_to_length,
    render_prompt,
    split_features,
    tokenize_prompts,
)
from lens_core.tokenizer import O200K_PATTERN, PAD_ID, Tokenizer, load_tokenizer, write_tokenizer_json

USER_HEADER = "<|start|>user<|message|>"

PROMPTS = {
    "english": "A red fox sits on a mossy log in a misty forest at dawn, photorealistic, 35mm.",
    "chinese": "一只橘猫趴在窗台上晒太阳，窗外是下雪的北京胡同，写实风格。",
    "japanese": "夕焼けの富士山、湖に映る逆さ富士。看板に「ようこそ」と書かれている。",
    "emoji": "A birthday cake 🎂 with candles 🕯️🕯️, confetti 🎉 and a family 👨‍👩‍👧‍👦 around it",
    "arabic": "قطة سوداء تجلس على نافذة زرقاء في مدينة قديمة، ولافتة مكتوب عليها «مرحبا».",
    "mixed": "  Text 'HELLO World' in 3D letters (98.6%),\n\tnew line\r\nand don't CAN'T stop  ",
    "long": "A very detailed street market with stalls of spices, fruit and fabric, " * 60,
}


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def json_tok(tokenizer_json: Path) -> Tokenizer:
    return load_tokenizer(tokenizer_json)


@pytest.fixture(scope="session")
def quick_tok() -> Tokenizer:
    return load_tokenizer()


class PlainBPE:
    """Rank-ordered byte-pair encoding written out in Python (tiktoken's algorithm), over quicktok's ranks.

    Independent of both the quicktok engine and the tokenizers library: split special tokens,
    split text with the o200k regex, then merge the lowest-ranked adjacent pair until none is left.
    """

    def __init__(self) -> None:
        enc = quicktok.get_encoding("o200k_harmony")
        self.specials = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        n_ranked = min(self.specials.values())
        self.ranks = {enc.decode_single_token_bytes(i): i for i in range(n_ranked)}
        self.special_re = regex.compile(
            "|".join(regex.escape(s) for s in sorted(self.specials, key=len, reverse=True))
        )
        self.piece_re = regex.compile(O200K_PATTERN)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in self.special_re.finditer(text):
            ids += self._ordinary(text[pos : m.start()])
            ids.append(self.specials[m.group()])
            pos = m.end()
        return ids + self._ordinary(text[pos:])

    def _ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.piece_re.findall(text):
            parts = [bytes([b]) for b in piece.encode("utf-8")]
            while len(parts) > 1:
                ranks = [self.ranks.get(parts[i] + parts[i + 1], math.inf) for i in range(len(parts) - 1)]
                best = min(range(len(ranks)), key=ranks.__getitem__)
                if ranks[best] == math.inf:
                    break
                parts[best : best + 2] = [parts[best] + parts[best + 1]]
            ids += [self.ranks[p] for p in parts]
        return ids


@pytest.fixture(scope="session")
def plain_bpe() -> PlainBPE:
    return PlainBPE()


def test_render_prompt_is_the_harmony_conversation() -> None:
    expected = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2026-05-23\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>developer<|message|># Instructions\n\n"
        "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
        "relationships of the objects and background.\n\n<|end|>"
        "<|start|>user<|message|>a cat<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Need to generate one image according to the description.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>"
    )
    assert render_prompt("a cat") == expected
    assert render_prompt("  spaced  ").count("<|message|>  spaced  <|end|>") == 1  # not stripped


@pytest.mark.parametrize("name", ["quick", "json"])
def test_prefix_is_97_tokens(name: str, quick_tok: Tokenizer, json_tok: Tokenizer) -> None:
    tok = quick_tok if name == "quick" else json_tok
    for prompt in PROMPTS.values():
        rendered = render_prompt(prompt)
        prefix = rendered[: rendered.index(USER_HEADER) + len(USER_HEADER)]
        prefix_ids = tok.encode(prefix)
        assert len(prefix_ids) == TEXT_OFFSET == 97
        assert prefix_ids[-3:] == [200006, tok.encode("user")[0], 200008]
        full = tok.encode(rendered)
        assert full[:TEXT_OFFSET] == prefix_ids
        assert tok.decode(full) == rendered
    # The assistant header ends every untruncated rendering.
    header = [200006, *tok.encode("assistant"), 200005, *tok.encode("final"), 200008]
    assert tok.encode(render_prompt("x"))[-len(header) :] == header


@pytest.mark.parametrize("name", list(PROMPTS))
def test_three_tokenizers_agree(
    name: str, quick_tok: Tokenizer, json_tok: Tokenizer, plain_bpe: PlainBPE
) -> None:
    for text in (PROMPTS[name], render_prompt(PROMPTS[name])):
        expected = plain_bpe.encode(text)
        assert quick_tok.encode(text) == expected
        assert json_tok.encode(text) == expected


def test_special_token_ids(json_tok: Tokenizer, quick_tok: Tokenizer) -> None:
    ids = {"<|endoftext|>": 199999, "<|return|>": 200002, "<|channel|>": 200005, "<|start|>": 200006,
           "<|end|>": 200007, "<|message|>": 200008, "<|startoftext|>": 199998, "<|call|>": 200012,
           "<|endofprompt|>": 200018, "<|reserved_201087|>": 201087}  # fmt: skip
    for tok in (json_tok, quick_tok):
        assert tok.pad_id == PAD_ID == 199999
        for text, i in ids.items():
            assert tok.encode(text) == [i]
            assert tok.decode([i]) == text


def test_o200k_pattern_matches_quicktok() -> None:
    from quicktok import _import_core  # quicktok's own copy of the o200k split regex

    assert O200K_PATTERN == _import_core.O200K_PAT


def test_tokenize_prompts_pads_right_with_mask(quick_tok: Tokenizer, json_tok: Tokenizer) -> None:
    prompts = [PROMPTS["english"], "a cat", PROMPTS["long"]]
    ids, mask = tokenize_prompts(prompts, quick_tok)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (3, MAX_TOKENS)  # the long prompt truncates to 512
    for row, prompt in enumerate(prompts):
        full = quick_tok.encode(render_prompt(prompt))[:MAX_TOKENS]
        n = len(full)
        assert ids[row, :n].tolist() == full
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == 199999).all()
    assert mask[2].all()
    assert len(quick_tok.encode(render_prompt(PROMPTS["long"]))) > MAX_TOKENS

    json_ids, json_mask = tokenize_prompts(prompts, json_tok)
    assert torch.equal(json_ids, ids) and torch.equal(json_mask, mask)

    short_ids, short_mask = tokenize_prompts(["a cat", "a dog on a sofa"], quick_tok, max_length=100)
    assert short_ids.shape == (2, 100) and short_mask.all()
    with pytest.raises(ValueError):
        tokenize_prompts([], quick_tok)
    with pytest.raises(ValueError):
        tokenize_prompts("a cat", quick_tok)


def test_feature_helpers() -> None:
    feats = [torch.randn(2, 120, 8, dtype=torch.bfloat16) for _ in range(4)]
    mask = torch.ones(2, 120, dtype=torch.bool)
    mask[1, 110:] = False
    kept, kept_mask = split_features(feats, mask)
    assert [f.shape for f in kept] == [(2, 23, 8)] * 4
    assert all(torch.equal(k, f[:, 97:]) for k, f in zip(kept, feats, strict=True))
    assert torch.equal(kept_mask, mask[:, 97:])

    zero, zero_mask = empty_features(kept, kept_mask)
    assert [(z.shape, z.dtype) for z in zero] == [((2, 23, 8), torch.bfloat16)] * 4
    assert all(not z.any() for z in zero)
    assert zero_mask.shape == (2, 23) and zero_mask.dtype == torch.bool and not zero_mask.any()

    padded, padded_mask = pad_to_length(kept, kept_mask, 30)
    assert [p.shape for p in padded] == [(2, 30, 8)] * 4
    assert all(torch.equal(p[:, :23], k) and not p[:, 23:].any() for p, k in zip(padded, kept, strict=True))
    assert torch.equal(padded_mask[:, :23], kept_mask) and not padded_mask[:, 23:].any()
    same, same_mask = pad_to_length(kept, kept_mask, 23)
    assert torch.equal(same[0], kept[0]) and torch.equal(same_mask, kept_mask)
    with pytest.raises(ValueError):
        pad_to_length(kept, kept_mask, 10)


def test_folder_layouts(tmp_path: Path, tokenizer_json: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "tokenizer.json").symlink_to(tokenizer_json)
    pipeline = tmp_path / "pipeline"
    (pipeline / "tokenizer").mkdir(parents=True)
    (pipeline / "text_encoder").mkdir()
    (pipeline / "tokenizer" / "tokenizer.json").symlink_to(tokenizer_json)
    for source in (flat, pipeline, pipeline / "text_encoder", str(pipeline / "tokenizer" / "tokenizer.json")):
        tok = load_tokenizer(source)
        assert tok.encode("<|start|>hello world") == [200006, 24912, 2375]
        assert "tokenizer.json" in tok.source


def test_embedded_tokenizer_json(tmp_path: Path, tokenizer_json: Path) -> None:
    data = bytearray(tokenizer_json.read_bytes())
    path = tmp_path / "gpt_oss_20b.safetensors"
    save_file(
        {"model.norm.weight": torch.ones(4), "tokenizer_json": torch.frombuffer(data, dtype=torch.uint8)},
        path,
    )
    tok = load_tokenizer(path)
    assert "gpt_oss_20b.safetensors" in tok.source
    assert tok.encode(render_prompt("一只猫")) == load_tokenizer().encode(render_prompt("一只猫"))

    no_tok = tmp_path / "weights_only.safetensors"
    save_file({"model.norm.weight": torch.ones(4)}, no_tok)
    with pytest.raises(TokenizerError, match="weights_only.safetensors.*tokenizer_json"):
        load_tokenizer(no_tok)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(TokenizerError, match="garbage.safetensors"):
        load_tokenizer(garbage)


def test_wrong_vocabulary_is_rejected(tmp_path: Path) -> None:
    tiny = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    path = tmp_path / "tiny" / "tokenizer.json"
    path.parent.mkdir()
    tiny.save(str(path))
    with pytest.raises(TokenizerError, match=r"tiny/tokenizer\.json.*o200k_harmony.*<\|endoftext\|>"):
        load_tokenizer(path.parent)


def test_unreadable_sources(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {')
    with pytest.raises(TokenizerError, match="corrupt.json"):
        load_tokenizer(corrupt)
    with pytest.raises(TokenizerError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(empty)
