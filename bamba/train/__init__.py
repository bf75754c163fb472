"""Pretraining and fine-tuning: config, LR schedule, AdamW, loss, FSDP2, atomic DCP checkpoints.

Entry points::

    bamba train CONFIG.yaml [--key=value | --key value ...]          # one process
    torchrun --nproc-per-node N -m bamba.train CONFIG.yaml [...]      # FSDP2, gloo/nccl
    bamba finetune CONFIG.yaml --init_from=HF_DIR --data_path=chat.jsonl

In Python: ``train(load_config(path, overrides))`` (``bamba.train.trainer`` /
``bamba.train.train_config``). A run directory holds ``checkpoints/step_N`` (resumed automatically,
at any world size), ``metrics.jsonl``, ``loss.png`` and the HF-layout export ``hf/``.
Modules: schedule (LR as a pure function of the step), optim (AdamW groups), loss (CE + z-loss),
config (TrainConfig), data (the BatchSource protocol, synthetic rows, the bamba.data loader),
sft (chat/instruction data), checkpoint (DCP save/load, fall-back past a corrupt one),
safe_dcp (DCP reads that cannot run code), budget (memory needed vs available, before
allocating), parallel (process group, FSDP2), metrics (JSONL, MFU, progress bar, PNG), trainer
(the loop; stops at a NaN/inf loss without saving).
"""
