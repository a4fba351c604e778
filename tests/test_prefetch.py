"""accum.Prefetcher: the next window prepared in a thread gives the same windows, in the same order,
as preparing each in the loop; a window prepared for other indices is not used."""

from __future__ import annotations

import threading

import pytest

from accum.prefetch import Prefetcher


def recording_prepare(calls: list):
    def prepare(subset):
        calls.append((threading.current_thread().name, list(subset.indices)))
        return [subset[i] for i in range(len(subset))]
    return prepare


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_windows_and_their_order_are_the_same_with_and_without_workers(workers):
    data = [f"sample-{i}" for i in range(20)]
    windows = [[3, 1, 4], [1, 5, 9], [2, 6, 5], [3, 5]]
    calls: list = []
    prefetch = Prefetcher(recording_prepare(calls), data, workers)
    try:
        taken = []
        for number, indices in enumerate(windows):
            taken.append(prefetch.take(indices))
            if number + 1 < len(windows):
                prefetch.ahead(windows[number + 1])
    finally:
        prefetch.close()
    assert taken == [[data[i] for i in indices] for indices in windows]
    assert [indices for _, indices in calls] == windows  # each window prepared once
    in_threads = [name for name, _ in calls if name.startswith("accum-prefetch")]
    assert len(in_threads) == (0 if workers == 0 else len(windows) - 1)  # all but the first ahead of time
    assert prefetch.waited >= 0


def test_a_window_prepared_for_other_indices_is_prepared_again():
    data = list(range(10))
    calls: list = []
    prefetch = Prefetcher(recording_prepare(calls), data, 1)
    try:
        prefetch.ahead([0, 1])
        assert prefetch.take([2, 3]) == [2, 3]  # the plan changed: another window than the one ahead
        assert prefetch.take([0, 1]) == [0, 1]  # the stale one was dropped, not kept for later
    finally:
        prefetch.close()
    assert [indices for _, indices in calls] == [[0, 1], [2, 3], [0, 1]]


@pytest.mark.parametrize("workers", [-1, 1.5, True, "2"])
def test_workers_must_be_a_whole_number(workers):
    with pytest.raises(ValueError, match="workers must be a whole number"):
        Prefetcher(lambda subset: subset, [], workers)
