"""A fingerprint of what safegen samples: one hash per configuration of the sampler, IterRef and the
baselines on the tiny model, and on an exact toy.

A refactor that must not change behaviour keeps every line of this script's output the same; run it
before and after and diff (`--json` writes the hashes to a file). The fast-sampling cases (`fast/...`)
also hash the counted FLOPs. It hashes the sequences and the
counted cost (rows, reward calls, proposals, acceptances), so a change in what a sample costs shows
too. Only public names of `safegen` are imported, plus the baselines and the toy, found where they
live.

    python -m benchmarks.behaviour_hash [--json OUT]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import tempfile

import torch


def _find(name: str, *modules: str):
    """`name` from the first of `modules` that has it (module paths may move; names stay)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{name} in none of {modules}")


# RefineConfig's field for which tokens a proposal re-masks: proposal_holes, formerly remask.
_HOLES = ("proposal_holes" if "proposal_holes" in importlib.import_module("safegen").RefineConfig.__dataclass_fields__
          else "remask")


FIELDS = ("sequences", "rows", "reward_calls", "proposed", "accepted")


def digest(out, fields=FIELDS) -> str:
    h = hashlib.sha256()
    for field in fields:
        value = getattr(out, field, None)
        if value is None:
            continue
        t = torch.as_tensor(value)
        h.update(field.encode())
        h.update(t.detach().cpu().to(torch.float64 if t.is_floating_point() else torch.long).numpy().tobytes())
    return h.hexdigest()[:16]


def token_reward(ids: torch.Tensor) -> torch.Tensor:
    """A reward that dislikes ids divisible by 7: deterministic, cheap, varied enough to accept and reject."""
    return -((ids % 7) == 0).double().sum(1)


def token_blame(ids: torch.Tensor) -> torch.Tensor:
    return ((ids % 7) == 0).double()


def tiny_cases(model_dir: str) -> dict[str, str]:
    from safegen import DiffusionSampler, IterRef, RefineConfig, SamplingConfig, load_model

    best_of_n = _find("best_of_n", "safegen.research.baselines", "safegen.baselines")
    svdd = _find("svdd", "safegen.research.baselines", "safegen.baselines")
    fk_steering = _find("fk_steering", "safegen.research.baselines", "safegen.baselines")

    model, tokenizer, profile = load_model(model_dir, quantization="none")
    torch.manual_seed(0)
    V = int(getattr(model.config, "vocab_size", 1000))
    ids = torch.randint(10, min(V, 900), (3, 7))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # a left-padded row
    attn[2, :1] = 0
    ids = torch.where(attn.bool(), ids, torch.full_like(ids, profile.pad_id if profile.pad_id is not None else 0))

    base = SamplingConfig(max_new_tokens=16, steps=16, block_length=8, temperature=1.0)
    sampling = {
        "greedy": base.updated(temperature=0.0),
        "t1": base,
        "t07_random": base.updated(temperature=0.7, remasking="random"),
        "two_per_step": base.updated(steps=8),
        "cfg": base.updated(cfg_scale=0.5),
        "eos_flags": base.updated(logits_eos_inf=True, confidence_eos_eot_inf=True),
        "one_block": base.updated(block_length=16),
    }
    out = {}
    for name, cfg in sampling.items():
        out[f"sampler/{name}"] = digest(DiffusionSampler(model, profile, cfg).run(ids, attn, seeds=11))
    refine = {
        "uniform_final": RefineConfig(iterations=3, rho=0.5, alpha=0.5),
        "uniform_late_N2": RefineConfig(n_proposals=2, iterations=2, schedule="late", start=0.5, alpha=0.5),
        "targeted_final": RefineConfig(iterations=3, **{_HOLES: "targeted"}, alpha=0.5),
        "targeted_scope_all": RefineConfig(iterations=2, **{_HOLES: "targeted"}, scope="all", schedule="evenly",
                                           every=4, alpha=0.5),
        "greedy_sel": RefineConfig(n_proposals=3, iterations=2, selection="greedy", alpha=0.5),
        "remask_only": RefineConfig(iterations=2, selection="remask_only", alpha=0.5),
        "budget2": RefineConfig(iterations=8, **{_HOLES: "targeted"}, alpha=0.5, budget=2.0),
    }
    for name, rc in refine.items():
        for sname in ("t1", "two_per_step", "greedy"):
            kw = {"blame": token_blame} if getattr(rc, _HOLES) == "targeted" else {}
            hook = IterRef(rc, token_reward, **kw)
            res = DiffusionSampler(model, profile, sampling[sname]).run(ids, attn, seeds=5, hook=hook)
            out[f"iterref/{name}/{sname}"] = digest(res)
    # Fast sampling (the block cache, the threshold), FLOPs hashed too: the FLOP budget decides there.
    if "cache" in SamplingConfig.__dataclass_fields__:
        fast = {"dual": base.updated(cache="dual"), "prefix": base.updated(cache="prefix"),
                "dual_threshold": base.updated(cache="dual", threshold=0.001)}
        for name, cfg in fast.items():
            res = DiffusionSampler(model, profile, cfg).run(ids, attn, seeds=11)
            out[f"fast/sampler/{name}"] = digest(res, FIELDS + ("flops",))
        for name in ("targeted_final", "targeted_scope_all", "budget2"):
            for sname in ("dual", "prefix"):
                hook = IterRef(refine[name], token_reward, blame=token_blame)
                res = DiffusionSampler(model, profile, fast[sname]).run(ids, attn, seeds=5, hook=hook)
                out[f"fast/iterref/{name}/{sname}"] = digest(res, FIELDS + ("flops",))
    sampler = DiffusionSampler(model, profile, base)
    out["baseline/best_of_n3"] = digest(best_of_n(sampler, ids, token_reward, 3, attention_mask=attn, seeds=3))
    out["baseline/svdd3"] = digest(svdd(sampler, ids, token_reward, 3, alpha=0.5, attention_mask=attn, seeds=3))
    out["baseline/fk3"] = digest(fk_steering(sampler, ids, token_reward, 3, every=4, attention_mask=attn, seeds=3))
    return out


