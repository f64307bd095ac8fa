"""End-to-end training runs on the tiny random pipeline: resume, multi-process, tar input, full fine-tune."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lens_core.image_io import read_settings
from lens_core.loading import load_mmdit
from lens_core.lora import apply_lora
from lens_core.mmdit import LensMMDiT
from lens_core.random_weights import tiny_configs
from training import checkpoint as ckpt
from training.cli import main as cli_main
from training.logs import read_losses
from training.testing import tiny_config, write_broken_images, write_tar_shards, write_tiny_folder
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pipeline):
    """Tiny data (with two broken files) and a latent/feature cache shared by the runs."""
    root = tmp_path_factory.mktemp("train")
    data = write_tiny_folder(root / "data", n=12)
    write_broken_images(data)
    cache = root / "cache"
    cfg = tiny_config(
        tiny_pipeline,
        data,
        root / "warm",
        cache={"dir": str(cache)},
        sample={"prompts": ["a red rectangle"]},
        train={"max_steps": 1},
    )
    Trainer(cfg).prepare_data()  # fills the cache once for every test below
    return tiny_pipeline, data, cache, root


class Killed(Exception):
    pass


def _resume_config(setup, out):
    pipe, data, cache, _ = setup
    return tiny_config(
        pipe,
        data,
        out,
        cache={"dir": str(cache)},
        train={
            "max_steps": 6,
            "checkpoint_every": 3,
            "ema_decay": 0.9,
            "keep_checkpoints": 1,
            "warmup_steps": 2,
        },
        lora={"dropout": 0.1},  # dropout draws from the global RNG: its state must be restored too
    )


def test_resume_after_kill_is_bit_exact(setup, tmp_path):
    straight = Trainer(_resume_config(setup, tmp_path / "straight")).train()
    assert (
        straight.step == 6 and straight.skipped.count == 2
    )  # text-as-.png at scan, truncated JPEG at caching

    out = tmp_path / "killed"

    def kill(step):
        if step == 4:  # after the step-3 checkpoint, before the next one
            raise Killed

    with pytest.raises(Killed):
        Trainer(_resume_config(setup, out), on_step_end=kill).train()
    ckpts = out / "checkpoints"
    assert ckpt.find_latest(ckpts) == ckpt.step_dir(ckpts, 3)
    # debris of a checkpoint being written when the process died must be ignored
    ckpt.tmp_dir(ckpts, 5).mkdir()
    (ckpt.step_dir(ckpts, 5)).mkdir()  # no state.json: incomplete
    resumed = Trainer(_resume_config(setup, out)).train()
    assert resumed.resumed_from == 3 and resumed.step == 6

    assert read_losses(out / "loss_log.csv") == read_losses(tmp_path / "straight" / "loss_log.csv")
    for name in ("lora.safetensors", "lora_ema.safetensors", "lora_kohya.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(out / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert [p.name for _, p in ckpt.complete_checkpoints(ckpts)] == ["step_00000006"]  # keep_checkpoints = 1
    assert not list(ckpts.glob(".tmp_*"))

    # the trained LoRA merges into a plain LensMMDiT
    model = load_mmdit(setup[0])
    report = apply_lora(model, out / "lora.safetensors")
    assert report.applied and not report.unmatched


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_toml(path: Path, pipe, data, cache, out, accum: int) -> Path:
    path.write_text(f"""
