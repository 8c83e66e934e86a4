"""Preference data: files -> validated PreferencePairs (rows.py documents the accepted shapes).

`readers` turns a file into records tagged with their line or row; `rows` checks every record and builds
the pairs; `tokenize` turns pairs into token ids.
"""

from dpop.data.pairs import LoadedPairs, Message, PreferencePair
from dpop.data.rows import load_pairs, pairs_from_rows

__all__ = ["LoadedPairs", "Message", "PreferencePair", "load_pairs", "pairs_from_rows"]
