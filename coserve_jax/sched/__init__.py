"""Host-side scheduling: pure Python over plain data, no JAX.

The KV-cache page manager, the inference scheduler, the step-policy interface and its policies
(hybrid and baselines), and the step latency model live here. Nothing in this package imports ``jax``; the jitted step never calls back
into it.
"""