def mdlm_cases(model_dir: str) -> dict[str, str]:
    from safegen import IterRef, RefineConfig, SamplingConfig, load_model

    make_sampler = _find("make_sampler", "safegen.sampling.factory", "safegen.sampling", "safegen.sampling.sampler", "safegen.sampler")
    model, tokenizer, profile = load_model(model_dir, quantization="none")
    torch.manual_seed(1)
    ids = torch.randint(10, 200, (2, 5))
    attn = torch.ones_like(ids)
    attn[1, :2] = 0
    cfg = SamplingConfig(max_new_tokens=12, steps=16, temperature=1.0, sampler="mdlm")
    out = {"mdlm/plain": digest(make_sampler(model, profile, cfg).run(ids, attn, seeds=2))}
    for name, rc in {"uniform": RefineConfig(iterations=3, alpha=0.5),
                     "targeted": RefineConfig(iterations=3, alpha=0.5, **{_HOLES: "targeted"})}.items():
        kw = {"blame": token_blame} if getattr(rc, _HOLES) == "targeted" else {}
        res = make_sampler(model, profile, cfg).run(ids, attn, seeds=2, hook=IterRef(rc, token_reward, **kw))
        out[f"mdlm/{name}"] = digest(res)
    return out


def toy_cases() -> dict[str, str]:
    from safegen import DiffusionSampler, IterRef, RefineConfig, SamplingConfig

    toy = importlib.import_module(_find("__name__", "safegen.research.toy", "safegen.toy"))
    V, L = 3, 4
    p0 = toy.random_distribution(V, L, seed=1)
    model = toy.ExactDenoiser(p0, V, L)
    reward = toy.toxic_count_reward(V, L, toxic=[0])
    prompts = torch.zeros(64, 0, dtype=torch.long)
    out = {}
    for name, cfg, rc in [
        ("plain", SamplingConfig(max_new_tokens=L, steps=L, block_length=L, temperature=1.0, remasking="random"), None),
        ("uniform", SamplingConfig(max_new_tokens=L, steps=L, block_length=L, temperature=1.0), RefineConfig(iterations=6, alpha=0.5)),
        ("targeted_blocks", SamplingConfig(max_new_tokens=L, steps=L, block_length=2, temperature=1.0),
         RefineConfig(iterations=6, alpha=0.5, **{_HOLES: "targeted"})),
    ]:
        hook = None
        if rc is not None:
            hook = IterRef(rc, reward, **({"blame": toy.toxic_blame([0])} if getattr(rc, _HOLES) == "targeted" else {}))
        res = DiffusionSampler(model, model.mask_id, cfg).run(prompts, seeds=7, hook=hook)
        out[f"toy/{name}"] = digest(res)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write {case: hash} to this file")
    args = ap.parse_args(argv)
    write_tiny = _find("write_tiny_model", "safegen.models.tiny", "safegen.tiny")
    write_mdlm = _find("write_tiny_mdlm", "safegen.models.tiny", "safegen.tiny")
    with tempfile.TemporaryDirectory() as tmp:
        hashes = {**tiny_cases(str(write_tiny(f"{tmp}/llada", seed=0))),
                  **mdlm_cases(str(write_mdlm(f"{tmp}/mdlm", seed=0))), **toy_cases()}
    for name, h in hashes.items():
        print(f"{h}  {name}")
    total = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]
    print(f"{total}  ALL ({len(hashes)} cases)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(hashes, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
