"""seq2seq-diff: encoder-decoder translation with differential attention everywhere."""

__version__ = "0.1.0"
