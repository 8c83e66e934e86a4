"""Length-grouped batch order: every pair once per epoch, similar lengths together, a function of the seed."""

from dpop.data.order import epoch_order, micro_batches


def spread(order, lengths, batch_size):
    """Mean over batches of (longest - shortest) length: what padding costs."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)


def test_grouped_order_is_a_permutation_with_less_spread_and_depends_on_seed_and_epoch():
    lengths = [(i * 37) % 101 + 10 for i in range(203)]
    plain = epoch_order(203, 0, 0)
    grouped = epoch_order(203, 0, 0, lengths=lengths, group_size=8)
    assert sorted(grouped) == list(range(203))
    assert spread(grouped, lengths, 8) < spread(plain, lengths, 8) / 3
    assert grouped == epoch_order(203, 0, 0, lengths=lengths, group_size=8)
    assert grouped != epoch_order(203, 0, 1, lengths=lengths, group_size=8)
    assert grouped != epoch_order(203, 1, 0, lengths=lengths, group_size=8)


def test_grouped_batches_are_shuffled_not_sorted_over_the_epoch():
    lengths = list(range(512))
    order = epoch_order(512, 3, 0, lengths=lengths, group_size=4)
    batch_means = [sum(lengths[i] for i in order[b:b + 4]) / 4 for b in range(0, 512, 4)]
    assert batch_means != sorted(batch_means) and batch_means != sorted(batch_means, reverse=True)


def test_grouped_stream_resumes_at_the_same_place():
    lengths = [(i * 7) % 23 for i in range(50)]
    whole = micro_batches(50, 4, 2, lengths=lengths)
    first = [next(whole) for _ in range(20)]  # crosses into the second epoch
    resumed = micro_batches(50, 4, 2, start_epoch=first[9].epoch, start_index=first[9].index, lengths=lengths)
    assert [next(resumed).pair_indices for _ in range(10)] == [mb.pair_indices for mb in first[9:19]]
