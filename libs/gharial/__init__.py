"""Gharial: open streaming speech recognition (LSTM RNN-T core, services, tools)."""

__version__ = "0.1.0"
