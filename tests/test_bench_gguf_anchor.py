"""benchmarks/bench_gguf_anchor.py's harness, with a stand-in anchor written here (ComfyUI-GGUF's
code is never part of the repository): loading from a folder and from a git directory, the
shared-type list, and the sanity check that must fail when the anchor's values differ."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant import GGMLType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gguf_anchor as bench  # noqa: E402

STAND_IN = """
import gguf
import torch

from quant import dequantize

OFFSET = {offset}
dequantize_functions = {{
    gguf.GGMLQuantizationType.Q8_0: None,
    gguf.GGMLQuantizationType.Q4_K: None,
    gguf.GGMLQuantizationType.TQ1_0: None,  # one we do not decode: must not be benchmarked
}}


def dequantize_tensor(tensor, dtype=None, dequant_dtype=None):
    shape = tuple(tensor.tensor_shape)
    values = dequantize(tensor.data.reshape(-1), int(tensor.tensor_type), shape)
    return (values + OFFSET).to(dtype)
"""


def stand_in(folder: Path, offset: float = 0.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dequant.py").write_text(STAND_IN.format(offset=offset))
    return folder


def test_loads_from_folder_and_git(tmp_path):
    folder = stand_in(tmp_path / "checkout")
    anchor = bench.load_anchor(folder, tmp_path)
    assert bench.common_types(anchor) == [GGMLType.Q8_0, GGMLType.Q4_K]

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(folder)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "dequant.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    (folder / "dequant.py").unlink()  # only the git objects are left
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    assert bench.common_types(bench.load_anchor(folder / ".git", extracted)) == [GGMLType.Q8_0, GGMLType.Q4_K]
    assert (extracted / "dequant.py").is_file()


def test_refuses_other_folders(tmp_path):
    with pytest.raises(SystemExit, match="neither"):
        bench.load_anchor(tmp_path, tmp_path)


@pytest.mark.parametrize("offset", [0.0, 1e-3])
def test_rows_report_whether_values_agree(tmp_path, capsys, offset):
    anchor = bench.load_anchor(stand_in(tmp_path / "a", offset), tmp_path)
    rows = bench.bench_type(anchor, GGMLType.Q4_K, (8, 512), torch.device("cpu"), 1, bench.CLOCKS["cpu"])
    assert [r.out for r in rows] == ["fp32", "bf16"]
    assert all(r.exact == (offset == 0.0) for r in rows)
    assert set(rows[0].anchor_s) == set(bench.ANCHOR_SETTINGS)
    for r in rows:
        passed = bench.print_row(r, target=0.0)
        assert passed == r.exact
    assert ("FAIL" in capsys.readouterr().out) == (offset != 0.0)
