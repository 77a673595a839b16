"""The moves of refine/moves.py against exactly enumerable targets: the Metropolised-Gibbs move (one
hole and several), its interleave with the re-mask move, and Multiple-Try Metropolis. Each must
reach p* ∝ p0 · exp(r/α) (TV to p* at the noise floor and the z-score of the mean reward), on a flat
toy and a peaked one, and each plausible bug (the correction left out, the reverse path cut short,
MTM without its backward draws) must fail the same statistics. Seeds are fixed."""
import pytest
import torch

from safegen.refine import moves
from safegen.refine.iterref import IterRef, RefineConfig
from safegen.sampling.exclusion import Exclusion
from safegen.research import toy
from safegen.sampling.sampler import ConfigError, DiffusionSampler, Prediction, SamplingConfig

from oracles import small_toy

V, L, ALPHA, N_SAMPLES, P0, REWARD, BLAME, P_STAR, FLOOR, DENOISER = small_toy()


class Peaked:
    """A peaked p0 (sharpness 3, tilted away from toxicity): a re-masked token is mostly re-drawn as
    itself, the case the Gibbs move is for. V = 3, L = 5, α = 0.25."""

    V, L, alpha = 3, 5, 0.25
    p0 = toy.target(toy.random_distribution(3, 5, seed=4, sharpness=3.0),
                    toy.toxic_count_reward(3, 5, toxic=[0]).values, 1.0)
    reward = toy.toxic_count_reward(3, 5, toxic=[0])
    p_star = toy.target(p0, reward.values, 0.25)
    denoiser = toy.TableDenoiser(p0, 3, 5)


class StartAt:
    """IterRef at the last point only, from the drafts `start(n)` (n, L) instead of the sampler's."""

    def __init__(self, iterref, start, L_):
        self.iterref, self.start, self.L = iterref, start, L_

    def applies(self, block, step, steps_in_block, t):
        return self.iterref.applies(block, step, steps_in_block, t) and t == self.L

    def __call__(self, sampler, state):
        gen = self.start(state.x.shape[0])
        state.x = torch.cat([state.x[:, :state.prompt_length], gen], 1)
        state.pred = Prediction(gen.clone(), torch.full(gen.shape, float("-inf")), gen.clone())
        state.logits = None
        self.iterref(sampler, state)


class FromTarget(StartAt):
    """IterRef at the last point only, started from exact samples of p* instead of the sampler's
    draft: the chain must stay at p* (invariance), which a few iterations show on a peaked toy
    where mixing from the draft would take hundreds."""

    def __init__(self, iterref, p_star, L_, seed=0):
        V_ = round(len(p_star) ** (1 / L_))
        g = torch.Generator().manual_seed(seed)
        super().__init__(iterref, lambda n: toy.all_sequences(V_, L_)[torch.multinomial(p_star, n, replacement=True,
                                                                                          generator=g)], L_)


class Mild:
    """The flat toy at α = 2: p* close to p0, so that two toxic tokens often share a proposal's holes."""

    V, L, alpha, reward, denoiser = V, L, 2.0, REWARD, DENOISER
    p_star = toy.target(P0, REWARD.values, 2.0)


def run(k, problem=None, block_length=None, n=N_SAMPLES, seed=0, from_target=False, **refinement):
    """Refined samples' (TV to p*, z of the mean reward, floor), LLaDA's low_confidence base order;
    `from_target`: the last point's chain started at p* (FromTarget)."""
    V_, L_, alpha, p_star, reward, denoiser = ((V, L, ALPHA, P_STAR, REWARD, DENOISER) if problem is None else
                                               (problem.V, problem.L, problem.alpha, problem.p_star,
                                                problem.reward, problem.denoiser))
    cfg = SamplingConfig(max_new_tokens=L_, steps=L_, block_length=block_length or L_, temperature=1.0)
    hook = IterRef(RefineConfig(iterations=k, alpha=alpha, **refinement), reward, BLAME)
    if from_target:
        hook = FromTarget(hook, p_star, L_, seed)
    out = DiffusionSampler(denoiser, V_, cfg).run(torch.empty((n, 0), dtype=torch.long), seeds=seed, hook=hook)
    seqs = out.sequences
    return (toy.tv_distance(seqs, p_star, V_), toy.mean_z(reward(seqs), reward.values, p_star),
            toy.expected_tv_noise(p_star, n), out)


EXACT = [
    dict(gibbs_share=1.0),
    dict(gibbs_share=1.0, proposal_holes="targeted"),
    dict(gibbs_share=1.0, proposal_holes="targeted", block_length=2),
    dict(gibbs_share=0.5, proposal_holes="targeted", bar_blamed=True),
    dict(gibbs_share=0.25, proposal_holes="targeted", n_proposals=2, block_length=2),
    dict(gibbs_share=1.0, gibbs_holes=2),
    dict(gibbs_share=1.0, gibbs_holes=3, proposal_holes="targeted"),
    dict(gibbs_share=1.0, gibbs_holes=2, proposal_order="random", block_length=2),
    dict(selection="mtm", n_proposals=3),
    dict(selection="mtm", n_proposals=3, proposal_holes="targeted", block_length=2, bar_blamed=True),
    dict(selection="mtm_reuse", n_proposals=3, proposal_holes="targeted", bar_blamed=True),
]


