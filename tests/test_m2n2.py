"""M2N2 (niches/m2n2.py), its baselines (niches/baselines.py) and the classifier study's parts."""
from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from evaluation.zoo.mlp import Classifier, MLPShape, random_params
from merging.errors import EvomergeError
from niches.baselines import MapElites, RandomSearch, SlerpSweep, genetic_algorithm, slerp_sweep
from niches.coefficients import SourceGram, slerp_split_members
from niches.m2n2 import (NaturalNiches, attraction, fitness_sharing, load_state, replacement_index, save_state,
                         select_first_parent, select_second_parent, slerp, slerp_split)
from niches.search import Candidate, Search


def tell(search, member: np.ndarray, scores, kind: str = "seed"):
    """Tell one member with its per-example scores (one task); return where it went."""
    search.tell([Candidate(member, kind)], [{"train": np.asarray(scores)}])
    return search.last_slots[0]


def step(search, evaluate) -> np.ndarray:
    """One ask/tell round of a one-child search; the child."""
    (child,) = search.ask()
    search.tell([child], [{"train": np.asarray(evaluate(child.genome))}])
    return child.genome

# three members, four examples; nobody solves example 2, everybody example 3
S = np.array([[1, 1, 0, 1],
              [1, 0, 0, 1],
              [0, 0, 0, 1]], dtype=np.float32)


def test_fitness_sharing_by_hand():
    shared, f = fitness_sharing(S, alpha=1.0)
    # z = (2, 1, 0 -> 1, 3)
    np.testing.assert_allclose(shared, [[1 / 2, 1, 0, 1 / 3], [1 / 2, 0, 0, 1 / 3], [0, 0, 0, 1 / 3]])
    np.testing.assert_allclose(f, [1 / 2 + 1 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3])
    _, plain = fitness_sharing(S, alpha=0.0)
    np.testing.assert_allclose(plain, [3, 2, 1])
    _, half = fitness_sharing(S, alpha=0.5)
    np.testing.assert_allclose(half, [1 / math.sqrt(2) + 1 + 1 / math.sqrt(3), 1 / math.sqrt(2) + 1 / math.sqrt(3),
                                      1 / math.sqrt(3)])


def test_attraction_by_hand():
    shared, f = fitness_sharing(S)
    # parent A = member 2 (only example 3, shared by all): 0 gains 1/2 + 1, 1 gains 1/2
    np.testing.assert_allclose(attraction(shared, 2), [1.5, 0.5, 0.0])
    # parent A = member 1: only member 0 is better anywhere (example 1)
    np.testing.assert_allclose(attraction(shared, 1), [1.0, 0.0, 0.0])
    rng = np.random.default_rng(0)
    draws = np.array([select_second_parent(shared, f, 2, rng) for _ in range(4000)])
    assert set(draws) == {0, 1}
    assert abs((draws == 0).mean() - 0.75) < 0.03
    assert {select_second_parent(shared, f, 1, rng) for _ in range(200)} == {0}


def test_first_parent_follows_shared_fitness():
    _, f = fitness_sharing(S)
    rng = np.random.default_rng(1)
    draws = np.array([select_first_parent(f, rng) for _ in range(6000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 6000, f / f.sum(), atol=0.02)


def test_all_zero_attraction_falls_back_to_fitness_among_the_others():
    dominant = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 0]], dtype=np.float32)
    shared, f = fitness_sharing(dominant)
    assert attraction(shared, 0).sum() == 0
    rng = np.random.default_rng(0)
    assert {select_second_parent(shared, f, 0, rng) for _ in range(200)} == {1, 2}
    lonely, f1 = fitness_sharing(np.ones((1, 3)))
    assert select_second_parent(lonely, f1, 0, rng) == 0
    # no fitness anywhere: still a valid draw, uniform
    zero, f0 = fitness_sharing(np.zeros((3, 2)))
    assert {select_first_parent(f0, rng) for _ in range(200)} == {0, 1, 2}
    assert {select_second_parent(zero, f0, 0, rng) for _ in range(200)} == {1, 2}


