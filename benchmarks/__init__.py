"""Benchmarks of vcp-jax (`python -m benchmarks.<name>`; results in benchmarks/RESULTS.md).

They measure vcp-jax as `main.py` runs it: the process keeps the host memory a step frees
(vcp_jax/host_memory.py), set here, before any benchmark starts JAX's threads.
"""

from vcp_jax import host_memory

host_memory.keep_freed_memory()
