"""peft_arena: which finetuning method learns the most and forgets the least, tracked in MLflow."""

__version__ = "0.1.0"
