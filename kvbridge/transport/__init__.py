"""Layer-granular KV transports (shm, tcp; nixl and deepep adapters); see base.py."""
