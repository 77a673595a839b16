"""The step-level engine: generations advanced side by side one sampler step at a time, their forwards merged.

A generation is a step generator (DiffusionSampler.run_steps, SafeGenerator.generate_steps) that
yields after each sampler step. `advance(generations)` is one round, one step of each: `safegen
serve` (serve/batcher.py) and `safegen detoxify` (batch.py) run their generations in such rounds, so
a generation joins at any round and leaves as soon as it is done, each with its own prompt length,
its own position in its blocks and its own cache.

Within a round the steps run as greenlets on the calling thread. When a step asks the model for a
forward that can be merged, it parks; once every step of the round has parked or finished, the
parked forwards run as one model call per kind and shape, and each step resumes with its own rows'
logits. Merged are:
- `forward_queries` (a cached step's block or its suffix, a proposal's holes): the query tokens of
  every call, however many each has, go through the token-wise layers as one sequence, and each
  call attends to its own cache (safegen.models.kvcache.forward_queries_many);
- prefills (a block's new cache, a pool's drafts) and full forwards (the uncached sampler): each
  sequence left padded to the longest, which LLaDA's packing of real tokens (models/llada.py) hides
  from it; a prefill's cache is cut back to its own width and packing
  (safegen.models.kvcache.prefill_many).

A row's tokens do not depend on what it was merged with. Its attention sees its own keys only, and a
linear layer computes each output row from its input row; what could differ is the rounding of a
matrix product over more rows, where a BLAS library picks its blocking by the row count. On CPU
(float32 and bfloat16, PyTorch's oneDNN/MKL) tests/test_engine.py finds every row's tokens equal alone
and merged; on a GPU a cuBLAS kernel chosen for the merged shape can round differently, and then a
near tie between two tokens can go either way (benchmarks/gpu_check.py counts such rows).

The steps share one thread, so a step that parks inside `torch.inference_mode()` leaves that mode
to whatever runs next: a round runs wholly in inference mode, so every step sees it on.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import greenlet

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: batch.py imports this module, and a batch run's driver (or a
# test's fake generator) need not pay for importing torch.


class Generation:
    """One generation: `start()` returns its step generator (or its result at once, a one-round
    generation), called at its first step, on the engine's thread."""

    def __init__(self, start: Callable[[], object]):
        self.start = start
        self.steps = None
        self.done = False
        self.result: object = None  # its return value, or the exception that ended it
        self.steps_run = 0

    def step(self) -> None:
        """One sampler step; the first one starts the generation. An exception ends it (its result)."""
        try:
            if self.steps is None:
                out = self.start()
                if not inspect.isgenerator(out):
                    self.result, self.done = out, True
                    return
                self.steps = out
            next(self.steps)
            self.steps_run += 1
        except StopIteration as finished:
            self.result, self.done = finished.value, True
        except Exception as error:
            self.result, self.done = error, True

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()


@dataclass
class Counters:
    """What the engine merged (for /metrics and benchmarks): model calls made, and forwards asked."""

    calls: int = 0
    forwards: int = 0


counters = Counters()


# ---------------------------------------------------------------------------- the forwards a step asks
class _Step(greenlet.greenlet):
    """A generation's step run by `advance`: its forwards park, to be merged."""


@dataclass(eq=False)
class _Queries:
    model: object
    query_ids: torch.Tensor
    positions: torch.Tensor
    cache: object

    def key(self) -> tuple:
        return ("queries", id(self.model), self.query_ids.device)

    @staticmethod
    def run(requests: list["_Queries"]) -> list[torch.Tensor]:
        model = requests[0].model
        if len(requests) == 1 or not hasattr(model, "forward_queries_many"):
            return [r.model.forward_queries(r.query_ids, r.positions, r.cache) for r in requests]
        return model.forward_queries_many([(r.query_ids, r.positions, r.cache) for r in requests])


@dataclass(eq=False)
class _Prefill:
    model: object
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    logits_from: int

    def key(self) -> tuple:
        return ("prefill", id(self.model), self.input_ids.device)

    @staticmethod
    def run(requests: list["_Prefill"]) -> list[tuple]:
        model = requests[0].model
        calls = [(r.input_ids, r.attention_mask, r.logits_from) for r in requests]
        if len(requests) == 1 or not hasattr(model, "prefill_many"):
            return [model.prefill(*call) for call in calls]
        return model.prefill_many(calls)


