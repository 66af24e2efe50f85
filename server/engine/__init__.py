"""The serving engine: requests, a scheduler that never touches tensors, and a model runner that owns all of them."""
