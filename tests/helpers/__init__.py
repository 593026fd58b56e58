"""Test helpers shared across the suite (tiny HF checkpoints, torchrun launcher)."""
