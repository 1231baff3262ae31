"""Kernel backends behind mmgrad.ops; import them through the dispatcher, not directly."""
