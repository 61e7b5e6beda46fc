"""Triton python-based backend ``pd_worker``: one LLMEngine per model instance.

Triton loads ``TritonPythonModel`` from this file. The class lives in
backends.serving.worker_model: only backends/serving imports triton_python_backend_utils.
"""

from backends.serving.worker_model import TritonPythonModel

__all__ = ["TritonPythonModel"]
