"""Training a stage of the chain: strategy, phases, checkpoints, resume, export at the end."""
