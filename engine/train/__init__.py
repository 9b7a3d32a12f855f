"""Training: the flow-matching objective, LoRA, optimizers, checkpoints and the loop (see engine.runner.run)."""
