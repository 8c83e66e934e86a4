"""How far apart a chosen and a rejected response are: in characters, and in tokens.

The DPOP paper's failure mode lives at low edit distance: pairs that differ in a few characters (one number
in a worked solution) are where DPO can lower the chosen response's likelihood. `dpop data doctor` and the
arithmetic task use `normalized_edit_distance` to say how close a data set's pairs are; the trainer uses
`first_difference` to find where y_w and y_l part ways (the `tokens/divergent_chosen_logp` metric).

    >>> normalized_edit_distance("12 + 21 = 33.", "12 + 21 = 35.")
    0.07692307692307693
    >>> first_difference([5, 8, 2, 9], [5, 8, 3])
    2
"""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein


def normalized_edit_distance(a: str, b: str) -> float:
    """Character Levenshtein distance divided by the longer string's length, in [0, 1].

    Insertions, deletions and substitutions each cost 1. Two empty strings are 0.0 apart (identical);
    an empty and a non-empty string are 1.0 apart.
    """
    longer = max(len(a), len(b))
    if longer == 0:
        return 0.0
    return Levenshtein.distance(a, b) / longer


def first_difference(a_ids: Sequence[int], b_ids: Sequence[int]) -> int:
    """Length of the common prefix of two id sequences: the first position where they differ.

    Lists, tuples and 1-D tensors are all fine. If one sequence is a prefix of the other (or they are equal),
    the answer is the shorter one's length.
    """
    a_list = a_ids.tolist() if hasattr(a_ids, "tolist") else list(a_ids)
    b_list = b_ids.tolist() if hasattr(b_ids, "tolist") else list(b_ids)
    for position, (a_id, b_id) in enumerate(zip(a_list, b_list)):
        if a_id != b_id:
            return position
    return min(len(a_list), len(b_list))
