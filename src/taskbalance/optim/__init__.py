"""Optimizers with per-task state: AdaTask's Adam, RMSprop and Adagrad."""

from taskbalance.optim.adatask import AdaTaskAdagrad, AdaTaskAdam, AdaTaskOptimizer, AdaTaskRMSprop

__all__ = ["AdaTaskAdagrad", "AdaTaskAdam", "AdaTaskOptimizer", "AdaTaskRMSprop"]
