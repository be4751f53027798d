"""LLaVA-1.5's training order: modality- and length-grouped megabatches, sharded per rank (LengthGroupedSampler).

Pure index functions reproduce llava/train/llava_trainer.py L38-96 (commit c121f04) but draw every random number from
one explicit torch.Generator; shard_for_rank reproduces how accelerate 0.21 dealt per-device batches.
DistributedModalityLengthSampler is the thin, resumable batch sampler the training loop hands to its DataLoader;
eval_batches deals the validation set.
"""

import math
from collections.abc import Iterator, Sequence

import torch


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Split length-sorted indices into num_chunks chunks of balanced summed length (llava_trainer.py L38-57)."""
    if len(indices) % num_chunks != 0:
        # Only a short last megabatch gets here; LLaVA then deals strided chunks whose sizes may differ.
        return [list(indices[j::num_chunks]) for j in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals: list[float] = [0] * num_chunks
    for index in indices:
        # Greedy longest-processing-time: the lightest chunk wins, ties go to the lowest chunk id.
        lightest = totals.index(min(totals))
        chunks[lightest].append(index)
        totals[lightest] += lengths[index]
        if len(chunks[lightest]) == per_chunk:
            totals[lightest] = math.inf  # full: it can never be the lightest again
    return chunks


def get_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """Permute, cut into megabatches of world_size*batch_size, sort each longest first, balance (L88-96)."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch_size = world_size * batch_size
    order: list[int] = []
    for start in range(0, len(perm), megabatch_size):
        # sorted() is stable under reverse=True, so equal lengths keep their permuted order exactly as in LLaVA.
        megabatch = sorted(perm[start : start + megabatch_size], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(megabatch, lengths, world_size):
            order.extend(chunk)
    return order


def _check_no_zero(lengths: Sequence[int]) -> None:
    zero = [i for i, n in enumerate(lengths) if n == 0]
    if zero:
        raise ValueError(f"modality length 0 for sample(s) {zero[:10]}: need > 0 (image) or < 0 (text-only)")


def get_modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """Group image (length > 0) and text-only (< 0) samples into single-modality megabatches (L60-85).

    All three permutations come from `generator`, in LLaVA's order: image group, text group, megabatch shuffle."""
    _check_no_zero(lengths)
    image_ids = [i for i, n in enumerate(lengths) if n > 0]
    text_ids = [i for i, n in enumerate(lengths) if n < 0]
    if not image_ids or not text_ids:
        # Single modality: length grouping on the raw lengths (LLaVA's fix for #609/#715). All-text lengths are
        # negative, so the sort is shortest first and the greedy fills chunk after chunk unbalanced; kept for parity.
        return get_length_grouped_indices(lengths, batch_size, world_size, generator)
    megabatch_size = world_size * batch_size
    groups: list[list[list[int]]] = []
    for ids in (image_ids, text_ids):
        local = get_length_grouped_indices([abs(lengths[i]) for i in ids], batch_size, world_size, generator)
        order = [ids[j] for j in local]
        groups.append([order[s : s + megabatch_size] for s in range(0, len(order), megabatch_size)])
    full = groups[0][:-1] + groups[1][:-1]  # LLaVA drew the two group orders from the global RNG, we from generator
    shuffled = [i for k in torch.randperm(len(full), generator=generator).tolist() for i in full[k]]
    # Up to two steps' worth of leftovers, mixed modality, neither length-sorted nor balanced (as in LLaVA).
    return shuffled + sorted(groups[0][-1] + groups[1][-1])


def pad_by_wrapping(indices: Sequence[int], multiple: int) -> list[int]:
    """Extend indices to a multiple of `multiple` by cycling from the start, like accelerate's even_batches."""
    n = len(indices)
    return list(indices) + [indices[i % n] for i in range(-n % multiple)]


def shard_for_rank(indices: Sequence[int], rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's micro-batches: batch j of the wrap-padded order goes to rank j % world_size (accelerate 0.21).

    So chunk j of a LLaVA megabatch runs on rank j % world at micro-step j // world, as under LLaVA's launcher."""
    padded = pad_by_wrapping(indices, world_size * batch_size)
    batches = [padded[s : s + batch_size] for s in range(0, len(padded), batch_size)]
    return batches[rank::world_size]


def _longest_megabatch_first(order: list[int], lengths: Sequence[int], megabatch_size: int) -> list[int]:
    """Swap the megabatch holding the longest sample with the first one, so an OOM shows at step 0 (prismatic)."""
    blocks = [order[s : s + megabatch_size] for s in range(0, len(order), megabatch_size)]
    longest = max(range(len(blocks)), key=lambda k: max(abs(lengths[i]) for i in blocks[k]))
    blocks[0], blocks[longest] = blocks[longest], blocks[0]
    return [i for block in blocks for i in block]


class DistributedModalityLengthSampler:
    """Batch sampler of this rank's micro-batches (list[int]); a megabatch of world*GA*batch is one optimizer step.

    Epoch e's order uses a torch.Generator seeded with seed + e (same on every rank, no global RNG). group_by_modality
    is LLaVA's --group_by_modality_length (world_size*GA as its world size, L135-148); False is stage 1's plain random
    permutation (HF RandomSampler). The order is wrap-padded from its start to whole megabatches: every rank gets as
    many full micro-batches and every step GA of them (GA=1: accelerate's even_batches; LLaVA ran a short last step).
    longest_first (off by default, not LLaVA) swaps the megabatch holding the longest |length| to step 0.
    Resume: state_dict() is epoch and position (micro-batches handed out); set_epoch(e) resets position only for a new
    e. DataLoader workers draw ahead, so checkpoint the loop's own count: epoch = step // steps_per_epoch, position =
    step % steps_per_epoch * GA.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        world_size: int,
        rank: int,
        grad_accum: int = 1,
        seed: int = 42,
        group_by_modality: bool = True,
        longest_first: bool = False,
    ) -> None:
        if min(batch_size, world_size, grad_accum) < 1 or not 0 <= rank < world_size:
            sizes = f"per_device_train_batch_size={batch_size}, gradient_accumulation_steps={grad_accum}"
            raise ValueError(f"need sizes >= 1 and 0 <= rank < world_size: {sizes}, world={world_size}, rank={rank}")
        if len(lengths) == 0:
            raise ValueError("the training set is empty: the sampler needs at least one sample")
        if group_by_modality:
            _check_no_zero(lengths)
        self.lengths = list(lengths)
        self.batch_size, self.world_size, self.rank, self.grad_accum = batch_size, world_size, rank, grad_accum
        self.seed, self.group_by_modality, self.longest_first = seed, group_by_modality, longest_first
        self.megabatch_size = world_size * grad_accum * batch_size
        self.epoch, self.position = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last one partly wrap-padded when the dataset does not divide)."""
        return math.ceil(len(self.lengths) / self.megabatch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.grad_accum

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order to yield; a new epoch starts from its first micro-batch."""
        if epoch != self.epoch:
            self.position = 0
        self.epoch = epoch

    def global_order(self) -> list[int]:
        """The padded order of the current epoch over all ranks (megabatch after megabatch), same on every rank."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_by_modality:
            ws = self.world_size * self.grad_accum
            order = get_modality_length_grouped_indices(self.lengths, self.batch_size, ws, generator)
        else:
            order = torch.randperm(len(self.lengths), generator=generator).tolist()
        order = pad_by_wrapping(order, self.megabatch_size)
        if self.longest_first:
            order = _longest_megabatch_first(order, self.lengths, self.megabatch_size)
        return order

    def __iter__(self) -> Iterator[list[int]]:
        batches = shard_for_rank(self.global_order(), self.rank, self.world_size, self.batch_size)
        while self.position < len(batches):
            self.position += 1  # counted before the yield: a batch received by the caller is consumed
            yield batches[self.position - 1]

    def state_dict(self) -> dict[str, int]:
        """Epoch and micro-batches already handed out in it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore epoch and position; the next iteration yields exactly the remaining micro-batches."""
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"sampler position {state['position']} outside 0..{len(self)}: batch config changed?")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


PAD_SAMPLE = -1  # an eval batch slot without a sample: a rank that ran out still joins every forward (FSDP gathers)


def eval_batches(num_samples: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """The validation set in order, dealt round-robin to the ranks (sample i to rank i % world_size) and cut into
    micro-batches of batch_size; every rank gets the same number of micro-batches, a rank left without a sample for
    one gets [PAD_SAMPLE] (a fully masked sample: no loss, no token)."""
    mine = list(range(rank, num_samples, world_size))
    steps = math.ceil(math.ceil(num_samples / world_size) / batch_size)
    return [mine[k * batch_size : (k + 1) * batch_size] or [PAD_SAMPLE] for k in range(steps)]