[model]
path = "{pipe}"
[data]
kind = "folder"
path = "{data}"
num_workers = 0
[buckets]
areas = [32, 48]
batch_sizes = [2, 2]
aspect_ratios = ["1:2", "1:1", "2:1"]
[cache]
dir = "{cache}"
[train]
output_dir = "{out}"
max_steps = 3
checkpoint_every = 0
warmup_steps = 0
learning_rate = 1e-3
grad_accum = {accum}
device = "cpu"
progress = false
gradient_checkpointing = false
[lora]
rank = 4
save_dtype = "float32"
save_kohya = false
""")
    return path


def test_two_processes_match_one_with_same_global_batch(setup, tmp_path):
    pipe, data, cache, _ = setup
    one = _write_toml(tmp_path / "one.toml", pipe, data, cache, tmp_path / "one", accum=2)
    two = _write_toml(tmp_path / "two.toml", pipe, data, cache, tmp_path / "two", accum=1)
    assert cli_main([str(one)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # accelerate's multi-process launcher; on a machine without GPUs each process gets gloo on CPU
    # (`accelerate launch --cpu --num_processes 2` would start ONE process).
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "training.cli",
        str(two),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stderr
    la, lb = read_losses(tmp_path / "one" / "loss_log.csv"), read_losses(tmp_path / "two" / "loss_log.csv")
    assert la.keys() == lb.keys() == {1, 2, 3}
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5)
    a, b = load_file(tmp_path / "one" / "lora.safetensors"), load_file(tmp_path / "two" / "lora.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3  # it did train


def test_full_finetune_online_tar_input_with_previews(setup, tmp_path):
    """Full fine-tuning, no cache (VAE and encoder run every step), tar shards with broken members."""
    pipe, data, _, _ = setup
    shards = write_tar_shards(data, tmp_path / "shards", per_shard=5)
    cfg = tiny_config(
        pipe,
        data,
        tmp_path / "full",
        data={"kind": "tar", "shards": [str(s) for s in shards]},
        cache={"enabled": False},
        train={
            "mode": "full",
            "max_steps": 2,
            "gradient_checkpointing": True,
            "ema_decay": 0.5,
            "learning_rate": 1e-4,
        },
        sample={"prompts": ["a blue rectangle"], "seeds": [3], "steps": 2, "width": 32, "height": 32},
        lora={"save_dtype": "float32"},
    )
    result = Trainer(cfg).train()
    assert result.step == 2
    state = load_file(result.output)
    model = load_mmdit(result.output)  # a plain Lens MMDiT file, loadable as a model
    assert isinstance(model, LensMMDiT) and model.config.num_layers == tiny_configs()[0].num_layers
    base = load_mmdit(pipe).state_dict()
    changed = [k for k in state if not torch.equal(state[k], base[k])]
    assert "transformer_blocks.0.img_mod.1.weight" in changed  # full fine-tune trains modulation too
    assert "transformer_blocks.1.txt_mlp.w1.weight" not in changed  # dead: frozen
    assert (tmp_path / "full" / "transformer_ema.safetensors").is_file()
    assert len(result.previews) == 1 and read_settings(result.previews[0])["prompt"] == "a blue rectangle"
    # re-running a finished run is a no-op that restores lost final weights from the last checkpoint
    result.output.unlink()
    again = Trainer(cfg).train()
    assert again.resumed_from == 2 and again.step == 2 and again.output == result.output
    assert load_file(again.output).keys() == state.keys()


def test_cli_cache_only_reports_hits(setup, tmp_path, capsys):
    pipe, data, cache, _ = setup
    toml = _write_toml(tmp_path / "c.toml", pipe, data, cache, tmp_path / "c", accum=1)
    assert cli_main([str(toml), "--cache-only"]) == 0
    out = capsys.readouterr().out
    assert "cache ready: latents 12 hit / 0 computed" in out and "2 samples skipped" in out
    assert not (tmp_path / "c" / "checkpoints").exists()  # nothing was trained


def test_lr_schedule_warmup_constant_decay():
    from training.trainer import WarmupConstantDecay

    s = WarmupConstantDecay(warmup=4, total=20, decay=5)
    lrs = [s(i) for i in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and set(lrs[4:15]) == {1.0}
    assert lrs[15:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert WarmupConstantDecay(warmup=0)(10**6) == 1.0  # no decay: constant for ever


def test_finished_run_extended_with_a_cooldown(setup, tmp_path):
    """A finished run resumed with more steps and ``decay_steps`` continues from its checkpoint with the
    new schedule (the usual way to cool a long run down), not the one saved with it."""
    from training.trainer import WarmupConstantDecay

    pipe, data, cache, _ = setup
    base = {"checkpoint_every": 3, "warmup_steps": 2, "learning_rate": 1e-3}
    first = Trainer(tiny_config(pipe, data, tmp_path, cache={"dir": str(cache)}, train={**base, "max_steps": 3}))
    assert first.train().step == 3
    longer = {**base, "max_steps": 7, "decay_steps": 4}
    resumed = Trainer(tiny_config(pipe, data, tmp_path, cache={"dir": str(cache)}, train=longer)).train()
    assert resumed.resumed_from == 3 and resumed.step == 7
    with open(tmp_path / "loss_log.csv") as f:
        lrs = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    schedule = WarmupConstantDecay(2, 7, 4)
    assert [lrs[s] for s in range(1, 8)] == pytest.approx([1e-3 * schedule(s - 1) for s in range(1, 8)])
    assert lrs[7] < lrs[5] < lrs[3] == pytest.approx(1e-3)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator: a test that changes the
    precision starts and ends with none."""
    from accelerate.state import AcceleratorState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)

    yield reset
    reset()


def test_compiled_bf16_cpu_run_follows_the_eager_one(setup, tmp_path, fresh_accelerate_state):
    """``compile`` with bf16 autocast on the CPU (the Lens-Toy setting): the same losses and weights as the
    eager bf16 run up to bf16 rounding, with the same parameter names in the saved file, and bf16 really
    in use (its losses differ from the fp32 run's)."""
    pipe, data, cache, _ = setup
    one_bucket = {"areas": [32], "batch_sizes": [2], "aspect_ratios": ["1:1"]}  # same shapes: compiles once
    runs = {}
    for name, precision, compiled in (("fp32", "no", False), ("eager", "bf16", False), ("compiled", "bf16", True)):
        fresh_accelerate_state()
        train = {"mode": "full", "max_steps": 3, "mixed_precision": precision, "compile": compiled}
        trainer = Trainer(tiny_config(pipe, data, tmp_path / name, cache={"dir": str(cache)}, buckets=one_bucket,
                                      train=train))
        result = trainer.train()
        assert (getattr(trainer.unwrapped, "_compiled_call_impl", None) is not None) == compiled
        runs[name] = read_losses(tmp_path / name / "loss_log.csv"), load_file(result.output)
    (fp32, _), (eager, eager_w), (compiled, compiled_w) = runs["fp32"], runs["eager"], runs["compiled"]
    assert compiled_w.keys() == eager_w.keys()
    assert list(compiled.values()) == pytest.approx(list(eager.values()), rel=2e-2)
    assert list(eager.values()) != pytest.approx(list(fp32.values()), rel=1e-6)
    for k, w in eager_w.items():
        assert torch.allclose(compiled_w[k].float(), w.float(), rtol=5e-2, atol=5e-3), k
