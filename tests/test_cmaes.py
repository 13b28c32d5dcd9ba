"""The CMA-ES search: it improves a known fitness, keeps to its bounds and budget, restarts,
gives the same genomes for the same seed whatever else uses numpy, and resumes from its
state exactly."""
import numpy as np
import pytest

from niches.cmaes import CMAES, FULL_COVARIANCE_MAX_DIM
from niches.search import Candidate, Search


def negated_sphere(optimum: np.ndarray):
    return lambda x: -float(np.sum((x - optimum) ** 2))


def scores(value: float) -> dict:
    """Per-example scores whose `niches.search.fitness` is `value`."""
    return {"task": np.array([value])}


def run(search: CMAES, fitness, stop_after: int | None = None) -> list[list[Candidate]]:
    generations = []
    while not search.stop() and (stop_after is None or len(generations) < stop_after):
        candidates = search.ask()
        search.tell(candidates, [scores(fitness(c.genome)) for c in candidates])
        generations.append(candidates)
    return generations


def test_speaks_the_search_protocol():
    assert isinstance(CMAES(np.full(3, 0.5), 0.1), Search)


@pytest.mark.parametrize("separable", [False, True])
def test_improves_a_known_fitness_inside_the_bounds(separable):
    optimum = np.linspace(0.2, 0.8, 6)
    fitness = negated_sphere(optimum)
    search = CMAES(np.full(6, 0.5), 0.3, seed=3, separable=separable, max_evals=600)
    generations = run(search, fitness)
    assert search.best_fitness > fitness(np.full(6, 0.5)) / 100
    assert np.allclose(search.best().genome, optimum, atol=0.02)
    assert search.evaluations == 600
    every = np.stack([c.genome for g in generations for c in g])
    assert every.min() >= 0.0 and every.max() <= 1.0
    assert {c.kind for g in generations for c in g} == {"sample"}


def test_the_mean_is_asked_last_outside_the_budget_and_can_be_the_best():
    search = CMAES(np.full(3, 0.5), 0.2, popsize=6, max_evals=20, evaluate_mean=True)
    generations = run(search, lambda x: 0.0)
    assert [len(g) for g in generations] == [6, 6, 6, 2, 1]
    mean = generations[-1][0]
    assert mean.kind == "mean" and search.evaluations == 20 and search.stop()
    assert np.array_equal(mean.genome, search.mean)
    with pytest.raises(RuntimeError, match="stopped"):
        search.ask()
    # a mean that scores above every sample is the answer
    search = CMAES(np.full(3, 0.5), 0.2, popsize=6, max_evals=12, evaluate_mean=True)
    while not search.stop():
        candidates = search.ask()
        search.tell(candidates, [scores(1.0 if c.kind == "mean" else 0.0) for c in candidates])
    assert search.best().kind == "mean"


def test_the_start_is_asked_first_outside_the_budget_and_leaves_the_samples_unchanged():
    """`evaluate_start`: x0 comes first in the first generation (kind "start"); pycma is
    told only the samples, so the samples are the ones a search without it asks; a start
    no sample beats is the answer, and a resumed search replays it."""
    x0 = np.array([0.2, 0.5, 0.9])
    fitness = negated_sphere(np.full(3, 0.7))
    plain = [c.genome for g in run(CMAES(x0, 0.2, popsize=6, seed=4, max_evals=20), fitness) for c in g]
    search = CMAES(x0, 0.2, popsize=6, seed=4, max_evals=20, evaluate_start=True)
    generations = run(search, fitness)
    assert [len(g) for g in generations] == [7, 6, 6, 2] and search.evaluations == 20
    start, *samples = [c for g in generations for c in g]
    assert start.kind == "start" and np.array_equal(start.genome, x0) and {c.kind for c in samples} == {"sample"}
    assert np.array_equal(np.stack([c.genome for c in samples]), np.stack(plain))
    assert search.summary()["start_fitness"] == fitness(x0)
    # where every sample is worse than the start, the start is the answer, also after a resume
    at_start = CMAES(x0, 0.2, popsize=6, seed=4, max_evals=12, evaluate_start=True, evaluate_mean=True)
    run(at_start, lambda x: 1.0 if np.array_equal(x, x0) else 0.0, stop_after=1)
    resumed = CMAES.from_state(*at_start.state())
    run(resumed, lambda x: 1.0 if np.array_equal(x, x0) else 0.0)
    assert resumed.best().kind == "start" and np.array_equal(resumed.best().genome, x0)
    assert resumed.evaluations == 12 and resumed.summary()["start_fitness"] == 1.0


