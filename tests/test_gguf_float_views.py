"""Float tensors (F32/F16/BF16) of GGUF files load without a second copy of the file.

* Stored in the dtype the model computes in, on the CPU: parameters are zero-copy views of the
  file's memory map (their addresses lie in the map, at the tensors' file offsets), and the model
  computes exactly what the same weights loaded from safetensors compute.
* Stored in another dtype (BF16 file, fp32 model; F16 file, bf16 model) or loaded with
  ``copy=True``: parameters own their memory and hold the values the independent ``gguf`` package
  decodes, and the file pages read for the conversion are released again (the map's resident size,
  read from ``/proc/self/smaps``, drops to the header).
* The GPT-OSS loader's float tensors take the same path.

Linux only (the map's address range and resident size come from ``/proc/self``).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from lens_core.loading import load_mmdit, load_text_encoder
from lens_core.mmdit import LensMMDiT
from lens_core.random_weights import encoder_config_json, randomize_, tiny_configs
from lens_core.safetensors_io import save_file_atomic
from lens_core.text_encoder import GptOssEncoder
from quant.convert import convert_mmdit
from quant.ggml_types import GGMLType
from quant.gguf_models import GGUFSource, load_gpt_oss_gguf, load_mmdit_gguf, load_state_from_gguf
from quant.gguf_reader import GGUFFile
from quant.gpt_oss_gguf import write_gpt_oss_gguf
from quant.layers import GGMLOps

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")

SELECTED = (0, 1)
STORED = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A tiny bf16 MMDiT as safetensors and as BF16 and F16 GGUFs (small tensors F32)."""
    root = tmp_path_factory.mktemp("floats")
    src = root / "m.safetensors"
    save_file_atomic(randomize_(LensMMDiT(tiny_configs()[0]), 0).to(torch.bfloat16).state_dict(), src)
    return src, {t: convert_mmdit(src, root / f"m-{t}.gguf", t).path for t in ("BF16", "F16")}


def mappings(path: Path) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of every mapping of ``path`` in this process."""
    out: list[tuple[int, int, int]] = []
    target = str(path.resolve())
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            start, end = (int(a, 16) for a in fields[0].split("-"))
            current = " ".join(fields[5:]) == target
            if current:
                out.append((start, end, 0))
        elif current and fields[0] == "Rss:":
            start, end, _ = out[-1]
            out[-1] = (start, end, int(fields[1]) * 1024)
    return out


def map_offset(t: torch.Tensor, path: Path) -> int | None:
    """``t``'s byte offset in a mapping of ``path`` (these maps start at file offset 0), or None."""
    p = t.data_ptr()
    return next((p - start for start, end, _ in mappings(path) if start <= p < end), None)


def resident(path: Path, address: int) -> int:
    """Resident bytes of the mapping of ``path`` that holds ``address``."""
    return next(r for start, end, r in mappings(path) if start <= address < end)


def table(path: Path) -> dict[str, tuple[int, torch.dtype]]:
    """Each tensor's file offset and stored dtype."""
    with GGUFFile(path) as f:
        return {n: (i.offset, STORED[i.ggml_type]) for n, i in f.tensors.items()}