@pytest.mark.parametrize("setting", EXACT, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_moves_reach_the_target_on_the_flat_toy(setting):
    tv, z, floor, _ = run(48, **setting)
    assert tv < floor + 0.02 and abs(z) < 3, (tv, floor, z)


@pytest.mark.parametrize("setting", [dict(gibbs_share=1.0, proposal_holes="targeted"),
                                     dict(gibbs_share=1.0, gibbs_holes=2, proposal_holes="targeted"),
                                     dict(gibbs_share=0.5, proposal_holes="targeted", bar_blamed=True),
                                     dict(selection="mtm", n_proposals=2, proposal_holes="targeted", bar_blamed=True),
                                     dict(selection="mtm_reuse", n_proposals=3, proposal_holes="targeted",
                                          bar_blamed=True)],
                         ids=["gibbs1", "gibbs2", "mix", "mtm", "mtm_reuse"])
def test_moves_keep_the_target_on_a_peaked_toy(setting):
    tv, z, floor, _ = run(6, Peaked, n=6000, from_target=True, **setting)
    assert tv < floor + 0.015 and abs(z) < 3, (tv, floor, z)


BAR = dict(proposal_holes="targeted", bar_blamed=True)


@pytest.mark.parametrize("setting", [BAR, dict(BAR, rho=0.25), dict(BAR, rho=1.0, block_length=2)],
                         ids=["rho0.5", "one-hole", "all-holes"])
def test_bar_blamed_reaches_and_keeps_the_target(setting):
    tv, z, floor, _ = run(48, **setting)
    assert tv < floor + 0.02 and abs(z) < 3, (tv, floor, z)
    tv, z, floor, _ = run(6, Peaked, n=6000, from_target=True, **{k: v for k, v in setting.items() if k != "block_length"})
    assert tv < floor + 0.015 and abs(z) < 3, (tv, floor, z)


def test_a_barred_hole_never_keeps_its_token():
    """From a draft with one toxic token, a one-hole proposal at it (the floor makes it the hole)
    never re-draws it; without the bar, the peaked model re-draws it often."""
    draft = torch.tensor([[1, 2, 0, 2, 1]])  # token 0 is toxic, at position 2, where p0 puts 0.96 on it
    kept = {}
    for bar in (True, False):
        hook = StartAt(IterRef(RefineConfig(iterations=1, rho=0.2, alpha=Peaked.alpha, proposal_holes="targeted",
                                            blame_floor=1e-6, selection="remask_only", bar_blamed=bar),
                               Peaked.reward, BLAME), lambda n: draft.expand(n, -1).clone(), Peaked.L)
        cfg = SamplingConfig(max_new_tokens=5, steps=5, block_length=5, temperature=1.0)
        out = DiffusionSampler(Peaked.denoiser, 3, cfg).run(torch.empty((2000, 0), dtype=torch.long), seeds=0, hook=hook)
        kept[bar] = float((out.sequences[:, 2] == 0).double().mean())
        assert torch.equal(out.sequences[:, [0, 1, 3, 4]], draft[:, [0, 1, 3, 4]].expand(2000, -1))
    assert kept[True] == 0.0 and kept[False] > 0.9, kept


@pytest.mark.parametrize("bug", ["no reverse factor", "returns to a kept token"])
def test_bar_blamed_bugs_are_biased(monkeypatch, bug):
    """The plausible bugs: the reverse move's barred factor left out, or a proposal accepted although
    the reverse move bars the token it kept (so it could never return)."""
    if bug == "no reverse factor":
        monkeypatch.setattr(Exclusion, "reverse_first", lambda self, sampler, rows, at, token, t:
                            torch.zeros(len(rows), dtype=torch.float64))
    else:
        real = moves.barred_correction

        def forgetful(sampler, forward, own_weights, chosen, current, proposed, cfg):
            out = real(sampler, forward, own_weights, chosen, current, proposed, cfg)
            at, has = moves.blamed_hole(own_weights, chosen, cfg.blame_floor)
            keep = has & (proposed.gather(1, at[:, None]).squeeze(1) == current.gather(1, at[:, None]).squeeze(1))
            return torch.where(keep & ~torch.isneginf(forward.log_rest), torch.zeros_like(out), out)

        monkeypatch.setattr(moves, "barred_correction", forgetful)
    tv, z, floor, _ = run(12, Mild, n=20000, from_target=True, rho=1.0, **BAR)
    assert abs(z) > 5, (tv, floor, z)


def test_a_gibbs_move_never_proposes_the_draft_itself():
    """Every proposal changes its hole: the acceptance counts only real moves, and on the peaked toy
    the Gibbs chain accepts less often than the re-mask chain, whose copies are always accepted."""
    _, _, _, gibbs = run(8, Peaked, n=2000, gibbs_share=1.0)
    _, _, _, redraw = run(8, Peaked, n=2000)
    assert float(gibbs.accepted.sum() / gibbs.proposed.sum()) < float(redraw.accepted.sum() / redraw.proposed.sum()) - 0.2


def test_without_the_barred_token_correction_the_chain_is_biased(monkeypatch):
    """The plausible bug: draw among the other tokens but accept by the reward alone."""
    from safegen.sampling import exclusion

    monkeypatch.setattr(exclusion, "log_rest", lambda sampler, lg, temperature, token: torch.zeros(len(token), dtype=torch.float64))
    tv, z, floor, _ = run(6, Peaked, n=6000, from_target=True, gibbs_share=1.0, proposal_holes="targeted")
    assert tv > floor + 0.1, (tv, floor, z)


def test_without_the_reverse_path_the_several_hole_move_is_biased(monkeypatch):
    """The plausible bug: the reverse path's first hole only (what the one-hole move needs)."""
    monkeypatch.setattr(moves, "reverse_path", lambda iterref, sampler, state, current, proposed, chosen, forward,
                        *rest: forward.first_drawn.clone())
    tv, z, floor, _ = run(24, gibbs_share=1.0, gibbs_holes=3)
    assert tv > floor + 0.03 and abs(z) > 4, (tv, floor, z)


@pytest.mark.parametrize("selection", ["mtm", "mtm_reuse"])
def test_mtm_accepted_as_plain_metropolis_is_biased(monkeypatch, selection):
    """The plausible bug: the try chosen by exp(r/α) but accepted by exp((r' − r)/α) · q(S | y)/q(S | x),
    as if it had been drawn alone (no backward draws in the ratio)."""
    def plain(config, current, reward, log_q_ratio, pick):
        chosen = reward.gather(1, pick[:, None]).squeeze(1)
        return (chosen - current) / config.alpha + log_q_ratio.gather(1, pick[:, None]).squeeze(1)

    monkeypatch.setattr(moves, "mtm_log_ratio", plain)
    tv, z, floor, _ = run(6, Peaked, n=6000, from_target=True, selection=selection, n_proposals=3)
    assert tv > floor + 0.01 and z > 5, (tv, floor, z)


def test_interleave_and_costs():
    cfg = RefineConfig(iterations=8, gibbs_share=0.25)
    assert [moves.kind_at(cfg, i) for i in range(8)] == ["remask", "remask", "remask", "gibbs"] * 2
    assert [moves.kind_at(cfg.updated(gibbs_share=1.0), i) for i in range(3)] == ["gibbs"] * 3
    assert moves.kinds(cfg.updated(gibbs_share=0.0)) == ("remask",)
    # Rows: a one-hole Gibbs proposal at the last point costs one forward, a 3-hole one 3 + 2 (its
    # reverse path); the sampler's own count agrees.
    for holes, per_iteration in ((1, 1), (3, 5)):
        _, _, _, out = run(4, n=5, gibbs_share=1.0, gibbs_holes=holes, selection="remask_only")
        assert out.rows.tolist() == [L + 4 * per_iteration] * 5
    _, _, _, out = run(2, n=5, selection="mtm", n_proposals=3, rho=0.5, block_length=L)
    assert out.rows.tolist() == [L + 2 * 5 * 2] * 5  # 2N − 1 = 5 proposals of m = 2 holes
    _, _, _, out = run(2, n=5, selection="mtm_reuse", n_proposals=3, rho=0.5, block_length=L)
    assert out.rows.tolist() == [L + 2 * 3 * 2] * 5  # N = 3 proposals


def test_config_refuses_what_cannot_work():
    for bad in (dict(gibbs_share=1.5), dict(gibbs_share=-0.1), dict(gibbs_holes=0),
                dict(gibbs_share=0.5, selection="mtm"), dict(gibbs_share=0.5, proposal_temperature=0.0)):
        with pytest.raises(ConfigError, match="refine.gibbs|refine.selection"):
            RefineConfig(**bad).validate()


def test_a_floor_of_one_reads_no_blame_and_bars_nothing():
    """With blame_floor 1 every re-mask weight is 1: targeted holes are uniform again, and the
    barred-hole move must not take "every hole is blamed" from it (samples equal bar_blamed off)."""
    a = run(4, n=300, blame_floor=1.0, **BAR)[3].sequences
    b = run(4, n=300, proposal_holes="targeted", blame_floor=1.0, bar_blamed=False)[3].sequences
    assert torch.equal(a, b)
    assert not torch.equal(a, run(4, n=300, blame_floor=0.5, **BAR)[3].sequences)
