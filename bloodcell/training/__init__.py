"""The training recipe as named steps: run data, setup, the two phases, callbacks, checkpoints and resume,
the phase-1 cache, repeats and folds, distillation targets."""
