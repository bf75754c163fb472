"""Pretraining: config, LR schedule, AdamW, loss, FSDP2, atomic DCP checkpoints, the loop.

Entry points: ``bamba train CONFIG.yaml`` and ``torchrun --nproc-per-node N -m bamba.train CONFIG.yaml``;
in Python, ``bamba.train.trainer.train(bamba.train.config.load_config(path, overrides))``.
"""
