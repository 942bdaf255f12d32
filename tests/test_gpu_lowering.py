"""What runs on a GPU lowers for CUDA on this CPU (no GPU needed), at Llama-3.1-8B shape with
abstract weights (:func:`~coserve_jax.models.loader.init_abstract`, bf16):

* the Pallas paged-attention kernel becomes one Pallas Triton custom call on every jax of the
  supported range (without explicit Triton ``compiler_params``, jax <= 0.11.1 picks Mosaic GPU
  for a GPU lowering, whose shared-memory check rejects the kernel at any real cache size);
* the whole fused step (finetuning off and on), the backward slice and the optimizer step: the
  kernel is the step's one custom call, the KV cache, the seen-token mask and the finetuning
  buffers are donated (input/output aliases in the lowered module), and at the checkpoint's
  131072-token context nothing is gathered or sliced to ``max_model_len`` width (the reference
  attention, lowered the same way, does, in its widest live-width branch: the check can fail).
"""

import json
import pathlib
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


# ---- the whole step, the backward slice and the optimizer step -------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTEXT = 131072  # Llama-3.1-8B's max_position_embeddings
PAGE = 16
TOKENS, SEQS = 128, 64  # a mixed bucket


@pytest.fixture(scope="module")
def llama8b():
    from coserve_jax.models import ModelConfig, init_abstract
    from coserve_jax.models.lora_pool import LoRAPoolConfig

    cfg = ModelConfig.from_hf_dict(json.loads((ROOT / "configs" / "models" / "llama-3.1-8b" / "config.json").read_text()))
    assert cfg.max_model_len == CONTEXT
    return init_abstract(cfg, dtype="bfloat16", lora=LoRAPoolConfig(4, 16))


def _runner(model, impl: str, finetune: bool):
    from coserve_jax.engine.config import EngineConfig
    from coserve_jax.engine.model_runner import ModelRunner
    from coserve_jax.parallel.mesh import make_mesh
    from coserve_jax.parallel.rules import ShardingRules

    rules = ShardingRules(model.config, make_mesh(1))
    pool = model.lora.config
    knobs = dict(max_finetune_jobs=1, finetune_max_seq_len=2048, max_finetune_tokens=64) if finetune else dict(max_finetune_jobs=0)
    config = EngineConfig.resolve(
        model.config, has_lora_pool=True, kv_cache_heads=rules.kv_cache_heads, dtype_itemsize=2,
        max_loras=pool.max_loras, max_lora_rank=pool.max_lora_rank, lora_target_modules=pool.target_modules,
        max_model_len=CONTEXT, page_size=PAGE, num_kv_pages=1024, attention_impl=impl,
        token_buckets=[TOKENS], seq_buckets=[SEQS], max_num_batched_tokens=TOKENS, max_num_seqs=SEQS, **knobs,
    )
    assert config.max_pages_per_seq * PAGE == CONTEXT
    return ModelRunner(model, rules, config, abstract_only=True)


def _lower_step(runner) -> str:
    from coserve_jax.engine.step import Bucket, abstract
    from coserve_jax.engine.step_inputs import abstract_inputs

    step = runner.step_fn
    args = abstract((runner.state, runner.k_cache, runner.v_cache, runner.ft_buffers, runner.seen))
    prev = jax.ShapeDtypeStruct((SEQS,), jnp.int32)
    inputs = abstract_inputs(step.dims(Bucket(TOKENS, SEQS)))
    return step._jitted.trace(*args, prev, inputs).lower(lowering_platforms=("cuda",)).as_text()


_MLIR_DTYPES = {"bfloat16": "bf16", "float32": "f32", "bool": "i1", "int32": "i32"}


def _mlir_type(x) -> str:
    return "x".join([*map(str, x.shape), _MLIR_DTYPES[jnp.dtype(x.dtype).name]])


def _donated(text: str) -> list[str]:
    """Tensor types of the lowered ``main``'s arguments that alias an output (donated)."""
    params = re.search(r"func\.func public @main\((.*?)\) ->", text, re.S).group(1)
    return [m.group(1) for m in re.finditer(r"%arg\d+: tensor<([^>]*)>\s*(\{[^}]*\})?", params)
            if m.group(2) and ("tf.aliasing_output" in m.group(2) or "jax.buffer_donor" in m.group(2))]


def _custom_calls(text: str) -> list[str]:
    return re.findall(r"stablehlo\.custom_call @([^\s(]+)\(", text)


