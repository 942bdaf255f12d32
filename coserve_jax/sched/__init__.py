"""Host-side scheduling: pure Python over plain data, no JAX.

The KV-cache page manager, the inference scheduler and the hybrid token scheduler live here
(issues 3 and 5). Nothing in this package imports ``jax``; the jitted step never calls back
into it.
"""
