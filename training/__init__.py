"""Trains task prompts on the frozen base model with prompt_core's forward, scores them, exports and pushes them."""
