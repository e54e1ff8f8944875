"""Hydra sweeper plugin running Optuna (>= 4) studies for bloodcell: ``hydra/sweeper=bloodcell_optuna``.

Hydra imports every public module of this package at start-up (for any Hydra app), so modules without a
leading underscore import nothing heavier than Hydra; Optuna and MLflow load when a sweep starts.
"""
