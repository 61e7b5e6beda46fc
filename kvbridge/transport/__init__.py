"""Layer-granular KV transports (shm, tcp; nixl and deepep adapters; CUDA IPC for same-GPU
reads); see base.py. registry.py is the way in: a node opens transports by name through it."""
