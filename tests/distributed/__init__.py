"""Tiny-model helpers for the callback/regularizer tests and the scripts torchrun launches."""