def test_random_search_asks_its_start_once_outside_the_budget():
    from niches.baselines import RandomSearch

    start = np.array([0.1, 0.2])
    plain, search = RandomSearch(2, max_evals=5, popsize=3, seed=3), RandomSearch(2, max_evals=5, popsize=3, seed=3,
                                                                                  start=start)
    asked = []
    for each in (plain, search):
        genomes = []
        while not each.stop():
            candidates = each.ask()
            each.tell(candidates, [scores(1.0 if c.kind == "start" else 0.0) for c in candidates])
            genomes.append(candidates)
        asked.append(genomes)
    assert [len(g) for g in asked[1]] == [4, 2] and asked[1][0][0].kind == "start" and search.evaluations == 5
    assert np.array_equal(np.stack([c.genome for g in asked[0] for c in g]),
                          np.stack([c.genome for g in asked[1] for c in g if c.kind == "sample"]))
    assert np.array_equal(search.best().genome, start)
    resumed = RandomSearch.from_state(*search.state())
    assert resumed.start_told and np.array_equal(resumed.start, start)


def test_budget_trims_the_last_generation():
    search = CMAES(np.zeros(3) + 0.5, 0.2, popsize=8, max_evals=20)
    sizes = [len(g) for g in run(search, negated_sphere(np.zeros(3)))]
    assert sizes == [8, 8, 4] and search.evaluations == 20


def test_same_seed_same_genomes_despite_the_global_numpy_state():
    def genomes(seed, disturb):
        search = CMAES(np.full(4, 0.5), 0.2, seed=seed, max_evals=40)
        out = []
        while not search.stop():
            candidates = search.ask()
            if disturb:
                np.random.seed(1234)
                np.random.rand(10)
            search.tell(candidates, [scores(negated_sphere(np.full(4, 0.3))(c.genome)) for c in candidates])
            out.extend(c.genome for c in candidates)
        return np.stack(out)

    assert np.array_equal(genomes(7, False), genomes(7, True))
    assert not np.array_equal(genomes(7, False), genomes(8, False))


@pytest.mark.parametrize("restarts", [0, 2])
def test_from_state_continues_exactly_as_the_search_would(restarts):
    fitness = negated_sphere(np.full(4, 0.3))

    def fresh():
        # a tiny sigma0 makes each strategy stop at once (tolx), so restarts happen early
        return CMAES(np.full(4, 0.5), 1e-13 if restarts else 0.2, popsize=6, seed=5, restarts=restarts,
                     max_evals=100, evaluate_mean=True)

    whole = fresh()
    expected = [c.genome for g in run(whole, fitness) for c in g]
    killed = fresh()
    before = [c.genome for g in run(killed, fitness, stop_after=3) for c in g]
    arrays, meta = killed.state()
    resumed = CMAES.from_state(arrays, meta)
    after = [c.genome for g in run(resumed, fitness) for c in g]
    assert np.array_equal(np.stack(before + after), np.stack(expected))
    assert resumed.summary() == whole.summary()
    assert np.array_equal(resumed.best().genome, whole.best().genome)
    finished = CMAES.from_state(*whole.state())  # the told mean is replayed too
    assert finished.stop() and finished.best_fitness == whole.best_fitness


def test_from_state_refuses_a_replay_that_gives_other_genomes():
    search = CMAES(np.full(3, 0.5), 0.2, seed=1, max_evals=30)
    run(search, negated_sphere(np.zeros(3)), stop_after=2)
    arrays, meta = search.state()
    with pytest.raises(RuntimeError, match="replaying generation 0"):
        CMAES.from_state(arrays, {**meta, "seed": 2})


def test_a_flat_fitness_does_not_stop_the_search():
    search = CMAES(np.full(3, 0.5), 0.2, popsize=6, max_evals=60)
    run(search, lambda x: 0.0)
    assert search.evaluations == 60


