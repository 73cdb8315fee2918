"""A GPU-free stand-in for vLLM's OpenAI-compatible server, used by the gateway's tests.

Run it as ``python tests/testengine/server.py --port 0`` (prints ``READY http://host:port``)
or use :class:`testengine.harness.EngineProcess` from a pytest fixture.
"""
