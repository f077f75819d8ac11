"""Building a batch iterator leaves the global torch RNG alone.

A resumed run restores the RNG state from the checkpoint and only then builds its data
iterators; if building one drew from the global generator (as a DataLoader iterator does for its
worker base seed unless given its own generator), every dropout mask after a resume would come
one draw off the uninterrupted run's. tests/distributed/test_training.py checks the whole resume.
"""

import torch

from megatron_grow.data.datasets import make_batch_iterator


def test_make_batch_iterator_does_not_draw_from_the_global_rng():
    samples = [{"tokens": torch.full((4,), i)} for i in range(16)]
    torch.manual_seed(7)
    before = torch.get_rng_state()
    batches = make_batch_iterator(samples, consumed_samples=4, micro_batch_size=2, dp_rank=0, dp_size=1)
    first = next(batches)
    assert torch.equal(torch.get_rng_state(), before)
    assert first["tokens"][:, 0].tolist() == [4, 5]  # resumes at consumed_samples
