"""Training: data (text shards, synthetic tasks), the loop, checkpoints, torchrun parallelism.

    from jambalab.train import Trainer, TrainArgs, DataSpec
    result = Trainer(config, TrainArgs(max_steps=100), DataSpec("stdlib"), "runs/x").run()

Recall tasks for ablations: jambalab.train.tasks (make_task, evaluate).
"""

from jambalab.train.loop import DataSpec, TrainArgs, Trainer, TrainingDiverged, TrainResult, lr_at

__all__ = ["Trainer", "TrainArgs", "DataSpec", "TrainResult", "TrainingDiverged", "lr_at"]
