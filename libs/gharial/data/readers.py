"""One entry point for every data format: `read_utterances(path)` → list of `Utterance`.

Formats, told apart by the path:
- a `.json` file: a JSON manifest (gharial.data.manifest).
"""

from __future__ import annotations

from pathlib import Path

from gharial.data.manifest import ManifestError, Utterance, read_json_manifest


def read_utterances(path: str | Path) -> list[Utterance]:
    path = Path(path)
    if path.suffix == ".json":
        return read_json_manifest(path)
    raise ManifestError(f"{path}: unknown data format (expected a .json manifest)")