def _context_wide(text: str, max_pages: int) -> list[str]:
    """Result types of gathers and dynamic slices with a dimension of ``max_model_len`` tokens
    or of ``max_model_len / page_size`` pages."""
    results = re.findall(r"stablehlo\.(?:gather|dynamic_slice|dynamic_gather)\b.*?-> tensor<([^>]*)>", text)
    wide = {str(CONTEXT), str(max_pages)}
    return [r for r in results if wide & set(r.split("x")[:-1])]


@pytest.mark.parametrize("finetune", [False, True], ids=["finetuning_off", "finetuning_on"])
def test_step_lowers_for_cuda_at_8b(llama8b, finetune):
    runner = _runner(llama8b, "pallas", finetune)
    text = _lower_step(runner)
    assert _custom_calls(text) == ["__gpu$xla.gpu.triton"]  # the kernel, once (the layer scan's body)
    assert "mosaic" not in text.lower()
    donated = _donated(text)
    want = [runner.k_cache, runner.v_cache, runner.seen]
    if finetune:
        want += jax.tree.leaves(runner.ft_buffers)
        assert len(jax.tree.leaves(runner.ft_buffers)) == 2 + 2 * len(llama8b.lora.config.target_modules)
    assert sorted(donated) == sorted(_mlir_type(x) for x in want)
    assert _context_wide(text, runner.config.max_pages_per_seq) == []


def test_reference_step_lowered_the_same_way_gathers_to_the_context_in_one_branch(llama8b):
    """The control: the check above finds context-wide gathers where there are some. The
    reference attention gathers the live pages, bucketed: the widest of its branches is the
    whole context (taken only when a sequence is that long), the narrowest 512 tokens."""
    runner = _runner(llama8b, "reference", False)
    text = _lower_step(runner)
    pages = runner.config.max_pages_per_seq
    wide = _context_wide(text, pages)
    assert f"{SEQS}x{pages}x{PAGE}x8x128xbf16" in wide, wide  # every sequence's pages, to the context
    assert f"{TOKENS}x{CONTEXT}x8x128xbf16" in wide, wide  # each token's keys, to the context
    assert re.search(rf"stablehlo\.gather\b.*?-> tensor<{SEQS}x{512 // PAGE}x{PAGE}x8x128xbf16>", text)  # 512 tokens
    assert "__gpu$xla.gpu.triton" not in _custom_calls(text)


def test_backward_slice_lowers_for_cuda_at_8b(llama8b):
    from coserve_jax.finetune import fused

    runner = _runner(llama8b, "pallas", True)
    layout = runner.config.finetune
    length = layout.seq_buckets[-1]
    fn = jax.jit(fused.make_backward_fn(runner.step_fn.graphdef, llama8b.config, layout, length, runner.rules),
                 donate_argnums=1)
    state, buffers = runner._abstract_state
    text = fn.trace(state, buffers, fused.abstract_backward_inputs(length, runner.rules.replicated)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert sorted(_donated(text)) == sorted(_mlir_type(x) for x in jax.tree.leaves(buffers))
    assert _custom_calls(text) == []
    assert _context_wide(text, runner.config.max_pages_per_seq) == []


def test_optimizer_step_lowers_for_cuda_at_8b(llama8b):
    from coserve_jax.finetune.config import FinetuneConfig, LoRAConfig
    from coserve_jax.finetune.optim import init_lora, make_optimizer, learning_rate_schedule, make_update_fn

    runner = _runner(llama8b, "pallas", True)
    mc, pool = llama8b.config, llama8b.lora.config
    cfg = FinetuneConfig(lora=LoRAConfig(r=8, target_modules="all-linear"), warmup_steps=10)
    shapes = {}
    for m in pool.target_modules:
        d_in, d_out = mc.module_dims(m)
        shapes[m] = ((mc.num_layers, d_in, pool.max_lora_rank), (mc.num_layers, pool.max_lora_rank, d_out))
    tx = make_optimizer(cfg, 100)
    update = make_update_fn(tx, learning_rate_schedule(cfg, 100), cfg.lora.r, pool.max_lora_rank, jnp.bfloat16, shapes)
    params = jax.eval_shape(lambda: init_lora(mc, cfg.lora, 0))
    opt_state = jax.eval_shape(tx.init, params)
    grads = runner.ft_buffers.grads
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    text = jax.jit(update, donate_argnums=(2,)).trace(params, opt_state, grads, i32, i32).lower(
        lowering_platforms=("cuda",)).as_text()
    assert sorted(_donated(text)) == sorted(_mlir_type(x) for x in jax.tree.leaves(grads))
    assert _custom_calls(text) == []
