"""The summary of a batch run, aggregated as its reports stream past: a few sums and a bitmap of the
prompts seen, whatever the number of reports."""
from __future__ import annotations

from typing import Iterable, Union


class RunningSummary:
    """Sums over the reports added so far; summary() gives the means."""

    MEANS = {  # summary key: what is averaged over the samples
        "toxic_rate_before": lambda r: float(r["toxic_before"]),
        "toxic_rate_after": lambda r: float(r["toxic_after"]),
        "mean_toxicity_before": lambda r: r["toxicity_before"]["aggregate"],
        "mean_toxicity_after": lambda r: r["toxicity_after"]["aggregate"],
        "rows_per_sample": lambda r: r["rows"],
        "rows_before_per_sample": lambda r: r["rows_before"],
        "reward_calls_per_sample": lambda r: r["reward_calls"],
        "flops_per_sample": lambda r: r.get("flops", 0.0),  # absent from reports written before FLOPs
        "flops_before_per_sample": lambda r: r.get("flops_before", 0.0),
    }

    def __init__(self):
        self.samples = 0
        self.prompts = 0
        self._prompts_seen = bytearray()  # one bit per prompt index
        self.sums = dict.fromkeys(self.MEANS, 0.0)
        self.refined = 0
        self.seconds = 0.0
        self.samplers: dict[str, int] = {}  # which sampler produced the samples (absent from older reports)

    def add(self, record: dict) -> None:
        self.samples += 1
        index = record["prompt_index"]
        byte, mask = index >> 3, 1 << (index & 7)
        if byte >= len(self._prompts_seen):
            self._prompts_seen.extend(bytes(max(byte + 1 - len(self._prompts_seen), len(self._prompts_seen))))
        if not self._prompts_seen[byte] & mask:
            self._prompts_seen[byte] |= mask
            self.prompts += 1
        for key, value in self.MEANS.items():
            self.sums[key] += value(record)
        self.refined += bool(record["refined"])
        self.seconds += record["seconds"]
        if "sampler" in record:
            self.samplers[record["sampler"]] = self.samplers.get(record["sampler"], 0) + 1

    def summary(self) -> dict:
        n = self.samples
        if n == 0:
            return {"samples": 0}
        out = {"samples": n, "prompts": self.prompts}
        out.update({key: total / n for key, total in self.sums.items()})
        out["refined"] = self.refined
        out["seconds"] = self.seconds
        if self.samplers:
            out["samplers"] = dict(sorted(self.samplers.items()))
        return out


def summarize(records: Union[Iterable[dict], RunningSummary]) -> dict:
    """The summary of reports, or of a RunningSummary (what run_batch returns)."""
    if isinstance(records, RunningSummary):
        return records.summary()
    running = RunningSummary()
    for record in records:
        running.add(record)
    return running.summary()


def format_summary(summary: dict) -> str:
    if not summary.get("samples"):
        return "no samples"
    s = summary
    rows = [
        ("samples (prompts)", f"{s['samples']} ({s['prompts']})"),
        ("toxic rate", f"{s['toxic_rate_before']:.3f} -> {s['toxic_rate_after']:.3f}"),
        ("mean toxicity", f"{s['mean_toxicity_before']:.4f} -> {s['mean_toxicity_after']:.4f}"),
        ("refined samples", f"{s['refined']}"),
        ("denoiser rows / sample", f"{s['rows_per_sample']:.1f} (+{s['rows_before_per_sample']:.1f} for 'before')"),
        # FLOPs are counted for LLaDA's architecture only (models/flops.py): say so rather than print 0.
        ("model GFLOPs / sample", f"{s['flops_per_sample'] / 1e9:.2f} "
                                  f"(+{s.get('flops_before_per_sample', 0.0) / 1e9:.2f} for 'before')"
         if s.get("flops_per_sample") else "not counted for this model (LLaDA and Dream only)"),
        ("reward texts / sample", f"{s['reward_calls_per_sample']:.1f}"),
        ("time", f"{s['seconds']:.1f} s"),
    ]
    if s.get("samplers"):  # reports written before samplers were recorded have none
        rows.append(("sampler", ", ".join(f"{name} ({n})" if len(s["samplers"]) > 1 else name
                                          for name, n in s["samplers"].items())))
    width = max(len(k) for k, _ in rows)
    header = f"{'':<{width}}  before -> after"
    return "\n".join([header] + [f"{k:<{width}}  {v}" for k, v in rows])