def reference(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor decoded to fp32 by the ``gguf`` package (independent of ``quant``)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf_dequantize(np.asarray(t.data), t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    return out


def forward(model: LensMMDiT, dtype: torch.dtype) -> torch.Tensor:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, cfg.in_channels, generator=g).to(dtype)
    feats = [torch.randn(2, 7, cfg.enc_hidden_dim, generator=g).to(dtype) for _ in range(cfg.num_text_layers)]
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        return model(x, torch.tensor([0.3, 0.8]), feats, mask, (4, 6)).float()


def test_bf16_gguf_in_bf16_is_the_file_map(files):
    """The headline case: every BF16 matrix is a view, and the output is the safetensors model's."""
    src, ggufs = files
    path = ggufs["BF16"]
    model = load_mmdit_gguf(path, dtype=torch.bfloat16)
    where = table(path)
    views = [k for k, v in model.state_dict().items() if map_offset(v, path) == where[k][0]]
    assert sorted(views) == sorted(k for k, (_, stored) in where.items() if stored == torch.bfloat16)
    assert len(views) > 20
    expected = forward(load_mmdit(src, dtype=torch.bfloat16), torch.bfloat16)
    assert torch.equal(forward(model, torch.bfloat16), expected)


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qtype", ["BF16", "F16"])
def test_views_exactly_when_nothing_changes(files, qtype, dtype, copy):
    """A tensor is a view iff it stays on the CPU in its stored dtype and no copy was asked for;
    views and copies alike hold the values ``gguf`` decodes (converted to the model dtype)."""
    src, ggufs = files
    path = ggufs[qtype]
    where = table(path)
    ref = reference(path)
    model = load_mmdit_gguf(path, dtype=dtype, copy=copy)
    state = model.state_dict()
    assert set(state) == set(where)
    for k, v in state.items():
        offset, stored = where[k]
        assert map_offset(v, path) == (offset if stored == dtype and not copy else None), k
        assert v.dtype == dtype and torch.equal(v, ref[k].to(dtype)), k
    if qtype == "BF16":  # the bf16 source's values exactly
        assert torch.equal(forward(model, dtype), forward(load_mmdit(src, dtype=dtype), dtype))


def touched(path: Path) -> tuple[GGUFFile, int]:
    """``path`` opened with every page of it resident; also the map's address."""
    f = GGUFFile(path)
    for name in f.tensors:
        f.raw(name).sum()
    address = f.raw(next(iter(f.tensors))).data_ptr()
    assert resident(path, address) > 0.9 * path.stat().st_size
    return f, address


def test_release_drops_the_pages_of_a_tensor(files):
    path = files[1]["F16"]
    f, address = touched(path)
    with f:
        for name in f.tensors:
            f.release(name)
        assert resident(path, address) <= f.data_offset  # the header's pages only
        first = next(iter(f.tensors.values()))
        assert torch.equal(
            f.raw(first.name),
            torch.from_numpy(np.fromfile(path, np.uint8, first.n_bytes, offset=first.offset)),
        )


@pytest.mark.parametrize("release", [True, False])
@pytest.mark.parametrize(("qtype", "dtype"), [("BF16", torch.float32), ("F16", torch.bfloat16)])
def test_converting_load_releases_the_file_pages(files, monkeypatch, qtype, dtype, release):
    """A converting load from a fully resident file drops the pages again; without the release
    (the control) they all stay, so the map holds the whole file beside the converted copies.  What
    is left: the header, tensors kept as views (the small F32 ones of a BF16 file in fp32) and the
    kernel's fault-around (it maps up to 64 KiB of already-released neighbours on each fault)."""
    if not release:
        monkeypatch.setattr(GGUFFile, "release", lambda self, name: None)
    path = files[1][qtype]
    f, address = touched(path)
    with f:
        with torch.device("meta"):
            model = LensMMDiT(tiny_configs()[0], operations=GGMLOps, dtype=dtype)
        load_state_from_gguf(model, GGUFSource(f), "the Lens MMDiT", "cpu")
        left = resident(path, address) / path.stat().st_size
        assert left < 0.5 if release else left > 0.9, left
        del model


def test_gpt_oss_bf16_gguf_shares_the_path(tmp_path):
    cfg = tiny_configs()[1]
    state = randomize_(
        GptOssEncoder(cfg, selected_layers=tuple(range(cfg.num_hidden_layers))), 3
    ).state_dict()
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    (tmp_path / "hf").mkdir()
    save_file_atomic(state, tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(encoder_config_json(cfg)))
    path = write_gpt_oss_gguf(state, cfg, tmp_path / "e.gguf", weight_type="BF16")
    where = table(path)
    ids = torch.randint(0, 5000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.bool)
    with torch.no_grad():
        expected = load_text_encoder(tmp_path / "hf", SELECTED, dtype=torch.bfloat16)(ids, mask)
    for copy in (False, True):
        model = load_gpt_oss_gguf(path, SELECTED, dtype=torch.bfloat16, copy=copy)
        attn = model.model.layers[0].self_attn.q_proj.weight
        embed = model.model.embed_tokens.weight
        if copy:
            assert map_offset(attn, path) is None and map_offset(embed, path) is None
        else:
            assert map_offset(attn, path) == where["blk.0.attn_q.weight"][0]
            assert map_offset(embed, path) == where["token_embd.weight"][0]
        with torch.no_grad():
            features = model(ids, mask)
        assert all(torch.equal(a, b) for a, b in zip(features, expected, strict=True))
