"""triton-pd: Triton backends (pd_worker, pd_orchestrator) and the engines beneath them."""
