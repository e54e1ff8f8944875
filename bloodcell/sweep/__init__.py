"""The Optuna side of a sweep trial (storage, pruning) and the tables of samplers and pruners that a study
names."""
