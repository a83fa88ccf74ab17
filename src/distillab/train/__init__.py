"""Training: one loop for teachers and students (`train`), in phases (`Trainer`).

    schedule.py   plan (steps, warmup, decay), learning rate, AdamW
    parallel.py   single process, DDP, FSDP2 behind one interface
    step.py       one optimizer step over micro-batches
    guard.py      non-finite losses, gradients and weights stop a run
    metrics.py    metrics.jsonl, TensorBoard, Weights & Biases
    rundir.py     the run directory: lock, recorded config, input binding on resume
    trainer.py    build -> restore -> fit -> finish
"""

from distillab.train.schedule import Plan, learning_rate, make_optimizer, make_plan
from distillab.train.step import StepResult, train_step
from distillab.train.trainer import Trainer, TrainResult, train

__all__ = ["Plan", "learning_rate", "make_optimizer", "make_plan", "StepResult", "train_step", "Trainer",
           "TrainResult", "train"]
