"""Continual-learning experiments built on ewc_jax: data, configs and the training entry point."""
