"""Sampler tests: parity with LLaVA's llava_trainer.py ordering, accelerate 0.21's sharding,
rank consistency, padding, modality purity, balance and resume."""

import random
from collections import Counter

import pytest
import torch

from minillava.sampler import (
    DistributedModalityLengthSampler,
    get_length_grouped_indices,
    get_modality_length_grouped_indices,
    pad_by_wrapping,
    shard_for_rank,
    split_to_even_chunks,
)

# ---------------------------------------------------------------------------------------------------------------------
# Oracle: LLaVA's algorithm (llava_trainer.py L38-96 at c121f04), written independently of minillava.sampler
# and checked step by step against the upstream source. Deliberately naive. Like LLaVA, the two inner group orders use
# the GLOBAL torch RNG (generator=None) and only the megabatch shuffle takes `generator`.
# ---------------------------------------------------------------------------------------------------------------------


def llava_split(indices, lengths, k):
    if len(indices) % k:
        return [indices[j::k] for j in range(k)]
    target = len(indices) // k
    out, load = [[] for _ in range(k)], [0] * k
    for idx in indices:
        j = min(range(k), key=lambda c: load[c])  # first minimum: lowest chunk id wins ties
        out[j].append(idx)
        load[j] += lengths[idx]
        if len(out[j]) == target:
            load[j] = float("inf")
    return out


def llava_length_grouped(lengths, b, ws, generator=None):
    perm = torch.randperm(len(lengths), generator=generator)
    m = ws * b
    result = []
    for s in range(0, len(lengths), m):
        megabatch = sorted(perm[s : s + m].tolist(), key=lambda i: -lengths[i])  # stable, longest first
        for chunk in llava_split(megabatch, lengths, ws):
            result += chunk
    return result


def llava_modality_grouped(lengths, b, ws, generator=None):
    assert all(n != 0 for n in lengths)
    if all(n > 0 for n in lengths) or all(n < 0 for n in lengths):
        return llava_length_grouped(lengths, b, ws, generator)
    mm = [(i, n) for i, n in enumerate(lengths) if n > 0]
    lang = [(i, -n) for i, n in enumerate(lengths) if n < 0]
    mm_order = [mm[j][0] for j in llava_length_grouped([n for _, n in mm], b, ws, None)]
    lang_order = [lang[j][0] for j in llava_length_grouped([n for _, n in lang], b, ws, None)]
    m = ws * b
    mm_mb = [mm_order[s : s + m] for s in range(0, len(mm_order), m)]
    lang_mb = [lang_order[s : s + m] for s in range(0, len(lang_order), m)]
    extra = mm_mb[-1] + lang_mb[-1]
    pool = mm_mb[:-1] + lang_mb[:-1]
    shuffled = [pool[int(p)] for p in torch.randperm(len(pool), generator=generator)]
    if extra:
        shuffled.append(sorted(extra))
    return [i for mb in shuffled for i in mb]


def random_lengths(n, seed, p_image=0.6, lo=1, hi=60):
    r = random.Random(seed)
    return [r.randint(lo, hi) * (1 if r.random() < p_image else -1) for _ in range(n)]


