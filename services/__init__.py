"""Gharial service processes: thin entry points around the gharial library, one folder each."""
