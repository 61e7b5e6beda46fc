"""Triton python-based backend ``pd_orchestrator``: the public ``llm`` / ``ensemble`` models.

Triton loads ``TritonPythonModel`` from this file. The class lives in
backends.serving.orchestrator_model: only backends/serving imports triton_python_backend_utils.
"""

from backends.serving.orchestrator_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
