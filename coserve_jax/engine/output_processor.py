"""Output processing: a step's plain results into the caller's :class:`RequestOutput` objects.

Per request that sampled a token: append it (and its logprobs), detokenize incrementally, match
stop strings (ending the request in the scheduler), and finish the output when the request ended
(vLLM v1's ``OutputProcessor`` plays the same part). A parallel-sampling request (``n > 1``) is
``n`` child requests whose outputs fold into one :class:`RequestOutput` (vLLM's
``ParentRequest``). Host-side Python over plain data: it reads
the scheduler's :class:`~coserve_jax.sched.outputs.SchedulerOutput` and the runner's
:class:`~coserve_jax.sched.outputs.StepResult`, never device arrays.
"""

from __future__ import annotations

from typing import Hashable

from coserve_jax.engine.detokenizer import IncrementalDetokenizer
from coserve_jax.engine.outputs import CompletionOutput, RequestOutput
from coserve_jax.sched.outputs import SchedulerOutput, StepResult
from coserve_jax.sched.request import Request
from coserve_jax.sched.scheduler import Scheduler


class OutputProcessor:
    """The live outputs of an engine's unfinished requests.

    Args:
        tokenizer: a ``transformers`` tokenizer, or ``None`` (token ids only: ``text`` stays empty).
        scheduler: the scheduler whose requests these are (stop strings end requests there).
    """

    def __init__(self, tokenizer, scheduler: Scheduler):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._outputs: dict[Hashable, RequestOutput] = {}
        self._detok: dict[Hashable, IncrementalDetokenizer | None] = {}
        self._requests: dict[Hashable, Request] = {}
        self._parent_of: dict[Hashable, tuple[RequestOutput, int]] = {}  # child id -> (parent output, completion index)
        self.children: dict[Hashable, list[Hashable]] = {}
        """Per unfinished parallel-sampling request: its children's ids, by completion index."""

    def add(self, req: Request, prompt_text: str | None, index: int, adapter: str | None) -> RequestOutput:
        """Start the output of a newly queued request."""
        params = req.params
        rid = req.request_id
        self._requests[rid] = req
        self._outputs[rid] = out = RequestOutput(
            request_id=rid, index=index, prompt=prompt_text, prompt_token_ids=req.prompt_token_ids, adapter=adapter or None,
            arrival_time=req.arrival_time,
            logprobs=[] if params.logprobs is not None else None,
            top_logprobs=[] if params.logprobs else None,
        )
        self._detok[rid] = (
            None if self.tokenizer is None
            else IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
            )
        )
        return out

    def add_parent(self, parent_id: Hashable, children: list[Request], prompt_text: str | None, index: int,
                   adapter: str | None) -> RequestOutput:
        """Start the outputs of a parallel-sampling request: one per child (completion ``i``
        is ``children[i]``) and the parent's, which :meth:`process` returns in their place."""
        first = children[0]
        parent = RequestOutput(
            request_id=parent_id, index=index, prompt=prompt_text, prompt_token_ids=first.prompt_token_ids,
            adapter=adapter or None, arrival_time=first.arrival_time,
            completions=[CompletionOutput(i, [], "") for i in range(len(children))],
        )
        self.children[parent_id] = [c.request_id for c in children]
        for i, child in enumerate(children):
            self.add(child, prompt_text, index, adapter)
            self._parent_of[child.request_id] = (parent, i)
        return parent

    def fold(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Replace the outputs of parallel-sampling children by their parents' (each parent
        once, its completions updated; a completion not updated here has empty deltas)."""
        if not self._parent_of:
            return outputs
        touched: dict[Hashable, RequestOutput] = {}
        for o in outputs:
            hit = self._parent_of.get(o.request_id)
            if hit is not None and hit[0].request_id not in touched:
                touched[hit[0].request_id] = hit[0]
                for c in hit[0].completions:
                    c.delta_token_ids, c.delta_text = [], ""
        out, seen = [], set()
        for o in outputs:
            hit = self._parent_of.get(o.request_id)
            if hit is None:
                out.append(o)
                continue
            parent, i = hit
            c = parent.completions[i]
            c.token_ids, c.text, c.logprobs, c.top_logprobs = o.token_ids, o.text, o.logprobs, o.top_logprobs
            c.finish_reason, c.finished, c.delta_token_ids, c.delta_text = o.finish_reason, o.finished, o.delta_token_ids, o.delta_text
            if o.first_token_time is not None:
                parent.first_token_time = min(parent.first_token_time or o.first_token_time, o.first_token_time)
            if o.first_scheduled_time is not None:
                parent.first_scheduled_time = min(parent.first_scheduled_time or o.first_scheduled_time, o.first_scheduled_time)
            if o.finished:
                parent.num_preemptions += o.num_preemptions
                parent.finish_time = o.finish_time if parent.finish_time is None else max(parent.finish_time, o.finish_time)
            if parent.request_id not in seen:
                seen.add(parent.request_id)
                out.append(parent)
        for parent in touched.values():
            c0 = parent.completions[0]
            parent.token_ids, parent.text, parent.logprobs, parent.top_logprobs = c0.token_ids, c0.text, c0.logprobs, c0.top_logprobs
            parent.finish_reason, parent.delta_token_ids, parent.delta_text = c0.finish_reason, c0.delta_token_ids, c0.delta_text
            parent.finished = all(c.finished for c in parent.completions)
            if parent.finished:
                for cid in self.children.pop(parent.request_id, ()):
                    self._parent_of.pop(cid, None)
        return out

    @property
    def requests(self) -> list[Request]:
        """The unfinished requests, in arrival order."""
        return list(self._requests.values())

    def process(self, plan: SchedulerOutput, result: StepResult, now: float) -> list[RequestOutput]:
        """Apply a step's results (after :meth:`Scheduler.update` took them).

        Returns:
            an output for every request that got a token or finished, with this step's
            ``delta_token_ids`` / ``delta_text``.
        """
        outputs = []
        logprobs, top = result.logprobs, result.top_logprobs
        for i, (rid, tok) in enumerate(zip(plan.request_ids, result.sampled)):
            if tok is None:
                continue
            req = self._requests.get(rid)
            o = self._outputs.get(rid)
            if o is None or req is None:  # aborted, or ended by a stop string, meanwhile
                continue
            o.token_ids.append(tok)
            o.delta_token_ids = [tok]
            if o.first_token_time is None:
                o.first_token_time = now
                o.first_scheduled_time = req.first_scheduled_time
            if o.logprobs is not None:
                o.logprobs.append(logprobs[i])
            if o.top_logprobs is not None:
                o.top_logprobs.append(top[i])
            o.num_preemptions = req.num_preemptions
            det = self._detok[req.request_id]
            if det is not None:
                det.add(tok)
                if det.stopped and not req.is_finished:
                    self.scheduler.finish(req.request_id)
            if req.is_finished:
                outputs.append(self.finalize(req, now))
            else:
                o.delta_text = det.take_delta() if det is not None else ""
                o.text += o.delta_text
                outputs.append(o)
        return self.fold(outputs)

    def finalize(self, req: Request, now: float) -> RequestOutput:
        """The finished output of an ended request (finish reason, the rest of its text)."""
        o = self._outputs.pop(req.request_id)
        det = self._detok.pop(req.request_id)
        self._requests.pop(req.request_id, None)
        if det is not None:
            o.delta_text = det.take_delta(final=True)
            o.text = det.text
        else:
            o.delta_text = ""
        o.finished = True
        o.finish_reason = req.finish_reason.value if req.finish_reason else None
        o.finish_time = now
        o.first_scheduled_time = req.first_scheduled_time
        o.num_preemptions = req.num_preemptions
        return o
