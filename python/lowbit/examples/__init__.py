"""Runnable examples: the low-precision pretraining demo (python -m lowbit.examples.pretrain)."""
