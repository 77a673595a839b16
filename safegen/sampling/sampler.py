"""LLaDA's masked-diffusion sampler, batched, with an extension point for refinement.

Generation starts from the prompt followed by G mask tokens and unmasks them over T steps
(LLaDA, Nie et al. 2025, Alg. 2 and its "semi-autoregressive remasking"):

* the G positions are split into blocks of `block_length` (the last one shorter where that does not
  divide G); a full block gets S steps, a shorter last block ceil(its length·S / block_length), so
  every block keeps the same tokens per step, and only positions of the current block may be
  committed;
* the linear noise schedule implies a constant number of commits per step: `n_masked // steps`, the
  remainder going to the first steps;
* each step makes one forward over the whole sequence, proposes a token for every masked position of
  the block (argmax, or a sample at temperature > 0), scores it ("low_confidence": the model's
  probability of that token; "random": uniform noise) and commits the best-scoring positions.
  Committed tokens are never re-masked by the base sampler.

The per-step hook (`StepHook`) is where IterRef and FK-steering plug in: it sees the state after the
step's forward and may replace the draft, provided the number of decoded tokens stays the same.
"""
from __future__ import annotations

import inspect
import time
from typing import Optional

import torch

from . import dream, fast, rng
from .exclusion import Exclusion, bar_tokens
from .. import engine
from ..errors import ArgumentError
from ..models import flops
from ..models.family import ModelProfile

from .rng import row_keys  # noqa: F401 (re-exported)
from .config import DREAM_ORDERS, REMASKING, ConfigError, SamplingConfig, global_step, updated_config  # noqa: F401 (re-exported)
from .state import Prediction, SampleOutput, SamplerState, StepHook  # noqa: F401 (re-exported)