def slerp_reference(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """SLERP from its definition, in float64, one ratio per coordinate."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    omega = np.arccos(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    return np.sin((1 - t) * omega) / np.sin(omega) * a + np.sin(t * omega) / np.sin(omega) * b


@pytest.mark.parametrize("w, split", [(0.3, 17), (0.9, 0), (0.25, 50), (0.6, 1)])
def test_slerp_split_matches_the_definition(w, split):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(50).astype(np.float32), rng.standard_normal(50).astype(np.float32)
    t = np.where(np.arange(50) < split, w, 1 - w)
    child = slerp_split(a, b, w, split)
    assert child.dtype == np.float32
    np.testing.assert_allclose(child, slerp_reference(a, b, t), rtol=1e-5, atol=1e-6)


def test_slerp_endpoints_norm_and_small_angles():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    np.testing.assert_allclose(slerp(a, b, 0.0), a)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(slerp(a, b, 0.3)), 1.0)  # on the circle, not the chord
    np.testing.assert_allclose(slerp(a, b, 0.5), [math.sqrt(0.5), math.sqrt(0.5)])
    # parallel vectors: no angle to divide by, linear interpolation
    np.testing.assert_allclose(slerp(a, 3 * a, 0.5), 2 * a)


def test_allowed_boundaries():
    a, b = np.ones(30, dtype=np.float32), np.arange(30, dtype=np.float32)
    with pytest.raises(ValueError, match="allowed"):
        slerp_split(a, b, 0.5, 7, allowed_boundaries=np.array([0, 10, 30]))
    assert slerp_split(a, b, 0.5, 10, allowed_boundaries=np.array([0, 10, 30])).shape == (30,)
    seen = []

    def recording_crossover(x, y, w, split):
        seen.append(split)
        return slerp_split(x, y, w, split)

    search = NaturalNiches(4, seeds=[a, b], allowed_boundaries=np.array([0, 10, 30]), crossover_fn=recording_crossover,
                           seed=0)
    seeds = search.ask()
    assert [c.kind for c in seeds] == ["seed", "seed"] and seeds[1].genome is search.seeds[1]
    search.tell(seeds, [{"train": np.array([1, 0, 1])}, {"train": np.array([0, 1, 1])}])
    for _ in range(300):
        step(search, lambda child: np.array([1, 1, 0], dtype=np.float32))
    assert set(seen) == {0, 10, 30}


def test_switches_no_crossover_and_no_split_point():
    splits = []

    def recording_crossover(x, y, w, split):
        splits.append(split)
        return slerp_split(x, y, w, split)

    members = [np.array([1, 2, 3, 4, 5, 6], dtype=np.float32), np.array([6, -5, 4, 3, -2, 1], dtype=np.float32)]
    plain = NaturalNiches(3, crossover=False, seed=0)
    nosplit = NaturalNiches(3, split_point=False, crossover_fn=recording_crossover, seed=0)
    for search in (plain, nosplit):
        for m, s in zip(members, ([1, 0], [0, 1])):
            tell(search, m, np.array(s, dtype=np.float32))
    for _ in range(20):
        child = step(plain, lambda child: np.array([1, 0], dtype=np.float32))  # a parent itself: no crossover
        assert any(np.array_equal(child, m) for m in members)
        step(nosplit, lambda child: np.array([0, 0], dtype=np.float32))
    assert set(splits) == {6}  # one ratio over the whole vector


def test_archive_update_rule():
    scores = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.float32)
    assert replacement_index(scores, np.array([0, 0, 1], dtype=np.float32), 1.0, capacity=3) == 2  # room: append
    # full: with the child, z = (2, 1, 1): f = (1.5, 0.5) and 1 for the child, so member 1 goes
    assert replacement_index(scores, np.array([0, 0, 1], dtype=np.float32), 1.0, capacity=2) == 1
    # the child ties with member 1 (1/3 each): the member goes, as the reference's argmin does
    assert replacement_index(scores, np.array([1, 0, 0], dtype=np.float32), 1.0, capacity=2) == 1
    # a child that solves nothing is the least fit: rejected
    assert replacement_index(scores, np.array([0, 0, 0], dtype=np.float32), 1.0, capacity=2) is None
    # competition decides, not accuracy: member 1 solves only example 2 but alone, so with
    # alpha = 1 (z = 2, 2, 1, 1: f = 1, 1, child 2) the more accurate member 0 goes; alpha = 0 drops member 1
    pair = np.array([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    child = np.array([1, 1, 0, 1], dtype=np.float32)
    assert replacement_index(pair, child, 1.0, capacity=2) == 0
    assert replacement_index(pair, child, 0.0, capacity=2) == 1
    search = NaturalNiches(2, seed=0)
    for row in scores:
        tell(search, row.copy(), row)
    assert tell(search, np.zeros(3, dtype=np.float32), np.zeros(3), "sample") is None
    assert tell(search, np.full(3, 7.0, dtype=np.float32), np.array([0, 0, 1]), "sample") == 1
    np.testing.assert_array_equal(search.scores, [[1, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(search.members[1], [7, 7, 7])
    assert search.kinds == ["seed", "sample"] and search.best().kind == "seed"
    with pytest.raises(ValueError, match=">= 0"):
        tell(search, np.zeros(3, dtype=np.float32), np.array([-1, 0, 0]))
    with pytest.raises(ValueError, match="examples"):
        tell(search, np.zeros(3, dtype=np.float32), np.array([1, 0]))
    # the resources are every task's examples end to end, in task order
    two_tasks = NaturalNiches(2, seed=0)
    two_tasks.tell([Candidate(np.zeros(2), "seed")], [{"a": np.array([1, 0]), "b": np.array([0.5])}])
    np.testing.assert_array_equal(two_tasks.scores, [[1, 0, 0.5]])


def test_children_per_ask_draws_from_one_archive_and_spends_the_budget_exactly():
    """k children per ask are what one-at-a-time asks give when nothing enters the archive
    in between (every child rejected by a full archive); the last ask stops at the budget."""
    members = [np.array([1, 2, 3, 4, 5, 6], dtype=np.float32), np.array([6, -5, 4, 3, -2, 1], dtype=np.float32)]

    def seeded(**settings) -> NaturalNiches:
        search = NaturalNiches(2, seeds=members, max_evals=7, seed=4, **settings)
        search.tell(search.ask(), [{"train": np.array(s, dtype=np.float32)} for s in ([1, 0], [0, 1])])
        return search

    def rejected(candidates) -> list[dict]:
        return [{"train": np.zeros(2, dtype=np.float32)} for _ in candidates]

    one, batched = seeded(), seeded(children_per_ask=3)
    singles, rounds = [], []
    while not one.stop():
        (child,) = one.ask()
        one.tell([child], rejected([child]))
        singles.append(child.genome)
    while not batched.stop():
        children = batched.ask()
        batched.tell(children, rejected(children))
        rounds.append([c.genome for c in children])
    assert [len(r) for r in rounds] == [3, 3, 1] and batched.children == one.children == 7
    np.testing.assert_array_equal(np.stack([g for r in rounds for g in r]), np.stack(singles))
    assert len({g.tobytes() for g in singles}) > 1  # the children differ: the comparison means something
    arrays, meta = batched.state()
    assert NaturalNiches.from_state(arrays, meta).children_per_ask == 3
    with pytest.raises(ValueError, match="children_per_ask"):
        NaturalNiches(2, children_per_ask=0)


@pytest.fixture(scope="module")
def digits():
    from evaluation.tasks import load_digits_split

    torch.set_num_threads(1)
    x, y, _, _ = load_digits_split()
    shape = MLPShape(64, 32, 10)
    return shape, Classifier(shape, x * 16, y)


def seeded_search(digits, seed: int = 0, **settings) -> NaturalNiches:
    shape, train = digits
    generator = torch.Generator().manual_seed(seed)
    seeds = [random_params(shape, generator) for _ in range(2)]
    search = NaturalNiches(10, seeds=seeds, mutation_std=0.01, seed=seed, **settings)
    evolve(search, train, 0)
    return search


def evolve(search: NaturalNiches, train: Classifier, steps: int) -> None:
    """`steps` children, after the seeds if they are not told yet (a budget, as a run sets it)."""
    search.max_evals = search.children + steps
    while not search.stop():
        candidates = search.ask()
        search.tell(candidates, [{"train": train.scores(c.genome)[0]} for c in candidates])


def test_quick_digits_run_improves_and_is_reproducible(digits):
    shape, train = digits
    search = seeded_search(digits)
    start = search.scores.mean(axis=1).max()
    evolve(search, train, 400)
    best = search.scores.mean(axis=1).max()
    assert best > start + 0.1, (start, best)
    np.testing.assert_array_equal(search.best().genome, search.members[search.best_index()])
    assert isinstance(search, Search) and search.children == 400 and search.evaluations == 402
    again = seeded_search(digits)
    evolve(again, train, 400)
    np.testing.assert_array_equal(np.stack(again.members), np.stack(search.members))
    other = seeded_search(digits, seed=1)
    evolve(other, train, 400)
    assert not np.array_equal(np.stack(other.members[:2]), np.stack(search.members[:2]))


def test_save_restore_continues_like_an_uninterrupted_run(digits, tmp_path):
    _, train = digits
    uninterrupted = seeded_search(digits, seed=3)
    evolve(uninterrupted, train, 150)
    killed = seeded_search(digits, seed=3)
    evolve(killed, train, 100)
    arrays, meta = killed.state()
    save_state(tmp_path / "state.safetensors", arrays, {"search": meta})
    del killed  # the process dies; only the file remains
    arrays, meta = load_state(tmp_path / "state.safetensors")
    resumed = NaturalNiches.from_state(arrays, meta["search"])
    assert resumed.evaluations == 102
    evolve(resumed, train, 50)
    np.testing.assert_array_equal(np.stack(resumed.members), np.stack(uninterrupted.members))
    np.testing.assert_array_equal(resumed.scores, uninterrupted.scores)
    assert not list(tmp_path.glob("*.tmp-*"))  # written atomically, nothing left over
    resumed.max_evals = None
    resumed.ask()
    with pytest.raises(RuntimeError, match="between ask and tell"):
        resumed.state()


def test_ga_is_m2n2_without_competition_or_attraction():
    ga = genetic_algorithm(5, mutation_std=0.01, seed=2)
    assert (ga.alpha, ga.attraction, ga.crossover, ga.split_point) == (0.0, False, True, True)


def test_coefficient_members_cross_over_like_their_parameters():
    """The LLM path: members are per-tensor coefficients over sources, the crossover is
    niches.coefficients', splits are tensor boundaries; the child is the flat SLERP's."""
    rng = np.random.default_rng(0)
    sizes = np.array([4, 6, 5])
    sources = [rng.standard_normal(sizes.sum()) for _ in range(3)]
    ends = np.concatenate([[0], np.cumsum(sizes)])
    grams = np.stack([np.array([[s[ends[k]:ends[k + 1]] @ r[ends[k]:ends[k + 1]] for r in sources] for s in sources])
                      for k in range(3)])
    gram = SourceGram(["s0", "s1", "s2"], ["t0", "t1", "t2"], sizes, grams, ["embed", "L0", "head"])

    def materialise(member: np.ndarray) -> np.ndarray:
        return np.concatenate([sum(member[k, s] * sources[s][ends[k]:ends[k + 1]] for s in range(3))
                               for k in range(3)])

    draws = []

    def crossover(a, b, w, split):
        draws.append((a, b, w, split))
        return slerp_split_members(a, b, w, split, gram)

    search = NaturalNiches(4, seeds=[gram.one_hot(s) for s in range(3)], n_params=int(sizes.sum()),
                           allowed_boundaries=gram.boundaries(), crossover_fn=crossover)
    search.tell(search.ask(), [{"train": row} for row in np.eye(3)])
    for _ in range(5):
        (child,) = search.ask()
        a, b, w, split = draws[-1]
        np.testing.assert_allclose(materialise(child.genome), slerp_split(materialise(a), materialise(b), w, split),
                                   rtol=1e-9, atol=1e-9)
        search.tell([child], [{"train": rng.integers(0, 2, 3).astype(np.float32)}])
    assert {d[3] for d in draws} <= set(gram.boundaries().tolist())


def odd_even(scores) -> tuple[float, float]:
    """The reference's descriptors: accuracy on the odd and on the even examples' classes
    (here the scores' own `odd` and `even` tasks)."""
    return float(np.mean(scores["odd"])), float(np.mean(scores["even"]))


def test_map_elites_grid_insertion_and_resume():
    grid = MapElites(odd_even, cells=10, quality=lambda scores: float(scores["quality"][0]), seed=0)

    def offer(member: np.ndarray, descriptors: tuple[float, float], quality: float) -> bool:
        """Offer a member whose scores give these descriptors and this quality."""
        odd, even = descriptors
        grid.tell([Candidate(member)], [{"odd": np.array([odd]), "even": np.array([even]),
                                         "quality": np.array([quality])}])
        return grid.last_inserted[0]

    assert offer(np.zeros(4, dtype=np.float32), (0.05, 0.95), 0.5)
    assert grid.cell((0.05, 0.95)) == (0, 9)
    assert not offer(np.ones(4, dtype=np.float32), (0.09, 0.91), 0.4)  # same cell, worse
    assert not offer(np.ones(4, dtype=np.float32), (0.09, 0.91), 0.5)  # a tie keeps the elite
    assert offer(np.full(4, 2.0, dtype=np.float32), (0.0, 0.99), 0.6)  # better: replaces
    assert offer(np.full(4, 3.0, dtype=np.float32), (1.0, 1.0), 0.55)  # a perfect half: last cell
    assert sorted(grid.elites) == [(0, 9), (9, 9)]
    np.testing.assert_array_equal(grid.best().genome, np.full(4, 2.0))
    np.testing.assert_allclose(grid.quality[0, 9], 0.6)
    arrays, meta = grid.state()
    copy = MapElites.from_state(arrays, meta, descriptor=odd_even, quality=grid.quality_of)
    np.testing.assert_array_equal(copy.ask()[0].genome, grid.ask()[0].genome)


def test_map_elites_asks_its_seeds_first_and_spends_its_budget_on_children():
    grid = MapElites(odd_even, seeds=[np.zeros(3), np.ones(3)], max_evals=4, seed=0)
    evaluate = lambda c: {"odd": np.array([c.genome.mean()]), "even": np.array([1 - c.genome.mean()])}  # noqa: E731
    kinds = []
    while not grid.stop():
        candidates = grid.ask()
        kinds += [c.kind for c in candidates]
        grid.tell(candidates, [evaluate(c) for c in candidates])
    assert kinds == ["seed", "seed"] + ["sample"] * 4 and (grid.evaluations, grid.children) == (6, 4)


def test_brute_force_sweep_picks_the_best_ratio():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])  # SLERP(t) = (cos(t pi/2), sin(t pi/2))

    def closeness_to_0_3(batch: np.ndarray) -> np.ndarray:
        t = np.arctan2(batch[:, 1], batch[:, 0]) / (math.pi / 2)
        return -np.abs(t - 0.3)

    ratio, fitness = slerp_sweep(a, b, closeness_to_0_3, steps=101, batch_size=7)
    assert ratio == pytest.approx(0.3)
    assert fitness.shape == (101,) and fitness.argmax() == 30
    ratio, _ = slerp_sweep(a, b, lambda batch: np.ones(len(batch)), steps=11)
    assert ratio == 0.0  # ties: the first, as the reference keeps only strict improvements
    # as a search: batches of ratios, resumable
    sweep = SlerpSweep(a, b, steps=11, batch_size=4)
    assert isinstance(sweep, Search) and [len(sweep.ask()) for _ in range(2)] == [4, 4]  # asking twice: the same batch
    batch = sweep.ask()
    sweep.tell(batch, [{"t": -np.abs(np.arctan2(c.genome[1], c.genome[0]) / (math.pi / 2) - 0.2)} for c in batch])
    resumed = SlerpSweep.from_state(*sweep.state())
    assert [len(resumed.ask()), resumed.best_ratio] == [4, pytest.approx(0.2)]
    np.testing.assert_allclose(resumed.best().genome, slerp(a, b, 0.2))


