"""Integrations with training frameworks, each an optional extra.

- :mod:`taskbalance.integrations.lightning`: ``MultiTaskMixin`` for a PyTorch Lightning
  ``LightningModule`` (``pip install 'taskbalance[lightning]'``);
- :mod:`taskbalance.integrations.huggingface`: ``MultiTaskTrainer``, a Hugging Face
  ``Trainer`` (``pip install 'taskbalance[hf]'``).

Neither framework is imported here (nor by ``import taskbalance``): import the submodule you
need. :func:`step_metrics` names a step's record for any logger.
"""

from taskbalance.integrations.common import step_metrics

__all__ = ["step_metrics"]
