"""The Tinker API's protobuf wire format, read and written with the official ``tinker`` package's
generated messages (``tinker.proto.tinker_public_pb2``): the ``forward_backward`` request body,
and the ``ForwardBackwardOutput`` and ``SampleResponse`` results the client decodes
(``tinker.proto.response_conv``).

Only what the engine runs is accepted: text chunks (``encoded_text``), dense or CSR tensors of
one dimension; an image or audio chunk is a clear error.
"""

from __future__ import annotations

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from coserve_jax.finetune.training_run import Datum

PROTO_CONTENT_TYPE = "application/x-protobuf"

_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


class WireError(ValueError):
    """A request body that is not a valid Tinker message for this server."""


def _tensor(msg, name: str) -> np.ndarray:
    dtype = _NUMPY.get(msg.dtype)
    if dtype is None:
        raise WireError(f"loss_fn_inputs[{name!r}]: unsupported dtype {msg.dtype}")
    shape = list(msg.shape)
    if msg.HasField("sparse_csr"):  # (the client sends 2-D tensors as CSR)
        if len(shape) != 2 or shape[1] != 1:
            raise WireError(f"loss_fn_inputs[{name!r}]: shape {shape}: one value per position is supported")
        csr = msg.sparse_csr
        values = np.frombuffer(csr.values, dtype)
        crow = np.frombuffer(csr.crow_indices, np.int64)
        col = np.frombuffer(csr.col_indices, np.int64)
        dense = np.zeros(shape, dtype)
        for r in range(shape[0]):
            dense[r, col[crow[r]:crow[r + 1]]] = values[crow[r]:crow[r + 1]]
        return dense[:, 0]
    arr = np.frombuffer(msg.dense, dtype)
    if shape and int(np.prod(shape)) != arr.size:
        raise WireError(f"loss_fn_inputs[{name!r}]: shape {shape} does not match {arr.size} values")
    if len(shape) > 1 and any(s != 1 for s in shape[1:]):
        raise WireError(f"loss_fn_inputs[{name!r}]: shape {shape}: one value per position is supported")
    return arr


def parse_forward_backward(body: bytes) -> dict:
    """A ``forward_backward`` request body as ``{model_id, seq_id, loss_fn, loss_fn_config,
    forward_only, data: [Datum]}``.

    Raises:
        WireError: not a ``ForwardBackwardRequest``, a non-text chunk, or a tensor that is not
            one value per position.
    """
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf's DecodeError
        raise WireError(f"the body is not a ForwardBackwardRequest protobuf: {e}") from None
    config: dict = {}
    for k, v in msg.loss_fn_config_v2.items():
        if v.WhichOneof("value") == "text":
            raise WireError(f"loss_fn_config[{k!r}]: text values are not supported")
        config[k] = v.number
    for k, v in msg.loss_fn_config.items():
        config.setdefault(k, v)
    data = []
    for i, d in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in d.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise WireError(f"datum {i}: only text (encoded_text) chunks are supported, got {kind}")
            tokens += np.frombuffer(chunk.encoded_text.tokens, np.int32).tolist()
        inputs = {name: _tensor(t, name).tolist() for name, t in d.loss_fn_inputs.items()}
        data.append(Datum(tokens, inputs))
    return {"model_id": msg.model_id, "seq_id": msg.seq_id, "loss_fn": msg.loss_fn,
            "loss_fn_config": config or None, "forward_only": msg.forward_only, "data": data}


def forward_backward_output(loss_fn_outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """A ``ForwardBackwardOutput`` message: one ``ArrayRecord`` holding each output field of every
    datum as a float32 ``BatchedTensor`` (byte offsets per datum)."""
    msg = pb.ForwardBackwardOutput()
    msg.loss_fn_output_type = "ArrayRecord"
    for k, v in metrics.items():
        msg.metrics[k] = float(v)
    if loss_fn_outputs:
        record = msg.loss_fn_outputs.add()
        record.num_datums = len(loss_fn_outputs)
        for name in loss_fn_outputs[0]:
            arrays = [np.asarray(o[name], np.float32).ravel() for o in loss_fn_outputs]
            offsets = np.zeros(len(arrays) + 1, np.int64)
            offsets[1:] = np.cumsum([a.nbytes for a in arrays])
            bt = record.fields[name]
            bt.data = b"".join(a.tobytes() for a in arrays)
            bt.offsets = offsets.tobytes()
            bt.dtype = pb.DTYPE_FLOAT32
    return msg.SerializeToString()


def sample_response(sequences: list[tuple[list[int], list[float] | None, str]],
                    prompt_logprobs: list[float] | None = None) -> bytes:
    """A ``SampleResponse`` message from ``(tokens, logprobs, stop_reason)`` per sequence
    (``stop_reason``: ``"stop"`` or ``"length"``) and, if asked, the prompt's logprobs (NaN where
    none, e.g. the first token)."""
    msg = pb.SampleResponse()
    for tokens, logprobs, stop in sequences:
        s = msg.sequences.add()
        s.stop_reason = pb.STOP_REASON_STOP if stop == "stop" else pb.STOP_REASON_LENGTH
        s.tokens = np.asarray(tokens, np.int32).tobytes()
        if logprobs is not None:
            s.logprobs = np.asarray(logprobs, np.float32).tobytes()
    if prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(prompt_logprobs, np.float32).tobytes()
    return msg.SerializeToString()
