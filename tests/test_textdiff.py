"""Character edit distance and token common-prefix length, against values worked out by hand."""

import pytest
import torch

from dpop.data.textdiff import first_difference, normalized_edit_distance


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("", "", 0.0),  # two empty strings are identical
        ("", "abc", 1.0),  # 3 insertions / 3
        ("abc", "abc", 0.0),
        ("kitten", "sitting", 3 / 7),  # k->s, e->i, +g: 3 edits over the longer length 7
        ("12 + 21 = 33.", "12 + 21 = 35.", 1 / 13),  # one digit substituted in 13 characters
        ("abcd", "abd", 1 / 4),  # one deletion
        ("ab", "ba", 1.0),  # two substitutions (Levenshtein has no transposition)
        ("The answer is 7.", "The answer is 17.", 1 / 17),  # one insertion
    ],
)
def test_normalized_edit_distance_hand_values(a, b, expected):
    assert normalized_edit_distance(a, b) == pytest.approx(expected)
    assert normalized_edit_distance(b, a) == pytest.approx(expected)  # symmetric


def test_normalized_edit_distance_counts_unicode_characters_not_bytes():
    # "×" is 2 bytes in UTF-8 but one character: one substitution over 5 characters.
    assert normalized_edit_distance("3 × 4", "3 + 4") == pytest.approx(1 / 5)


@pytest.mark.parametrize(
    ("a_ids", "b_ids", "expected"),
    [
        ([5, 8, 2, 9], [5, 8, 3], 2),
        ([1, 2, 3], [4, 2, 3], 0),  # differ at the very first token
        ([1, 2, 3], [1, 2, 3], 3),  # equal: the whole length
        ([1, 2], [1, 2, 3, 4], 2),  # a prefix of the other: the shorter length
        ([], [1], 0),
        ((7, 7, 7), (7, 7, 0), 2),  # tuples are fine too
    ],
)
def test_first_difference_hand_values(a_ids, b_ids, expected):
    assert first_difference(a_ids, b_ids) == expected
    assert first_difference(b_ids, a_ids) == expected


def test_first_difference_accepts_tensors():
    assert first_difference(torch.tensor([3, 1, 4, 1, 5]), torch.tensor([3, 1, 4, 2, 5])) == 3
    assert first_difference(torch.tensor([3, 1]), [3, 1, 4]) == 2
