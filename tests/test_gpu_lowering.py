"""The Pallas paged-attention kernel lowers for CUDA on this CPU (no GPU needed): at Llama-3.1-8B
shape it becomes one Pallas Triton custom call on every jax of the supported range. Without
explicit Triton ``compiler_params``, jax <= 0.11.1 picks Mosaic GPU for a GPU lowering, whose
shared-memory check rejects the kernel at any real cache size."""

import re

import jax
import jax.numpy as jnp
import pytest

from coserve_jax.kernels.ragged_paged_attention import ragged_paged_attention

HQ, HKV, D = 32, 8, 128  # Llama-3.1-8B attention
LAYERS = 32


def _lower(num_tokens: int, num_seqs: int, page_size: int, num_pages: int = 2048, max_pages: int = 128) -> str:
    sds = jax.ShapeDtypeStruct
    cache = sds((LAYERS, num_pages, page_size, HKV, D), jnp.bfloat16)
    args = (sds((num_tokens, HQ, D), jnp.bfloat16), cache, cache, sds((), jnp.int32), sds((num_seqs,), jnp.int32),
            sds((num_seqs, max_pages), jnp.int32), sds((num_seqs + 1,), jnp.int32), sds((), jnp.int32))
    traced = ragged_paged_attention.trace(*args, scale=D ** -0.5)
    return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("num_tokens,num_seqs", [(128, 128), (2048, 1), (2048, 64)], ids=["decode", "prefill", "mixed"])
def test_kernel_lowers_for_cuda_as_one_triton_call(num_tokens, num_seqs, page_size):
    text = _lower(num_tokens, num_seqs, page_size)
    targets = re.findall(r"stablehlo\.custom_call @([^\s(]+)\(", text)
    assert targets == ["__gpu$xla.gpu.triton"], targets
    assert "mosaic" not in text.lower()
