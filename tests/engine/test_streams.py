"""Each rank's augmentation stream (cssfe/engine/sampler.py: seed_rank_streams, seed_loader_workers):
different between ranks, one process's stream on rank 0, continued exactly by a resumed run."""
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cssfe.data.transforms import build_transform
from cssfe.engine.checkpoint import rng_state, set_rng_state
from cssfe.engine.sampler import EpochShuffle, seed_loader_workers, seed_rank_streams
from cssfe.engine.train import seed_everything

IMAGE = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))


def _draws(n):
    augment = build_transform(32, train=True, augment="digits")  # random shifts and channel orders
    return [augment(IMAGE) for _ in range(n)]


def _rank_draws(rank, n, seed=0):
    seed_everything(seed)  # what every rank does first, so that all build the same model
    torch.nn.Linear(4, 4)  # ... which draws from the same generators on every rank
    seed_rank_streams(seed, rank)
    return _draws(n)


def test_ranks_draw_different_augmentations_and_rank_0_keeps_one_process_stream():
    ranks = [_rank_draws(r, 6) for r in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            same = sum(torch.equal(x, y) for x, y in zip(ranks[a], ranks[b]))
            assert same <= 1, (a, b, same)  # 1 in 9 shifts x 6 channel orders may meet by chance
    seed_everything(0)
    torch.nn.Linear(4, 4)
    single = _draws(6)
    assert all(torch.equal(x, y) for x, y in zip(ranks[0], single))  # the default run is unchanged


def test_a_resumed_rank_continues_its_stream():
    """The checkpoint holds each rank's generator states: restored, rank 1 draws what the
    uninterrupted run drew after the checkpoint (not rank 0's, not its own first draws)."""
    whole = _rank_draws(1, 6)
    first = _rank_draws(1, 3)
    saved = rng_state()
    seed_everything(123)  # a new process: anything else
    set_rng_state(saved)
    rest = _draws(3)
    assert all(torch.equal(x, y) for x, y in zip(first + rest, whole))


def test_loader_workers_seed_from_seed_rank_and_epoch():
    """With data.num_workers > 0 each worker seeds from the loader's base seed: one per (seed,
    rank, epoch), the same again when an epoch is run again (resume)."""
    loader = DataLoader(list(range(8)), batch_size=2, sampler=EpochShuffle(8, seed=0), generator=torch.Generator())

    def base_seed(rank, epoch, seed=0):
        seed_loader_workers(loader, seed, rank, epoch)
        return iter(loader)._base_seed

    seeds = {(r, e): base_seed(r, e) for r in range(2) for e in range(3)}
    assert len(set(seeds.values())) == len(seeds)
    assert base_seed(1, 2) == seeds[(1, 2)] and base_seed(1, 2, seed=1) != seeds[(1, 2)]