def test_tell_gives_pycma_its_own_samples_so_the_trajectory_is_pycmas():
    """Against a plain pycma ask/tell loop with the same options, on a bounded problem
    whose optimum lies outside the box (so samples are repaired into it): the same
    genomes, generation after generation, and pycma's record of the solutions it sent is
    emptied by each tell (it found every one)."""
    import cma

    fitness = negated_sphere(np.full(4, 1.3))
    search = CMAES(np.full(4, 0.8), 0.3, popsize=8, seed=4, max_evals=8 * 30)
    plain = cma.CMAEvolutionStrategy(search.x0.tolist(), search.sigma0, dict(search._es.inopts))
    while not search.stop():
        candidates = search.ask()
        solutions = plain.ask()
        assert np.array_equal(np.stack([c.genome for c in candidates]), np.stack(solutions))
        search.tell(candidates, [scores(fitness(c.genome)) for c in candidates])
        plain.tell(solutions, [-fitness(x) for x in solutions])
        assert len(search._es.sent_solutions) == 0
    assert np.array_equal(search.mean, plain.result.xfavorite)


def test_step_size_is_csa_even_where_pycma_would_pick_tpa():
    from cma.sigma_adaptation import CMAAdaptSigmaCSA

    search = CMAES(np.zeros(500), 0.01, bounds=(-np.inf, np.inf), separable=True, max_evals=40)
    assert type(search._es.adapt_sigma) is CMAAdaptSigmaCSA and not search._es.mean_shift_samples
    run(search, lambda x: -float(np.sum(x ** 2)))
    assert type(search._es.adapt_sigma) is CMAAdaptSigmaCSA


def test_ipop_restarts_on_pycmas_criteria_double_the_population_and_keep_the_budget():
    # a flat generation meets pycma's tolfun (a range of values below 1e-11): a restart
    # while one is left; the last strategy is not stopped by the plateau and spends the budget
    search = CMAES(np.full(3, 0.5), 0.2, popsize=6, restarts=2, max_evals=100)
    sizes = [len(g) for g in run(search, lambda x: 0.0)]
    assert sizes == [6, 12, 24, 24, 24, 10]
    assert search.restart == 2 and search.popsize == 24 and search.evaluations == 100


def test_restarts_stop_when_the_budget_is_spent():
    search = CMAES(np.full(3, 0.5), 0.2, popsize=6, restarts=5, max_evals=30)
    sizes = [len(g) for g in run(search, lambda x: 0.0)]
    assert sizes == [6, 12, 12] and search.restart == 2 and search.evaluations == 30


def test_a_converged_last_strategy_ends_the_search():
    # a tiny sigma makes pycma stop at once (tolx): a criterion on the distribution,
    # which ends even the last strategy, budget or not
    search = CMAES(np.full(2, 0.5), 1e-13, popsize=6, restarts=2, max_evals=400)
    sizes = [len(g) for g in run(search, negated_sphere(np.full(2, 0.5)))]
    assert search.restart == 2 and search.popsize == 24
    assert sizes == [6, 12, 24] and "tolx" in search.summary()["stop"]


def test_separable_auto_switches_on_dimension():
    assert not CMAES(np.full(10, 0.5), 0.1).separable
    assert CMAES(np.full(FULL_COVARIANCE_MAX_DIM + 1, 0.5), 0.1).separable


def test_tell_rejects_other_candidates_and_non_finite_fitness():
    search = CMAES(np.full(3, 0.5), 0.1)
    with pytest.raises(ValueError, match="exactly the candidates"):
        search.tell([], [])
    candidates = search.ask()
    with pytest.raises(ValueError, match="candidates but"):
        search.tell(candidates, [scores(0.0)])
    with pytest.raises(ValueError, match="exactly the candidates"):
        search.tell([Candidate(c.genome.copy()) for c in candidates], [scores(0.0)] * len(candidates))
    with pytest.raises(ValueError, match="finite"):
        search.tell(candidates, [scores(float("nan"))] * len(candidates))
    with pytest.raises(RuntimeError, match="before the last candidates were told"):
        search.ask()


@pytest.mark.parametrize("settings, message", [({"sigma0": 0.0}, "sigma0"), ({"popsize": -3}, "popsize"),
                                               ({"restarts": -1}, "negative"), ({"max_evals": -5}, "negative")])
def test_bad_settings_are_refused_before_pycma_sees_them(settings, message):
    arguments = {"x0": np.full(3, 0.5), "sigma0": 0.1, **settings}
    with pytest.raises(ValueError, match=message):
        CMAES(**arguments)
