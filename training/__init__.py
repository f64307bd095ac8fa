"""Training for Lens (standalone: no ComfyUI import). See ``training/README.md``.

Entry points: ``lens-train CONFIG.toml`` (:mod:`training.cli`), :class:`training.trainer.Trainer`,
:func:`lens_core.lora.apply_lora` (merge any Lens LoRA file into a lens_core LensMMDiT).
Submodules are imported on demand, so ``import training`` stays cheap (no peft/accelerate).
"""
