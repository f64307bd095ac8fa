"""Write the placeholder default model shipped in ``lens_core/default_model/``.

It is a tiny random-weight Lens (same architecture and file layout as the real one) so the CLI
and the nodes work out of the box with nothing to download; its images are abstract patterns,
not prompt-following pictures. Lens-Toy, a trained small model, replaces it.

    python scripts/make_default_model.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lens_core.pipeline import DEFAULT_MODEL_DIR
from lens_core.random_weights import tiny_configs, write_random_pipeline


def main() -> None:
    tmp = Path(f"{DEFAULT_MODEL_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_random_pipeline(tmp, tiny_configs(encoder_hidden=16), seed=2026, dtype=torch.bfloat16, tokenizer_json=False)
    shutil.rmtree(DEFAULT_MODEL_DIR, ignore_errors=True)
    tmp.rename(DEFAULT_MODEL_DIR)
    print(f"wrote {DEFAULT_MODEL_DIR}")


if __name__ == "__main__":
    main()
