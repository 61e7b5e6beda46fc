"""The OpenAI-compatible front door: ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` over HTTP, forwarded to tritonserver's ``llm`` model over gRPC streaming.

Launch side: it runs beside tritonserver (``triton-pd openai`` or ``triton-pd serve
--openai-port``), never inside it, and talks to it only as a Triton gRPC client.

- ``protocol``: an OpenAI request body → one typed ``LlmRequest`` (or an ``OpenAIError``).
- ``bodies``: response bodies and SSE chunks in OpenAI's shapes.
- ``triton``: the gRPC side (one channel for every request, cancellation on disconnect).
- ``app``: the Starlette routes; ``server``: uvicorn, in the caller's thread (``cli``:
  ``triton-pd openai``) or on its own (``serve --openai-port``).
"""