def _accepts_attention_mask(model) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    return "attention_mask" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def drive(steps):
    """Runs a step generator (DiffusionSampler.run_steps, SafeGenerator.generate_steps) to its end and
    returns its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def transfer_counts(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Commits per step for each row, (B, steps). A linear schedule moves the same expected mass
    per step, so the count is constant: n // steps, with the remainder on the first steps."""
    base = (n_masked // steps)[:, None]
    extra = (torch.arange(steps, device=n_masked.device)[None, :] < (n_masked % steps)[:, None])
    return base + extra.long()


class DiffusionSampler:
    """LLaDA's sampler around any mask predictor.

    `model(input_ids=..., attention_mask=...)` may return logits or an object with `.logits`,
    shape (B, L, V). Models whose forward has no `attention_mask` are called without one.
    """

    def __init__(self, model: torch.nn.Module, profile: ModelProfile | int,
                 config: SamplingConfig | None = None):
        if isinstance(profile, int):
            profile = ModelProfile(mask_id=profile)
        self.model = model
        self.profile = profile
        self.config = (config or SamplingConfig()).validate()
        self.mask_id = profile.mask_id
        self._passes_mask = _accepts_attention_mask(model)
        self._stop = torch.tensor(profile.stop_ids, dtype=torch.long)
        self.dims = flops.dims_of(model)  # for FLOP accounting (None: counted as 0)
        if self.config.cache is not None:
            fast.check_cacheable(self)  # the cache needs LLaDAModelLM's prefill and forward_queries

    # ----------------------------------------------------------------- building blocks
    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except (StopIteration, AttributeError):
            return torch.device("cpu")

    def forward(self, state: SamplerState, x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Logits of the generation region for the rows `x` (n, P+G); `owner` (n,) names the state
        row each one is charged to. CFG doubles the rows (a second pass with the prompt masked)."""
        attn = None if state.attention_mask is None else state.attention_mask[owner]
        P = state.prompt_length
        if self.config.cfg_scale > 0:
            uncond = x.clone()
            prompt = uncond[:, :P]
            real = torch.ones_like(prompt, dtype=torch.bool) if attn is None else attn[:, :P].bool()
            prompt[real] = self.mask_id
            both = self._call(torch.cat([x, uncond]), None if attn is None else torch.cat([attn, attn]))
            ran = torch.cat([owner, owner])
            cond, unc = both.chunk(2)
            logits = unc + (self.config.cfg_scale + 1) * (cond - unc)
        else:
            logits = self._call(x, attn)
            ran = owner
        # Each row the model ran is charged to its owner: what safegen.refine.cost.rows_per_forward predicts.
        state.rows.index_add_(0, ran.cpu(), torch.ones(len(ran), dtype=torch.float64))
        per_row = flops.sequence_flops(self.dims, x, attn)  # the prompt-masked pass costs the same
        state.flops.index_add_(0, ran.cpu(), per_row.repeat(len(ran) // len(x)))
        return logits[:, P:]

    def _call(self, x: torch.Tensor, attn: Optional[torch.Tensor]) -> torch.Tensor:
        # Through the engine: in one of its rounds, merged with the other generations' forwards.
        logits = engine.forward(self.model, x, attn, takes_mask=self._passes_mask)
        if self.profile.shift_logits:  # Dream-style: position i-1 predicts token i
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def predict(self, logits: torch.Tensor, x_gen: torch.Tensor, committable: torch.Tensor,
                keys: torch.Tensor, temperature: float, ranking: Optional[str] = None,
                demote_stop: str = "sampled", exclude: Optional[torch.Tensor] = None,
                forced: Optional[torch.Tensor] = None) -> Prediction:
        """Candidates and confidences for the committable positions, and x̂0 for all of them.

        `ranking` orders the commits: the config's `remasking` by default; "max_prob" scores a
        position by its most likely token's probability, a statistic of the logits alone (what
        IterRef's proposals use: an order that depends on the sampled token biases them).
        `demote_stop` (with confidence_eos_eot_inf): which token decides that a position is a stop
        and goes last: "sampled" (LLaDA's: the candidate drawn) or "most_likely" (the argmax, a
        statistic of the logits alone, so that the order still does not depend on the draw).
        Only the committable positions are sampled, in float32: the reference code draws float64
        Gumbel noise over the full vocabulary of every position, gigabytes at batch 8.
        `exclude` (n, G): a token each position may not take (-1: none; exclusion.bar_tokens); `forced`
        (n, G): candidates taken instead of drawn, ranked as usual (refine/moves.py's reverse paths)."""
        cfg = self.config
        # Dream's alg_temp draws the base sampler's commits; IterRef's proposals keep their own order.
        alg_temp = cfg.alg_temp if ranking is None else None
        ranking = ranking or cfg.remasking
        if demote_stop not in ("sampled", "most_likely"):
            raise ValueError(f"demote_stop must be 'sampled' or 'most_likely', got {demote_stop!r}")
        masked = x_gen == self.mask_id
        V = logits.shape[-1]
        if self.mask_id < V:  # the mask is never a prediction, even from an untrained model
            logits[..., self.mask_id] = float("-inf")
        if self.profile.vocab_size is not None and self.profile.vocab_size < V:
            logits[..., self.profile.vocab_size:] = float("-inf")  # padding columns of the head
        if cfg.logits_eos_inf and self.profile.eos_id is not None:
            logits[..., self.profile.eos_id] = float("-inf")
        best = logits.argmax(-1)  # also the most likely token of every committable position below
        xhat0 = torch.where(masked, best, x_gen)
        candidates = xhat0.clone()
        confidence = torch.full(x_gen.shape, float("-inf"), device=x_gen.device)
        width = int(committable.sum(1).max()) if committable.numel() else 0
        if width == 0:
            return Prediction(candidates, confidence, xhat0)
        # The committable positions of each row, packed to the left (padding marked by `valid`).
        order = torch.argsort(committable.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
        valid = committable.gather(1, order)
        lg = dream.truncate(logits.gather(1, order[..., None].expand(-1, -1, V)).float(), cfg.top_k, cfg.top_p)
        probs = torch.softmax(lg, -1)
        p_t = probs if temperature in (0, 1) else torch.softmax(lg / temperature, -1)
        if exclude is not None:
            p_t = bar_tokens(p_t, torch.where(valid, exclude.gather(1, order), torch.full_like(order, -1)))
        if forced is not None:
            picked = forced.gather(1, order)
        elif temperature > 0:
            # A draw from softmax(lg/T) by inverse CDF: the same distribution as the reference
            # code's Gumbel-max, with one 52-bit uniform per position instead of one number per token.
            # Keyed by position: its draw does not depend on which other positions are committable.
            picked = rng.categorical(keys, order, p_t)
        else:
            picked = lg.argmax(-1) if cfg.top_k is not None or cfg.top_p is not None else best.gather(1, order)
        if ranking == "low_confidence":
            score = probs.gather(-1, picked[..., None]).squeeze(-1)
        elif ranking == "max_prob":
            score = probs.max(-1).values
        elif ranking in DREAM_ORDERS:
            score = dream.confidence(ranking, p_t, picked, rng.uniform(rng.derive(keys, rng.Sub.ORDER), order))
        else:
            score = rng.uniform(rng.derive(keys, rng.Sub.ORDER), order)
        if alg_temp is not None:
            score = dream.drawn_order(score, alg_temp, rng.uniform(rng.derive(keys, rng.Sub.ORDER), order))
        if cfg.confidence_eos_eot_inf and len(self._stop):
            # Below every real score, above the -inf of non-committable positions.
            stop_token = picked if demote_stop == "sampled" else best.gather(1, order)
            score = torch.where(torch.isin(stop_token, self._stop.to(picked.device)),
                                torch.full_like(score, -1.0), score)
        score = torch.where(valid, score, torch.full_like(score, float("-inf")))
        candidates.scatter_(1, order, torch.where(valid, picked, candidates.gather(1, order)))
        confidence.scatter_(1, order, score)
        return Prediction(candidates, confidence, xhat0)

    @staticmethod
    def commit(x_gen: torch.Tensor, pred: Prediction, n_commit: torch.Tensor) -> torch.Tensor:
        """Commit each row's `n_commit` highest-confidence candidates (n_commit <= committable)."""
        order = torch.argsort(pred.confidence, dim=1, descending=True)
        rank_ok = torch.arange(x_gen.shape[1], device=x_gen.device)[None, :] < n_commit[:, None]
        chosen = torch.zeros_like(rank_ok).scatter_(1, order, rank_ok)
        return torch.where(chosen, pred.candidates, x_gen)

    def block_slice(self, block: int) -> slice:
        bl = self.config.block_length
        return slice(block * bl, min((block + 1) * bl, self.config.max_new_tokens))

    def committable(self, x_gen: torch.Tensor, block: int) -> torch.Tensor:
        """Masked positions of `block` (none once past the last block)."""
        c = torch.zeros_like(x_gen, dtype=torch.bool)
        if block < self.config.n_blocks:
            sl = self.block_slice(block)
            c[:, sl] = x_gen[:, sl] == self.mask_id
        return c

    def step_keys(self, state: SamplerState, keys: torch.Tensor | None = None,
                  ahead: int = 0) -> torch.Tensor:
        """The keys of the base step the state is at (plus `ahead`); the same for a row and all its
        proposals, so an accepted proposal continues with exactly the noise its parent would use."""
        t = self.global_step(state) + ahead
        return rng.derive(state.keys if keys is None else keys, rng.Stream.STEP, t)

    def global_step(self, state: SamplerState) -> int:
        """t, the base steps done at the state's point (1..T where a hook is called)."""
        return global_step(state.block, state.step, self.config.steps_per_block)

    def next_block(self, state: SamplerState) -> int:
        """The block the next commit goes to (the post-block point looks ahead)."""
        return state.block + (state.step == self.config.steps_in_block(state.block))

    def refresh(self, state: SamplerState) -> None:
        """Make state.pred current: one forward, unless nothing is masked (then x̂0 = x)."""
        if state.pred is not None:
            return
        gen = state.gen
        if not (gen == self.mask_id).any():
            state.logits = None  # no forward needed: x̂0 is x
            state.pred = Prediction(gen.clone(), torch.full(gen.shape, float("-inf"), device=gen.device),
                                    gen.clone())
            return
        owner = torch.arange(gen.shape[0], device=gen.device)
        # With Fast-dLLM's block cache (sampling/fast.py), from the keys and values of the block's start.
        state.logits = fast.cached_logits(self, state) if self.config.cache else self.forward(state, state.x, owner)
        state.pred = self.next_prediction(state, state.logits, gen, owner)

    def next_prediction(self, state: SamplerState, logits: torch.Tensor, gen: torch.Tensor, owner: torch.Tensor,
                        block: Optional[int] = None, ahead: int = 0) -> Prediction:
        """The base step's prediction for drafts `gen` of the state's rows `owner`, from their logits:
        candidates for the masked positions of `block` (default: the block the next commit goes to),
        drawn at the sampling temperature with the noise of the state's step (+ `ahead`), the same for
        a row and every draft derived from it."""
        block = self.next_block(state) if block is None else block
        return self.predict(logits, gen, self.committable(gen, block),
                            self.step_keys(state, state.keys[owner], ahead), self.config.temperature)

    def redenoise(self, state: SamplerState, gen: torch.Tensor, holes: torch.Tensor, owner: torch.Tensor,
                  keys: torch.Tensor, temperature: float, order: str, demote_stop: str,
                  proposal_cache: Optional["fast.ProposalCache"] = None, exclusion: Optional[Exclusion] = None,
                  score: bool = True, first_sub: int = 0) -> Prediction:
        """The refinement kernel's denoiser: re-commit the `holes` of drafts `gen` (rows `owner` of the
        state) in place, one hole per forward whatever the base pace, at `temperature`, in `order` (a
        `predict` ranking), drawing with `keys` (one per draft); a draw from the model's joint
        conditional of the holes when the order reads the logits alone (refine/iterref.py). Once a
        draft has no hole left, one more forward gives its x̂0 and the next base step's prediction
        (next_prediction), which an accepted draft reuses instead of a new forward; with no mask
        left, x̂0 is the draft. With the block cache on, the forwards run only the holes (and, for
        x̂0, the masks left) against keys and values of the drafts' parents (fast.ProposalCache; the
        caller's `proposal_cache` when it holds them already). `exclusion`: barred tokens and their
        bookkeeping (sampling/exclusion.py); `score` False: no forward after the last hole;
        `first_sub`: the first sub-step's index in the keys' sub-step stream."""
        mask_id, P = self.mask_id, state.prompt_length
        cached = None
        if self.config.cache is not None:
            cached = (proposal_cache and proposal_cache.serving(owner)) or fast.ProposalCache(self, state, owner)
        queries = holes.clone()  # a cached draft keeps all its holes as queries, filled or not
        one = torch.ones(gen.shape[0], dtype=torch.long, device=gen.device)
        preds = Prediction(torch.empty_like(gen), torch.full(gen.shape, float("-inf"), device=gen.device),
                           torch.empty_like(gen))
        todo = torch.ones(gen.shape[0], dtype=torch.bool, device=gen.device)
        ex = exclusion
        if ex is not None:
            ex.start(gen.shape[0], gen.device)
        sub = first_sub
        while bool(todo.any()):
            todo &= (gen == mask_id).any(1)  # fully decoded: x̂0 is the draft itself
            if not score:
                todo &= holes.any(1)
            idx = todo.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            if cached is None:
                logits = self.forward(state, torch.cat([state.x[owner[idx], :P], gen[idx]], dim=1), owner[idx])
            else:
                run = queries[idx] | (~holes[idx].any(1, keepdim=True) & (gen[idx] == mask_id))
                logits = cached.logits(self, state, gen[idx], run, idx, owner[idx])
            has_holes = holes[idx].any(1)
            d, f = idx[has_holes], idx[~has_holes]
            if len(d):
                # Usually every row still has holes: its logits as they are, not a vocabulary-wide copy.
                lg = logits if len(f) == 0 else logits[has_holes]
                now = holes[d] if ex is None or sub != first_sub else ex.committable(holes[d], d)
                p = self.predict(lg, gen[d], now, rng.derive(keys[d], rng.Sub.SUBSTEP, sub), temperature,
                                 ranking=order, demote_stop=demote_stop,
                                 exclude=None if ex is None else ex.barred[d],
                                 forced=None if ex is None or ex.forced is None else ex.forced[d])
                new = self.commit(gen[d], p, one[d])
                if ex is not None:  # the hole just committed, one per row: its share of the correction
                    ex.record(self, lg, holes[d], holes[d] & (new != mask_id), new, d, temperature, first=sub == first_sub)
                gen[d] = new
                holes[d] &= gen[d] == mask_id
            if len(f):
                p = self.next_prediction(state, logits[~has_holes], gen[f], owner[f])
                preds.candidates[f], preds.confidence[f], preds.xhat0[f] = p.candidates, p.confidence, p.xhat0
                todo[f] = False
            sub += 1
        clean = ~(gen == mask_id).any(1)
        preds.candidates[clean] = gen[clean]
        preds.xhat0[clean] = gen[clean]
        return preds

    def advance(self, state: SamplerState, n_commit: torch.Tensor) -> None:
        """One base step: commit from the current prediction. Baselines override this."""
        if self.config.threshold is not None:  # Fast-dLLM's parallel decoding (sampling/fast.py)
            n_commit = fast.threshold_counts(self, state)
            if n_commit is None:
                return
        self.refresh(state)
        if self.config.transfer == "dream" or self.config.remasking == "origin":
            n_commit = dream.counts(self, state)
        state.x[:, state.prompt_length:] = self.commit(state.gen, state.pred, n_commit)
        state.pred = state.logits = None

    # ----------------------------------------------------------------- the sampling loop
    def start(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
              seeds) -> SamplerState:
        if input_ids.dim() != 2:
            raise ArgumentError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        device = self.device
        B, P = input_ids.shape
        G = self.config.max_new_tokens
        x = torch.full((B, P + G), self.mask_id, dtype=torch.long, device=device)
        x[:, :P] = input_ids.to(device)
        if (x[:, :P] == self.mask_id).any():
            raise ArgumentError("input_ids contain the mask token id: the prompt would be denoised")
        attn = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ArgumentError(f"attention_mask shape {tuple(attention_mask.shape)} differs from "
                                 f"input_ids shape {tuple(input_ids.shape)}")
            if not bool(attention_mask.bool().all()):
                attn = torch.ones((B, P + G), dtype=torch.long, device=device)
                attn[:, :P] = attention_mask.to(device).long()
        return SamplerState(x=x, attention_mask=attn, prompt_length=P, keys=row_keys(seeds, B, device))

    def run(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
            seeds=0, hook: Optional[StepHook] = None, fork_plain: bool = False) -> SampleOutput:
        """Sample a generation for each prompt row.

        seeds: one int (row i gets seed + i) or one int per row. A row's output depends only on its
        prompt and its seed. fork_plain: also return what plain sampling gives for the same prompts
        and seeds. A row's plain branch is forked from its state just before the hook first changed
        it; a row the hook never changed is its own plain sample and costs nothing extra. The
        branches' extra forwards are reported in plain_rows.
        """
        return drive(self.run_steps(input_ids, attention_mask, seeds, hook, fork_plain))

    def run_steps(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                  seeds=0, hook: Optional[StepHook] = None, fork_plain: bool = False):
        """`run` as a generator: it yields after each step (the step's forward, and at a refinement
        point the hook's work) and returns run's SampleOutput. A scheduler interleaves several runs
        step by step (safegen/engine.py: serve and detoxify); what runs between two steps changes nothing in a run,
        since every random draw is keyed by its row's seed (sampling/rng.py) and each step enters
        inference mode itself rather than across a yield."""
        t0 = time.perf_counter()
        cfg = self.config
        state = self.start(input_ids, attention_mask, seeds)  # normal tensors: callers update them in place
        plain: Optional[SamplerState] = None
        plain_of = torch.zeros(0, dtype=torch.long, device=state.x.device)  # plain row -> state row
        for block in range(cfg.n_blocks):
            state.block = block
            sl = self.block_slice(block)
            S = cfg.steps_in_block(block)
            counts = transfer_counts((state.gen[:, sl] == self.mask_id).sum(1), S)
            for step in range(S + 1):
                with torch.inference_mode():
                    state.step = step
                    if plain is not None:
                        plain.block, plain.step = block, step
                    if hook is not None and hook.applies(block, step, S, self.global_step(state)):
                        self.refresh(state)
                        x, pred = state.x.clone(), state.pred
                        hook(self, state)
                        if fork_plain:
                            plain, plain_of = self._fork_changed(state, x, pred, plain, plain_of)
                    if step < S:
                        self.advance(state, counts[:, step])
                        if plain is not None:
                            self.advance(plain, counts[plain_of, step])
                yield
        out = SampleOutput(
            sequences=self.cut_at_stop(state.x, state.prompt_length),
            rows=state.rows, reward_calls=state.reward_calls, proposed=state.proposed,
            accepted=state.accepted, seconds=time.perf_counter() - t0, flops=state.flops)
        if fork_plain:
            out.plain_sequences = out.sequences.clone()
            out.plain_rows = torch.zeros_like(state.rows)
            out.plain_flops = torch.zeros_like(state.flops)
            if plain is not None:
                out.plain_sequences[plain_of] = self.cut_at_stop(plain.x, plain.prompt_length)
                out.plain_rows.index_add_(0, plain_of.cpu(), plain.rows)
                out.plain_flops.index_add_(0, plain_of.cpu(), plain.flops)
        return out

    def _fork_changed(self, state: SamplerState, x: torch.Tensor, pred: Prediction,
                      plain: Optional[SamplerState], plain_of: torch.Tensor):
        """Add to the plain branch the rows the hook just changed for the first time, as they were
        before it (`x`, `pred`). Returns the branch and its map to state rows."""
        changed = (state.x != x).any(1)
        changed[plain_of] = False
        new = changed.nonzero().squeeze(1)
        if len(new) == 0:
            return plain, plain_of
        mask = None if state.attention_mask is None else state.attention_mask[new]
        rows = SamplerState(x=x[new], attention_mask=mask, prompt_length=state.prompt_length,
                            keys=state.keys[new], block=state.block, step=state.step, pred=pred.select(new),
                            kv=None if state.kv is None else state.kv.select(new))  # the rows' block cache
        if plain is None:
            return rows, new
        # The branch's own prediction at this point: the forward its next commit would make anyway.
        self.refresh(plain)
        return plain.concat(rows), torch.cat([plain_of, new])

    def cut_at_stop(self, x: torch.Tensor, prompt_length: int) -> torch.Tensor:
        """Everything after the first EOS/EOT of the generation becomes padding."""
        if not len(self._stop):
            return x.clone()
        gen = x[:, prompt_length:]
        stop = torch.isin(gen, self._stop.to(gen.device)).long()
        after = (stop.cumsum(1) - stop) > 0
        pad = self.profile.fill_id
        out = x.clone()
        out[:, prompt_length:] = torch.where(after, torch.full_like(gen, pad), gen)
        return out

