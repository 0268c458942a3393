"""One entry point for every data format: `read_utterances(path)` → list of `Utterance`.

Formats, told apart by the path:
- a `.json` file: a JSON manifest (gharial.data.manifest);
- WebDataset tar shards: a `.tar` file, a folder of them, or a glob such as `shards/train_*.tar`.
  Member `<key>.flac` or `<key>.wav` is the audio and `<key>.txt` its transcript; the key is the
  member name up to the first dot of its file name, as in WebDataset; other members are ignored;
- a Hugging Face dataset: a folder written by `Dataset.save_to_disk` (Arrow stream files), or a
  `.parquet` file or a folder of them. Columns: `audio` (a struct of `bytes` and/or `path`), the
  transcript (the first of `text`, `transcript`, `sentence`, `normalized_text`) and optionally `id`;
- any other folder: CAIMAN-ASR's "directory of audio": every .wav/.flac below it, each with its
  transcript in the same-named .txt (`read_audio_dir`).

Audio that comes out of a shard or a dataset stays encoded in `Utterance.audio_bytes`: nothing is
extracted to disk, and `Utterance.audio` (`<shard or arrow file>/<member or path>`) only names it.
Every malformed input raises `ManifestError` naming the file (and the key or row).
"""

from __future__ import annotations

import glob
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

from gharial.data.manifest import ManifestError, Utterance, read_json_manifest

AUDIO_SUFFIXES = (".flac", ".wav")
TRANSCRIPT_COLUMNS = ("text", "transcript", "sentence", "normalized_text")


def read_utterances(path: str | Path) -> list[Utterance]:
    """The utterances at `path`, whatever its format (see the module docstring)."""
    if any(c in str(path) for c in "*?["):
        shards = sorted(Path(p) for p in glob.glob(str(path)))
        if not shards:
            raise ManifestError(f"{path}: no files match")
        return read_tar_shards(shards)
    path = Path(path)
    if path.suffix == ".json":
        return read_json_manifest(path)
    if path.suffix == ".tar":
        return read_tar_shards([path])
    if path.suffix == ".parquet":
        return read_hf_dataset(path)
    if not path.is_dir():
        raise ManifestError(
            f"{path}: not found, or not a known data format (a .json manifest, .tar shard, "
            ".parquet file, or a folder of shards, audio or a Hugging Face dataset)"
        )
    if any((path / name).is_file() for name in ("dataset_info.json", "state.json")):
        return read_hf_dataset(path)
    if any(path.glob("*.parquet")):
        return read_hf_dataset(path)
    if shards := sorted(path.glob("*.tar")):
        return read_tar_shards(shards)
    return read_audio_dir(path)


def read_tar_shards(shards: list[Path]) -> list[Utterance]:
    return [utt for shard in shards for utt in _read_tar_shard(shard)]


def _read_tar_shard(shard: Path) -> list[Utterance]:
    audio: dict[str, tuple[str, bytes]] = {}  # key → (member name, encoded audio)
    transcripts: dict[str, str] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                folder, _, name = member.name.rpartition("/")
                stem, _, suffix = name.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if not member.isfile() or f".{suffix}" not in (*AUDIO_SUFFIXES, ".txt"):
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]  # a file has data
                if suffix == "txt":
                    transcripts[key] = _decode(data, f"{shard}: {member.name}")
                elif key in audio:
                    raise ManifestError(f"{shard}: key {key!r} has two audio files")
                else:
                    audio[key] = member.name, data
            # tarfile stops quietly at a cut between members; a whole archive ends in zero blocks.
            if shard.stat().st_size < tar.offset + tarfile.BLOCKSIZE:
                raise ManifestError(f"{shard}: truncated tar shard (no end-of-archive marker)")
    except (tarfile.TarError, OSError) as err:
        raise ManifestError(f"{shard}: unreadable tar shard: {err}") from err
    if unpaired := sorted(audio.keys() ^ transcripts.keys()):
        key = unpaired[0]
        missing = "transcript (.txt)" if key in audio else "audio (.flac/.wav)"
        raise ManifestError(f"{shard}: key {key!r} has no {missing}; {len(unpaired)} unpaired key(s)")
    return [
        _utterance(key, Path(f"{shard}/{name}"), transcripts[key], f"{shard}: {name}", data)
        for key, (name, data) in audio.items()
    ]


