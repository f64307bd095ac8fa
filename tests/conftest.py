"""Shared fixtures: tiny random-weight Lens checkpoints written in the real layouts."""

from __future__ import annotations

import pytest
import torch

from lens_core.random_weights import random_state_dicts, tiny_configs, write_random_pipeline


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run thousands of small ops: one thread avoids oversubscribing the CI's 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_configs_():
    return tiny_configs()


@pytest.fixture(scope="session")
def tiny_states(tiny_configs_):
    """The exact tensors written by ``tiny_pipeline`` (seed 0, fp32)."""
    return random_state_dicts(tiny_configs_, seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_configs_):
    """A diffusers-layout pipeline folder, transformer and encoder sharded with an index."""
    root = tmp_path_factory.mktemp("lens-tiny")
    return write_random_pipeline(root, tiny_configs_, seed=0, dtype=torch.float32, shard_bytes=1 << 20)


@pytest.fixture(scope="session")
def tiny_pipeline_mxfp4(tmp_path_factory, tiny_configs_):
    """The same pipeline with the encoder's experts stored as MXFP4 blocks/scales (original GPT-OSS)."""
    root = tmp_path_factory.mktemp("lens-tiny-mxfp4")
    return write_random_pipeline(root, tiny_configs_, seed=0, dtype=torch.float32, mxfp4=True)
