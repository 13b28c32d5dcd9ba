"""The ask/tell CMA-ES wrapper: it improves a known fitness, keeps to its bounds and
budget, restarts, and gives the same genomes for the same seed whatever else uses numpy."""
import numpy as np
import pytest

from niches.cmaes import CMAES, FULL_COVARIANCE_MAX_DIM


def negated_sphere(optimum: np.ndarray):
    return lambda x: -float(np.sum((x - optimum) ** 2))


def run(optimizer: CMAES, fitness) -> list[list[np.ndarray]]:
    generations = []
    while not optimizer.stop():
        genomes = optimizer.ask()
        optimizer.tell(genomes, [fitness(g) for g in genomes])
        generations.append(genomes)
    return generations


@pytest.mark.parametrize("separable", [False, True])
def test_improves_a_known_fitness_inside_the_bounds(separable):
    optimum = np.linspace(0.2, 0.8, 6)
    fitness = negated_sphere(optimum)
    optimizer = CMAES(np.full(6, 0.5), 0.3, seed=3, separable=separable, max_evals=600)
    generations = run(optimizer, fitness)
    start = fitness(np.full(6, 0.5))
    assert optimizer.best_fitness > start / 100
    assert np.allclose(optimizer.best_genome, optimum, atol=0.02)
    assert optimizer.evaluations == 600
    every = np.concatenate([np.stack(g) for g in generations])
    assert every.min() >= 0.0 and every.max() <= 1.0


def test_budget_trims_the_last_generation():
    optimizer = CMAES(np.zeros(3) + 0.5, 0.2, popsize=8, max_evals=20)
    sizes = [len(g) for g in run(optimizer, negated_sphere(np.zeros(3)))]
    assert sizes == [8, 8, 4] and optimizer.evaluations == 20


def test_same_seed_same_genomes_despite_the_global_numpy_state():
    def genomes(seed, disturb):
        optimizer = CMAES(np.full(4, 0.5), 0.2, seed=seed, max_evals=40)
        out = []
        while not optimizer.stop():
            g = optimizer.ask()
            if disturb:
                np.random.seed(1234)
                np.random.rand(10)
            optimizer.tell(g, [negated_sphere(np.full(4, 0.3))(x) for x in g])
            out.extend(g)
        return np.stack(out)

    assert np.array_equal(genomes(7, False), genomes(7, True))
    assert not np.array_equal(genomes(7, False), genomes(8, False))


def test_a_flat_fitness_does_not_stop_the_search():
    optimizer = CMAES(np.full(3, 0.5), 0.2, popsize=6, max_evals=60)
    run(optimizer, lambda x: 0.0)
    assert optimizer.evaluations == 60


def test_ipop_restarts_double_the_population():
    # a tiny sigma makes pycma stop at once (tolx), which triggers the restarts
    optimizer = CMAES(np.full(2, 0.5), 1e-13, popsize=6, restarts=2, max_evals=400)
    run(optimizer, negated_sphere(np.full(2, 0.5)))
    assert optimizer.restart == 2
    assert optimizer.popsize == 24


def test_separable_auto_switches_on_dimension():
    assert not CMAES(np.full(10, 0.5), 0.1).separable
    assert CMAES(np.full(FULL_COVARIANCE_MAX_DIM + 1, 0.5), 0.1).separable


def test_tell_rejects_mismatched_or_non_finite_fitness():
    optimizer = CMAES(np.full(3, 0.5), 0.1)
    genomes = optimizer.ask()
    with pytest.raises(ValueError, match="genomes but"):
        optimizer.tell(genomes, [0.0])
    with pytest.raises(ValueError, match="finite"):
        optimizer.tell(genomes, [float("nan")] * len(genomes))
