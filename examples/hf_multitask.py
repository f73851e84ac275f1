"""A two-task BERT trained by the Hugging Face Trainer with a taskbalance method.

    pip install 'taskbalance[hf]'
    python examples/hf_multitask.py                    # IMTL, a few seconds on CPU
    python examples/hf_multitask.py --method nash_mtl

A small BERT built from a config (random initialisation, nothing downloaded) reads random
token sequences and feeds two heads: a regression ('count': how many tokens are below 10, a
loss near 20 at first) and a 3-class classification ('first': the first token modulo 3, a loss
near 1). The model returns both losses under ``task_losses`` and the pooled
representation under ``features``; MultiTaskTrainer does the rest. The method's weights appear
in the Trainer's logs under taskbalance/weight/<task>.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    PrinterCallback,
    TrainingArguments,
)

import taskbalance
from taskbalance.integrations.huggingface import MultiTaskTrainer

TASKS = ["count", "first"]
VOCAB = 30
LENGTH = 12


class TwoTaskBert(BertPreTrainedModel):
    """A BERT encoder shared by a regression head and a classification head."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.count_head = nn.Linear(config.hidden_size, 1)
        self.first_head = nn.Linear(config.hidden_size, 3)
        self.post_init()

    def forward(self, input_ids, attention_mask, count, first):
        z = self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        losses = {
            "count": F.mse_loss(self.count_head(z).squeeze(-1), count),
            "first": F.cross_entropy(self.first_head(z), first),
        }
        return {"task_losses": losses, "features": z}


def dataset(samples: int = 256) -> list[dict[str, torch.Tensor]]:
    """Random token sequences and their two targets."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (samples, LENGTH), generator=gen)
    count = (ids < 10).sum(1).float()
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "count": count[i],
            "first": ids[i, 0] % 3,
        }
        for i in range(samples)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="imtl", help="a registry name (taskbalance methods)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
    )
    with tempfile.TemporaryDirectory() as folder:
        trainer = MultiTaskTrainer(
            model=TwoTaskBert(config),
            args=TrainingArguments(
                output_dir=folder,
                per_device_train_batch_size=32,
                max_steps=args.steps,
                learning_rate=5e-3,
                logging_steps=10,
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                disable_tqdm=True,
            ),
            train_dataset=dataset(),
            method=taskbalance.get_method(args.method, tasks=TASKS),
        )
        trainer.remove_callback(PrinterCallback)  # the summary below instead
        trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            weights = ", ".join(f"{t} {entry[f'taskbalance/weight/{t}']:.3f}" for t in TASKS)
            losses = ", ".join(f"{t} {entry[f'taskbalance/loss/{t}']:.3f}" for t in TASKS)
            print(f"step {entry['step']:3d}  losses: {losses}  weights: {weights}")


if __name__ == "__main__":
    main()
