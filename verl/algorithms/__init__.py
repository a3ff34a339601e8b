"""The RL algorithms as pure tensor functions in registries (advantages, policy losses, loss
aggregation, KL): imported by the trainer (advantages, KL in the reward) and by the workers (losses)."""
