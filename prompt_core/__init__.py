"""Model-facing core shared by the server and the trainer.

It owns the base-model loading, the model fingerprint, the prompt kinds and templates, and the tensor code that
injects virtual tokens and prefix key/values into a forward pass. It imports neither `server` nor `training`, so what
the trainer measures is what the server serves.
"""
