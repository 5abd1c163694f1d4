"""Synthetic recall tasks, one module each (docs/tasks.md). ``make(name, seed, **options)``."""

from kvfree.tasks.base import (
    IGNORE,
    TEST_SEEDS,
    TRAIN_SEEDS,
    TaskData,
    available_tasks,
    check_seed,
    derive_seed,
    example_accuracy,
    make,
    make_rng,
    seed_split,
    task_config,
    task_names,
)

__all__ = [
    "IGNORE",
    "TEST_SEEDS",
    "TRAIN_SEEDS",
    "TaskData",
    "available_tasks",
    "check_seed",
    "derive_seed",
    "example_accuracy",
    "make",
    "make_rng",
    "seed_split",
    "task_config",
    "task_names",
]