def steps_of(lengths, b, world, ga, **kw):
    """All ranks' micro-batches grouped per optimizer step: steps[t][s][r] = rank r's batch at micro-step s."""
    samplers = [DistributedModalityLengthSampler(lengths, b, world, r, grad_accum=ga, **kw) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    n_steps = samplers[0].steps_per_epoch
    assert len(per_rank[0]) == n_steps * ga
    return [[[per_rank[r][t * ga + s] for r in range(world)] for s in range(ga)] for t in range(n_steps)]


# --------------------------------------------------------------------------- pure functions


def test_split_to_even_chunks_golden():
    # Walk: 0->c0, 1->c1, 2->c1 (9 < 10), 3->c0 (tie 17/17 -> lowest id), 4->c0, 5->c1, 6->c1 (full), 7->c0.
    lengths = [10, 9, 8, 7, 6, 5, 4, 3]
    assert split_to_even_chunks(list(range(8)), lengths, 2) == [[0, 3, 4, 7], [1, 2, 5, 6]]
    # A full chunk counts as +inf: index 3 must go to chunk 0 although chunk 1 is lighter.
    assert split_to_even_chunks([0, 1, 2, 3], [100, 1, 1, 1], 2) == [[0, 3], [1, 2]]
    # Not divisible: strided chunks of unequal size.
    assert split_to_even_chunks([5, 4, 3, 2, 1, 0, 6], [1] * 7, 3) == [[5, 2, 6], [4, 1], [3, 0]]
    assert split_to_even_chunks([2], [1, 1, 1], 4) == [[2], [], [], []]


@pytest.mark.parametrize("trial", range(40))
def test_parity_with_llava_for_same_rng_stream(trial):
    # LLaVA draws inner permutations from the global RNG and the outer one from `generator`; with generator=None all
    # three come from the global stream. A fresh Generator seeded s gives the same stream as torch.manual_seed(s), so
    # feeding both from seed s compares the orders exactly, draw for draw.
    r = random.Random(trial)
    n, b, ws = r.randint(1, 140), r.randint(1, 5), r.randint(1, 9)
    p_image = r.choice([0.0, 1.0, 0.1, 0.5, 0.9])
    lengths = random_lengths(n, trial, p_image, hi=r.choice([3, 200]))  # hi=3: many ties
    torch.manual_seed(1000 + trial)
    theirs = llava_modality_grouped(lengths, b, ws)
    ours = get_modality_length_grouped_indices(lengths, b, ws, torch.Generator().manual_seed(1000 + trial))
    assert ours == theirs
    assert sorted(ours) == list(range(n))
    torch.manual_seed(trial)
    theirs = llava_length_grouped([abs(x) for x in lengths], b, ws)
    assert get_length_grouped_indices([abs(x) for x in lengths], b, ws, torch.Generator().manual_seed(trial)) == theirs


def test_all_three_draws_come_from_the_given_generator():
    lengths = random_lengths(60, 1)
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = get_modality_length_grouped_indices(lengths, 2, 3, g)
    assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched
    torch.manual_seed(999)
    assert get_modality_length_grouped_indices(lengths, 2, 3, torch.Generator().manual_seed(5)) == first
    assert get_modality_length_grouped_indices(lengths, 2, 3, g) != first  # g advanced by exactly the three draws


def test_golden_orders():
    lengths = [5, -3, 8, -1, 2, 7, -6, 4, 1, -2, 9, 3, -5, 6]
    g = torch.Generator().manual_seed(0)
    assert get_modality_length_grouped_indices(lengths, 2, 2, g) == GOLDEN_MODALITY
    g = torch.Generator().manual_seed(0)
    assert get_length_grouped_indices([abs(x) for x in lengths], 2, 2, g) == GOLDEN_LENGTH
    sampler = DistributedModalityLengthSampler(lengths, 2, 2, 1, grad_accum=1, seed=7)
    sampler.set_epoch(1)
    assert list(sampler) == GOLDEN_RANK1_EPOCH1


# Image megabatches [5,4|13,0] and [2,8|7,11], text [6,3|12,9] (balanced chunks a|b), shuffled; then the leftovers
# [10] + [1] merged and sorted. Hand-checked against llava_split; any change in RNG use or order breaks these.
GOLDEN_MODALITY = [5, 4, 13, 0, 6, 3, 12, 9, 2, 8, 7, 11, 1, 10]
GOLDEN_LENGTH = [6, 3, 7, 4, 10, 9, 2, 11, 5, 1, 13, 12, 0, 8]
GOLDEN_RANK1_EPOCH1 = [[13, 11], [2, 0], [12, 1], [5, 4]]


def test_zero_length_raises():
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\]"):
        get_modality_length_grouped_indices([3, 0, -2], 1, 1, torch.Generator())
    with pytest.raises(ValueError, match="modality length 0"):
        DistributedModalityLengthSampler([0, 0, 0], 1, 2, 0)
    # Plain random order (stage 1) does not look at lengths.
    assert len(list(DistributedModalityLengthSampler([0, 0, 0], 1, 2, 0, group_by_modality=False))) == 2


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="rank=2"):
        DistributedModalityLengthSampler([1, 2], 1, 2, 2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=0"):
        DistributedModalityLengthSampler([1, 2], 1, 2, 0, grad_accum=0)
    with pytest.raises(ValueError, match="empty"):
        DistributedModalityLengthSampler([], 1, 1, 0)


def test_shard_for_rank_matches_accelerate_even_batches():
    # Hand-traced through accelerate 0.21 BatchSamplerShard(split_batches=False, even_batches=True).
    order = list(range(10))
    assert shard_for_rank(order, 0, 2, 4) == [[0, 1, 2, 3], [8, 9, 0, 1]]
    assert shard_for_rank(order, 1, 2, 4) == [[4, 5, 6, 7], [2, 3, 4, 5]]
    # Fewer samples than one round: accelerate repeats the data until a round is full.
    assert shard_for_rank([7, 8, 9], 0, 2, 4) == [[7, 8, 9, 7]]
    assert shard_for_rank([7, 8, 9], 1, 2, 4) == [[8, 9, 7, 8]]
    assert shard_for_rank(list(range(8)), 1, 2, 2) == [[2, 3], [6, 7]]  # divisible: no padding
    assert pad_by_wrapping([4, 5], 5) == [4, 5, 4, 5, 4]


# --------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("ga", [1, 4])
@pytest.mark.parametrize(("n", "p_image"), [(203, 0.6), (97, 1.0), (40, 0.0), (3, 0.5)])
def test_sampler_invariants(world, ga, n, p_image):
    b = 2
    lengths = random_lengths(n, n + world + ga, p_image, hi=300)
    sampler = DistributedModalityLengthSampler(lengths, b, world, 0, grad_accum=ga, seed=3)
    order = sampler.global_order()
    m = world * ga * b
    assert len(order) == m * sampler.steps_per_epoch and len(order) - n < m
    assert sorted(order[:n]) == list(range(n))  # a permutation, then wrap padding from its own start
    assert order[n:] == [order[i % n] for i in range(len(order) - n)]

    steps = steps_of(lengths, b, world, ga, seed=3)
    flat = [i for step in steps for micro in step for batch in micro for i in batch]
    assert flat == order  # ranks and micro-steps tile the global order: disjoint, covering, padded only at the end
    assert all(len(batch) == b for step in steps for micro in step for batch in micro)
    assert Counter(flat) == Counter(order)

    grouped_steps = steps[: len(steps) - 2] if 0 < p_image < 1 else steps[:-1]
    for step in grouped_steps:
        micro_batches = [batch for micro in step for batch in micro]
        signs = {x > 0 for batch in micro_batches for x in (lengths[i] for i in batch)}
        assert len(signs) == 1  # single-modality optimizer step
        if p_image == 0.0:
            # LLaVA quirk kept for parity: all-text data falls back with the raw negative lengths, so the "descending"
            # sort is short-first and the greedy fills chunk after chunk: contiguous, not balanced.
            chunk_lengths = [abs(lengths[i]) for batch in micro_batches for i in batch]
            assert chunk_lengths == sorted(chunk_lengths)
            continue
        sums = [sum(abs(lengths[i]) for i in batch) for batch in micro_batches]
        longest = max(abs(lengths[i]) for batch in micro_batches for i in batch)
        assert max(sums) - min(sums) <= longest  # greedy balance across all ranks' micro-batches of the step


def test_balance_beats_random_split():
    # The greedy split must do much better than unsorted dealing on skewed lengths.
    lengths = [random.Random(i).choice([1, 1, 2, 500]) for i in range(8 * 16 * 20)]
    steps = steps_of(lengths, 16, 8, 1, group_by_modality=True, seed=0)
    spread = max(max(s) - min(s) for s in ([sum(lengths[i] for i in bt) for bt in st[0]] for st in steps[:-1]))
    assert spread <= 500
    rnd = list(range(len(lengths)))
    random.Random(0).shuffle(rnd)
    naive = [sum(lengths[i] for i in rnd[s : s + 16]) for s in range(0, 128, 16)]
    assert max(naive) - min(naive) > spread


def test_modality_steps_are_shuffled_together():
    lengths = [10] * 64 + [-10] * 64
    steps = steps_of(lengths, 2, 2, 2, seed=0)  # megabatch 8: 7 image + 7 text full steps, then the 2 leftover steps
    kinds = ["img" if lengths[step[0][0][0]] > 0 else "txt" for step in steps[:-2]]
    assert Counter(kinds) == {"img": 7, "txt": 7}
    assert kinds != sorted(kinds)  # interleaved, not all images first
    tail = [i for step in steps[-2:] for micro in step for batch in micro for i in batch]
    assert sorted(tail) == tail  # LLaVA's additional batch: sorted by index, mixed modality
    assert {lengths[i] > 0 for i in tail} == {True, False}


def test_determinism_epochs_and_seeds():
    lengths = random_lengths(150, 0)
    a = DistributedModalityLengthSampler(lengths, 2, 2, 1, grad_accum=2, seed=1)
    b = DistributedModalityLengthSampler(lengths, 2, 2, 1, grad_accum=2, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b)
    c = DistributedModalityLengthSampler(lengths, 2, 2, 1, grad_accum=2, seed=2)
    c.set_epoch(1)
    d = DistributedModalityLengthSampler(lengths, 2, 2, 1, grad_accum=2, seed=1)
    assert len({str(epoch1), str(list(c)), str(list(d))}) == 3  # epoch and seed both change the order
    for epoch in range(4):  # every epoch is a fresh permutation (150 samples, megabatch 8: 2 padded slots)
        a.set_epoch(epoch)
        order = a.global_order()
        assert sorted(order[:150]) == list(range(150)) and order[150:] == order[:2]


def test_sampler_matches_llava_order_and_ignores_global_rng():
    lengths = random_lengths(77, 4)
    sampler = DistributedModalityLengthSampler(lengths, 3, 2, 0, grad_accum=2, seed=10)
    sampler.set_epoch(2)
    torch.manual_seed(12)  # LLaVA, given the global stream of seed + epoch, with world_size * GA as its world size
    expected = pad_by_wrapping(llava_modality_grouped(lengths, 3, 4), 12)
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        assert sampler.global_order() == expected
        assert torch.equal(torch.get_rng_state(), state)


def test_plain_random_path():
    lengths = [1] * 21
    for rank in range(2):
        s = DistributedModalityLengthSampler(lengths, 4, 2, rank, grad_accum=2, seed=5, group_by_modality=False)
        s.set_epoch(3)
        perm = torch.randperm(21, generator=torch.Generator().manual_seed(8)).tolist()
        padded = perm + perm[:11]  # 21 -> 32 = two megabatches of 2 ranks * GA 2 * 4
        assert list(s) == [padded[k * 4 : k * 4 + 4] for k in range(rank, 8, 2)]
        assert s.steps_per_epoch == 2 and len(s) == 4


def test_tiny_dataset():
    lengths = [5, -4, 3]
    steps = steps_of(lengths, 4, 8, 4, seed=0)  # 3 samples, megabatch of 128
    assert len(steps) == 1
    flat = [i for micro in steps[0] for batch in micro for i in batch]
    assert len(flat) == 128 and set(flat) == {0, 1, 2}
    assert sorted(Counter(flat).values()) == [42, 43, 43]  # the 3-sample order repeated, cut at 128


@pytest.mark.parametrize("group_by_modality", [True, False])
def test_resume_mid_epoch(group_by_modality):
    lengths = random_lengths(230, 9)
    kw = dict(grad_accum=4, seed=11, group_by_modality=group_by_modality)
    ref = DistributedModalityLengthSampler(lengths, 2, 2, 1, **kw)
    ref.set_epoch(1)
    full_epoch1 = list(ref)
    ref.set_epoch(2)
    full_epoch2 = list(ref)

    run = DistributedModalityLengthSampler(lengths, 2, 2, 1, **kw)
    run.set_epoch(1)
    it = iter(run)
    seen = [next(it) for _ in range(9)]
    state = run.state_dict()
    assert state == {"epoch": 1, "position": 9} and seen == full_epoch1[:9]

    resumed = DistributedModalityLengthSampler(lengths, 2, 2, 1, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the training loop re-entering the saved epoch must not restart it
    assert list(resumed) == full_epoch1[9:]
    assert list(resumed) == []  # epoch exhausted until the caller moves on
    resumed.set_epoch(2)
    assert list(resumed) == full_epoch2
    with pytest.raises(ValueError, match="position"):
        resumed.load_state_dict({"epoch": 0, "position": len(resumed) + 1})


def test_longest_first():
    lengths = random_lengths(300, 2, hi=100)
    lengths[250] = 5000
    kw = dict(seed=0, grad_accum=2)
    base = DistributedModalityLengthSampler(lengths, 2, 4, 0, **kw).global_order()
    moved = DistributedModalityLengthSampler(lengths, 2, 4, 0, longest_first=True, **kw).global_order()
    m = 16
    blocks = [base[s : s + m] for s in range(0, len(base), m)]
    k = next(j for j, blk in enumerate(blocks) if 250 in blk)
    assert k > 0
    blocks[0], blocks[k] = blocks[k], blocks[0]
    assert moved == [i for blk in blocks for i in blk]
    steps = steps_of(lengths, 2, 4, 2, longest_first=True, seed=0)
    assert 250 in [i for micro in steps[0] for batch in micro for i in batch]


def test_works_as_dataloader_batch_sampler():
    lengths = random_lengths(37, 3)
    sampler = DistributedModalityLengthSampler(lengths, 4, 2, 0, grad_accum=2)
    loader = torch.utils.data.DataLoader(list(range(37)), batch_sampler=sampler)
    assert len(loader) == len(sampler) == 2 * sampler.steps_per_epoch
    assert [t.tolist() for t in loader] == shard_for_rank(sampler.global_order(), 0, 2, 4)
