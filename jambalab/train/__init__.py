"""Training: data (text shards, synthetic tasks), the loop, checkpoints, torchrun parallelism.

Recall tasks for ablations: jambalab.train.tasks (make_task, evaluate).
"""
