"""Model modules implementing `backends.engine.model_api.CausalLM`, named like HF checkpoints."""