def read_audio_dir(audio_dir: str | Path, txt_dir: str | Path | None = None) -> list[Utterance]:
    """Every .wav/.flac below `audio_dir`; the transcript of `audio_dir/a/b.flac` is `txt_dir/a/b.txt`
    (`txt_dir` defaults to `audio_dir`). Ids are the relative paths without the suffix."""
    audio_dir = Path(audio_dir)
    txt_dir = Path(txt_dir) if txt_dir is not None else audio_dir
    files = sorted(p for p in audio_dir.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise ManifestError(f"{audio_dir}: no .wav or .flac files (nor a manifest, shards or a dataset)")
    utterances = []
    for file in files:
        relative = file.relative_to(audio_dir).with_suffix("")
        txt = txt_dir / relative.with_suffix(".txt")
        try:
            transcript = _decode(txt.read_bytes(), str(txt))
        except FileNotFoundError as err:
            raise ManifestError(f"{file}: transcript {txt} not found") from err
        utterances.append(_utterance(relative.as_posix(), file, transcript, str(file)))
    return utterances


def read_hf_dataset(path: str | Path) -> list[Utterance]:
    """A dataset saved by `datasets` (save_to_disk folder, or .parquet file/folder), read with pyarrow
    so that training does not depend on `datasets`."""
    path = Path(path)
    files = (
        [path] if path.is_file() else (sorted(path.glob("*.parquet")) or sorted(path.glob("data-*.arrow")))
    )
    if not files:
        raise ManifestError(f"{path}: no .parquet or data-*.arrow files in this Hugging Face dataset")
    return [utt for file in files for utt in _read_arrow_table(file)]


def _read_arrow_table(file: Path) -> list[Utterance]:
    try:
        if file.suffix == ".parquet":
            table = pq.read_table(file)
        else:
            with pa.memory_map(str(file)) as source:
                table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise ManifestError(f"{file}: unreadable dataset file: {err}") from err
    columns = table.column_names
    text_column = next((c for c in TRANSCRIPT_COLUMNS if c in columns), None)
    audio_type = table.schema.field("audio").type if "audio" in columns else None
    if (
        text_column is None
        or audio_type is None
        or not pa.types.is_struct(audio_type)
        or not {"bytes", "path"} & {f.name for f in audio_type}
    ):
        raise ManifestError(
            f"{file}: needs an 'audio' column (a struct with 'bytes' and/or 'path') and a transcript "
            f"column (one of {', '.join(TRANSCRIPT_COLUMNS)}); it has {', '.join(columns)}"
        )
    ids = table.column("id").to_pylist() if "id" in columns else [None] * len(table)
    utterances = []
    for row, (audio, text, utt_id) in enumerate(
        zip(table.column("audio").to_pylist(), table.column(text_column).to_pylist(), ids, strict=True)
    ):
        where = f"{file}: row {row}"
        if text is None or audio is None or not (audio.get("bytes") or audio.get("path")):
            raise ManifestError(f"{where}: no transcript or no audio")
        data, name = audio.get("bytes"), audio.get("path") or str(row)
        # Audio kept only by path: relative paths are relative to the dataset's folder.
        location = Path(f"{file}/{name}") if data is not None else file.parent / name
        utterances.append(_utterance(str(utt_id or f"{file.name}:{row}"), location, text, where, data))
    return utterances


def _utterance(utt_id: str, audio: Path, transcript: str, where: str, data: bytes | None = None) -> Utterance:
    """An utterance whose duration and rate come from the audio header (formats without a manifest
    do not state them)."""
    try:
        info = soundfile.info(io.BytesIO(data) if data is not None else str(audio))
    except RuntimeError as err:  # soundfile's errors, file not found included
        raise ManifestError(f"{where}: unreadable audio {audio}: {err}") from err
    return Utterance(
        id=utt_id,
        audio=audio,
        transcript=transcript,
        duration=info.duration,
        sample_rate=info.samplerate,
        audio_bytes=data,
    )


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise ManifestError(f"{where}: transcript is not UTF-8 text") from err
