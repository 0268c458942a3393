"""Gharial: open streaming speech recognition (LSTM RNN-T core, services, tools)."""

__version__ = "0.1.0"
# Release date of this version, ISO 8601. Programs record it (licences cap it, DESIGN §5); a fixed
# constant rather than the clock, so compiling the same checkpoint twice gives identical bytes.
RELEASE_DATE = "2026-11-25"
