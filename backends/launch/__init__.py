"""What runs outside tritonserver: the serve/demo/doctor CLI, deployments → model repositories,
finding and laying out tritonserver, starting and watching it, and clients. Nothing that runs
inside tritonserver imports this package (tests/test_layering.py)."""
