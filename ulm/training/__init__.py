"""The trainer's parts; `ulm.train` runs the loop with them and `ulm.evaluate` judges a checkpoint.

  tasks.py    what a run trains on (TokenData, AdditionData): batches, validation, test and checkpoint metadata
  device.py   processes (torchrun), devices, mixed precision and the collective operations the loop needs
  optim.py    AdamW parameter groups and the learning-rate schedules
  loss.py     the language-model loss, in training and as a mean over evaluation batches
  state.py    the `best` and `last` checkpoints, the trainer state beside `last`, and resuming from it
  metrics.py  the metrics log (metrics.jsonl) and its loss plot
"""