def test_random_search_is_uniform_seeded_and_spends_exactly_its_budget():
    search = RandomSearch(3, max_evals=10, popsize=4, seed=5)
    asked, fitness_values = [], []
    while not search.stop():
        candidates = search.ask()
        asked.append(len(candidates))
        values = [c.genome.sum() for c in candidates]  # fitness: the sum of the genes
        fitness_values += values
        search.tell(candidates, [{"sum": np.array([v])} for v in values])
    assert asked == [4, 4, 2] and search.evaluations == 10
    assert search.best_fitness == max(fitness_values) and search.best().genome.sum() == max(fitness_values)
    again = RandomSearch(3, max_evals=10, popsize=4, seed=5)
    first = again.ask()
    again.tell(first, [{"sum": np.array([c.genome.sum()])} for c in first])
    resumed = RandomSearch.from_state(*again.state())
    np.testing.assert_array_equal([c.genome for c in resumed.ask()], [c.genome for c in again.ask()])
    many = np.stack([c.genome for c in RandomSearch(2, max_evals=4000, popsize=4000, seed=0).ask()])
    assert many.min() >= 0 and many.max() < 1 and np.allclose(many.mean(axis=0), 0.5, atol=0.02)


def test_mlp_layout_is_the_reference_one():
    shape = MLPShape(3, 4, 2)
    params = np.arange(shape.size, dtype=np.float32) / 10 - 1
    x = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])
    w1, b1 = params[:12].reshape(3, 4), params[12:16]
    w2, b2 = params[16:24].reshape(4, 2), params[24:26]
    expected = np.maximum(x.numpy() @ w1 + b1, 0) @ w2 + b2
    np.testing.assert_allclose(shape.logits(torch.tensor(params), x)[0].numpy(), expected, rtol=1e-6)
    y = torch.tensor(expected.argmax(axis=1))
    np.testing.assert_array_equal(Classifier(shape, x, y).scores(np.stack([params, params])), np.ones((2, 2)))