@dataclass(eq=False)
class _Sequences:
    model: object
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    padding: bool  # the model takes an attention mask, so sequences of other lengths can join

    def key(self) -> tuple:
        width = None if self.padding else self.input_ids.shape[1]
        return ("sequences", id(self.model), width, self.input_ids.device)

    @staticmethod
    def run(requests: list["_Sequences"]) -> list[torch.Tensor]:
        import torch

        model = requests[0].model
        if len(requests) == 1:
            r = requests[0]
            return [_logits(model, r.input_ids, r.attention_mask)]
        width = max(r.input_ids.shape[1] for r in requests)
        if not requests[0].padding:  # same width, no masks
            logits = _logits(model, torch.cat([r.input_ids for r in requests]), None)
            return list(logits.split([len(r.input_ids) for r in requests]))
        ids, masks = [], []
        for r in requests:
            n, length = r.input_ids.shape
            pad = width - length
            ids.append(torch.nn.functional.pad(r.input_ids, (pad, 0), value=0))
            mask = torch.ones((n, length), dtype=torch.long, device=r.input_ids.device) \
                if r.attention_mask is None else r.attention_mask.long()
            masks.append(torch.nn.functional.pad(mask, (pad, 0), value=0))
        logits = _logits(model, torch.cat(ids), torch.cat(masks))
        out, start = [], 0
        for r in requests:
            n, length = r.input_ids.shape
            out.append(logits[start:start + n, width - length:])
            start += n
        return out


def _logits(model, input_ids, attention_mask):
    import torch

    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = model(**kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _ask(request):
    """The request's logits: merged with the round's other steps' when an engine round runs this step."""
    current = greenlet.getcurrent()
    if isinstance(current, _Step):
        return current.parent.switch(request)
    return type(request).run([request])[0]


def forward_queries(model, query_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """model.forward_queries(query_ids, positions, cache), merged with other generations' in a round."""
    return _ask(_Queries(model, query_ids, positions, cache))


def prefill(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], logits_from: int) -> tuple:
    """model.prefill(input_ids, attention_mask, logits_from): (logits, cache), merged with other
    generations' prefills in a round."""
    return _ask(_Prefill(model, input_ids, attention_mask, logits_from))


def forward(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
            takes_mask: bool = True) -> torch.Tensor:
    """The logits of model(input_ids, attention_mask), merged with other generations' full forwards in
    a round (left padded: only for a model that takes an attention mask)."""
    return _ask(_Sequences(model, input_ids, attention_mask if takes_mask else None, takes_mask))


# ---------------------------------------------------------------------------- a round
def advance(generations: list[Generation], merge: bool = True) -> None:
    """One step of each generation (its first starts it), their mergeable forwards merged."""
    if not merge:
        for g in generations:
            g.step()
        return
    import torch

    steps: list[_Step] = []
    try:
        with torch.inference_mode():
            parked: dict[_Step, object] = {}
            for g in generations:
                step = _Step(g.step)
                steps.append(step)
                request = step.switch()
                if not step.dead:
                    parked[step] = request
            while parked:
                buckets = defaultdict(list)
                for step, request in parked.items():
                    buckets[request.key()].append((step, request))
                parked = {}
                for items in buckets.values():
                    results = _run([r for _, r in items])
                    for (step, _), result in zip(items, results):
                        request = step.throw(result) if isinstance(result, BaseException) else step.switch(result)
                        if not step.dead:
                            parked[step] = request
    except BaseException:
        # Ctrl-C (or another exception that is not a step's own) while some steps are parked: end
        # them, so that their generations are no longer executing and can be closed.
        for step in steps:
            if not step.dead:
                step.throw(greenlet.GreenletExit)
        raise


def _run(requests: list) -> list:
    """The requests' logits from one model call, or for each its own exception: when the merged call
    fails (out of memory, say), each runs alone, so that one request's failure is its own."""
    kind = type(requests[0])
    counters.forwards += len(requests)
    counters.calls += 1
    try:
        return kind.run(requests)
    except Exception as error:
        if len(requests) == 1:
            return [error]
    results = []
    for request in requests:
        counters.calls += 1
        try:
            results.append(kind.run([request])[0])
        except Exception as error:
            results.append(error)
    return results
