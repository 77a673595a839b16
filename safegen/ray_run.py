"""`safegen detoxify --ray`: the batch run on a Ray cluster (Ray Data), each sample written exactly once,
every record the one a single process writes.

The driver (the `safegen detoxify` process) reads the prompts, takes the report file
(safegen/report_file.py: its lock, the configuration check, what is already done) and makes a Ray
dataset of the samples still to do, each with its prompt index, sample number and seed (seed + k for
sample k = prompt index · samples + sample, as in one process). `Dataset.map_batches` hands batches
of them to a pool of `Detoxifier` actors, one SafeGenerator each (one GPU each where there are GPUs),
which return one JSON record per sample; the driver writes what comes back, in whatever order, and
at the end the file is put in sample order.

Exactly once, whatever fails:
- an actor that dies (its process killed, its node lost) is restarted by Ray and its batch run
  again; a batch that ran twice, or whose first run's results arrived after all, is harmless, since
  the report file writes a sample only if it is not in the file yet;
- a driver that dies loses only what it had not written; run the same command again and it skips
  every sample in the file (an unfinished last line is cut off) and does the rest;
- a sample's record depends only on its prompt, seed and settings (safegen.sampling.rng keys every
  draw by the row's seed; the engine's merged forwards keep rows apart), so the same record comes
  back from any worker, in any batch.

`Detoxifier` is public: a team that builds its own Ray pipeline passes it to `map_batches` with the
columns prompt_index, line, sample, seed and text, and gets a `record` column of JSON strings.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, Optional, Sequence

from .errors import SafegenError
from .prompts import PromptLine

log = logging.getLogger(__name__)

COLUMNS = ("prompt_index", "line", "sample", "seed", "text")


class RayError(SafegenError):
    """--ray cannot run: the package is missing, the cluster is unreachable or too small."""


class Detoxifier:
    """A callable class for `ray.data.Dataset.map_batches`: holds one SafeGenerator, built in the actor
    (SafeGenerator.from_pretrained's arguments), and turns a batch of samples (numpy columns
    prompt_index, line, sample, seed, text) into their report records ({"record": JSON strings}),
    the lines `safegen detoxify` writes. Up to `batch_size` samples run side by side on the step-level
    engine; `source` names the prompt file in warnings (source:line)."""

    def __init__(self, model: str, policy: Any = "default", quantization: Optional[str] = "4bit",
                 revision: Optional[str] = None, trust_remote_code: bool = False, device_map: Any = "auto",
                 dtype=None, sampling=None, refinement=None, report_before: bool = True, refine: bool = True,
                 batch_size: int = 8, threads: Optional[int] = None, source: str = "prompts"):
        from .generator import SafeGenerator
        from .threads import set_threads

        set_threads(threads)
        self.generator = SafeGenerator.from_pretrained(
            model, quantization=quantization, policy=policy, revision=revision, trust_remote_code=trust_remote_code,
            device_map=device_map, dtype=dtype, sampling=sampling, refinement=refinement, report_before=report_before)
        self.refine, self.batch_size, self.source = refine, batch_size, source

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .batch import generate_records, text_generate

        todo = [(PromptLine(int(i), int(line), str(text)), int(s), int(seed))
                for i, line, s, seed, text in zip(*(batch[c] for c in COLUMNS))]
        generate = text_generate(self.generator, self.refine, self.source)
        records = [r for done in generate_records(todo, generate, self.batch_size) for r in done]
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def connect(address: Optional[str], workers: int, gpus_per_worker: Optional[float]):
    """The `ray` module, connected: to the cluster at `address` ("" or None: a new local instance).
    A one-line RayError, before any model loads, for a missing package, an unreachable address or a
    cluster with fewer GPUs than asked."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayError("--ray needs Ray Data: pip install 'safegen[ray]'") from None
    if address:
        _check_reachable(address)
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
            raise RayError(f"--ray: cannot reach {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    need = workers * gpus_per_worker if gpus_per_worker is not None else 0
    have = ray.cluster_resources().get("GPU", 0)
    if need > have:
        raise RayError(f"--ray-workers {workers} x --ray-gpus-per-worker {gpus_per_worker:g} asks for {need:g} GPUs; "
                       f"the cluster has {have:g}")
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A host:port (or ray://host:port) address must accept a connection: ray.init would retry a
    dead one for minutes before it said so."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" and the like: ray.init knows them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayError(f"--ray: cannot reach the Ray cluster at {address!r} ({e.strerror or e})") from None


def gpus_per_worker(ray, asked: Optional[float]) -> float:
    """The GPUs of each actor: as asked, else 1 where the cluster has GPUs, else 0."""
    if asked is not None:
        return asked
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def detoxify(ray, prompts: Sequence[PromptLine], report, detoxifier: dict, samples: int, seed: int,
             workers: int, gpus_per_worker: float, progress: bool = True):
    """Run the samples `report` does not hold yet on `workers` Detoxifier actors and write what they
    return through `report` (a ReportFile, entered); returns the finished output's summary."""
    from tqdm import tqdm

    from .batch import _todo
    from .shards import Shard

    report.open()
    todo = [dict(zip(COLUMNS, (p.index, p.line, s, sd, p.text)))
            for p, s, sd in _todo(prompts, samples, seed, Shard(), report.done)]
    bar = tqdm(total=report.done.total, initial=report.done.count, desc="detoxify [ray]", unit="sample",
               file=sys.stderr, disable=not progress)
    try:
        if todo:
            # A map batch holds a few engine batches: enough to keep an actor's engine full, little to
            # redo when an actor dies.
            per_call = max(1, min(2 * detoxifier.get("batch_size", 8), -(-len(todo) // workers)))
            dataset = ray.data.from_items(todo, override_num_blocks=-(-len(todo) // per_call))
            results = dataset.map_batches(
                Detoxifier, fn_constructor_kwargs={**detoxifier, "threads": detoxifier.get("threads") or 1},
                batch_size=per_call, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                num_gpus=gpus_per_worker, num_cpus=1, max_restarts=-1, max_task_retries=-1)
            for out in results.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(report.write(json.loads(r) for r in out["record"]))
    finally:
        report.close()
        bar.close()
    return report.finish()
