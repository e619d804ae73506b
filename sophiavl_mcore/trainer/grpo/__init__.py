"""The GRPO (Trust-GRPO) trainer: build, rollout groups, reward stage, exchange, update, validation, metrics."""
