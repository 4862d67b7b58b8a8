"""Shared helpers with one job each, imported by the train_*.py scripts (rollouts and rewards for RL)."""