def test_fashion_mnist_reads_idx_and_names_the_package(tmp_path):
    from evaluation.zoo.fashion_mnist import FILES, load_fashion_mnist

    with pytest.raises(EvomergeError, match="dataset-fashion-mnist"):
        load_fashion_mnist(directory=tmp_path)
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    for split in ("train", "test"):
        image_file, label_file = FILES[split]
        with gzip.open(tmp_path / image_file, "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28))
                    + images.astype(np.uint8).tobytes())
        with gzip.open(tmp_path / label_file, "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 2, 9]))
    x, y, xt, yt = load_fashion_mnist(train_size=2, pool=2, directory=tmp_path)
    assert x.shape == (2, 196) and xt.shape == (3, 196)
    assert y.tolist() == [7, 2] and yt.tolist() == [7, 2, 9]
    np.testing.assert_allclose(x[0, 0].item(), images[0, :2, :2].mean() / 255, rtol=1e-6)


def test_one_slerp_rule_with_the_references_threshold():
    """M2N2 uses the SLERP operator's formula (merging/operators/slerp.py); only the angle
    below which it interpolates linearly is the reference's (sin < 1e-6), not mergekit's
    (|cos| > 0.9995, about 1.8 degrees)."""
    from merging.operators.slerp import slerp as operator_slerp
    from merging.operators.slerp import slerp_scales
    from niches.m2n2 import member_slerp_scales

    for degrees in (30.0, 1.0):
        a = np.array([1.0, 0.0])
        b = np.array([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])
        ours = slerp(a, b, 0.3)
        operator = operator_slerp(torch.tensor(a), torch.tensor(b), 0.3).numpy()
        if degrees == 30.0:  # an ordinary angle: the same arc
            np.testing.assert_allclose(ours, operator, rtol=1e-12)
        else:  # 1 degree: the operator takes the chord, M2N2 stays on the arc as the reference does
            np.testing.assert_allclose(operator, 0.7 * a + 0.3 * b, rtol=1e-12)
            np.testing.assert_allclose(np.linalg.norm(ours), 1.0, rtol=1e-12)
            assert member_slerp_scales(math.cos(math.radians(degrees)), 0.3) != slerp_scales(
                math.cos(math.radians(degrees)), 0.3)
