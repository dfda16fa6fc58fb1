"""Bundle archives: pack a bundle folder into one .tar.gz / .zip, and extract one safely.

Extraction reads manifest.json first and writes only the files it lists (an archive's other
members are never written), within caps on members and bytes checked against the archive's
index before anything is written and again while writing.
"""

from __future__ import annotations

import contextlib
import enum
import json
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from bertedge.errors import BertedgeError
from bertedge.runtime.manifest import MANIFEST, REBUILD, plain_name

# Caps on what extracting an archive may write: a bundle is 3 or 4 files, and the largest
# BERT-family ONNX models bertedge ships are well under 4 GiB (protobuf's own 2 GiB limit
# without external data); a manifest is a few KiB.
MAX_ARCHIVE_BYTES = 4 << 30
MAX_ARCHIVE_MEMBERS = 16
MAX_MANIFEST_BYTES = 4 << 20
ONLY_OURS = "only use archives made by `bertedge package`"

Opener = Callable[[], IO[bytes]]


class ArchiveFormat(str, enum.Enum):
    """How a bundle is shipped: a folder, or one archive file."""

    TAR_GZ = "tar.gz"
    ZIP = "zip"


def archive_format_of(path: Path) -> ArchiveFormat | None:
    """The archive format a path's name implies, if any.

    >>> archive_format_of(Path("b.tar.gz")), archive_format_of(Path("b.zip")), archive_format_of(Path("b"))
    (<ArchiveFormat.TAR_GZ: 'tar.gz'>, <ArchiveFormat.ZIP: 'zip'>, None)
    """
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return ArchiveFormat.TAR_GZ
    if name.endswith(".zip"):
        return ArchiveFormat.ZIP
    return None


def archive_path(out: Path, fmt: ArchiveFormat) -> Path:
    """`out` with the archive suffix added when it does not already carry it.

    >>> archive_path(Path("b"), ArchiveFormat.ZIP), archive_path(Path("b.tar.gz"), ArchiveFormat.TAR_GZ)
    (PosixPath('b.zip'), PosixPath('b.tar.gz'))
    """
    return out if archive_format_of(out) == fmt else out.with_name(f"{out.name}.{fmt.value}")


def archive_bundle(folder: Path, dest: Path, fmt: ArchiveFormat) -> Path:
    """Pack a bundle folder's files, flat, into one .tar.gz or .zip file (the manifest first)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    names = [MANIFEST, *json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]]
    if fmt is ArchiveFormat.TAR_GZ:
        with tarfile.open(dest, "w:gz") as tar:
            for n in names:
                tar.add(folder / n, arcname=n)
    else:
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for n in names:
                zf.write(folder / n, arcname=n)
    return dest


def is_bundle_archive(path: Path) -> bool:
    """Whether a file is a bundle archive (an archive holding a manifest.json), read cheaply."""
    fmt = archive_format_of(path)
    if fmt is None:
        return False
    try:
        with members(path, fmt) as found:
            return any(Path(name).name == MANIFEST for name in found)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, TypeError):
        return False


def extract_archive(archive: Path, fmt: ArchiveFormat, dest: Path) -> Path:
    """Extract a bundle archive's manifest and the files it lists into dest; the bundle root.

    The root is dest, or its one subfolder for an archive of the folder itself (`tar czf b.tar.gz
    bundle/`). Members the manifest does not list are not written.

    Raises:
        BertedgeError: a truncated or corrupt archive, an unsafe member path, or more members or
            bytes than the caps allow.
    """
    try:
        with members(archive, fmt) as found:
            check_archive_index(archive, [(name, size) for name, (size, _) in found.items()])
            for name in found:
                check_member_name(name)
            prefix = manifest_prefix(found)
            if prefix is None:
                return dest  # no manifest: the bundle check says so
            budget = [MAX_ARCHIVE_BYTES]
            write_member(dest / MANIFEST, found[prefix + MANIFEST][1], [MAX_MANIFEST_BYTES], archive,
                         MAX_MANIFEST_BYTES)
            for name in listed_files(dest / MANIFEST):
                if prefix + name in found:
                    write_member(dest / name, found[prefix + name][1], budget, archive)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
            NotImplementedError, RuntimeError) as e:  # zipfile: NotImplemented compression, encrypted
        raise BertedgeError(f"bundle archive '{archive}' is truncated or corrupt ({e})", REBUILD) from None
    return dest


@contextlib.contextmanager
def members(archive: Path, fmt: ArchiveFormat) -> Iterator[dict[str, tuple[int, Opener]]]:
    """An archive's plain-file members: name -> (declared size, open its data)."""
    if fmt is ArchiveFormat.TAR_GZ:
        with tarfile.open(archive, "r:gz") as tar:
            entries = tar.getmembers()

            def tar_opener(member: tarfile.TarInfo) -> Opener:
                return lambda: tar.extractfile(member)  # type: ignore[return-value]

            yield {m.name: (m.size, tar_opener(m)) for m in entries if m.isfile()}
    else:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()

            def zip_opener(info: zipfile.ZipInfo) -> Opener:
                return lambda: zf.open(info)

            yield {i.filename: (i.file_size, zip_opener(i)) for i in infos if not i.is_dir()}


def manifest_prefix(found: dict[str, tuple[int, Opener]]) -> str | None:
    """Where the manifest sits: '' (flat), 'folder/' (an archive of the folder), or None."""
    if MANIFEST in found:
        return ""
    nested = [n for n in found if Path(n).name == MANIFEST and len(Path(n).parts) == 2]
    return nested[0][: -len(MANIFEST)] if len(nested) == 1 else None


def listed_files(manifest: Path) -> list[str]:
    """The plain file names a manifest lists (a broken manifest lists none: the schema check
    reports it)."""
    try:
        files = json.loads(manifest.read_text(encoding="utf-8")).get("files")
    except (ValueError, AttributeError, RecursionError):
        return []
    if not isinstance(files, dict):
        return []
    return [n for n in files if isinstance(n, str) and plain_name(n) and n != MANIFEST][:MAX_ARCHIVE_MEMBERS]


def check_archive_index(archive: Path, entries: list[tuple[str, int]]) -> None:
    """Refuse an archive whose index declares too many members or too many bytes."""
    total = sum(max(size, 0) for _, size in entries)
    if len(entries) > MAX_ARCHIVE_MEMBERS or total > MAX_ARCHIVE_BYTES:
        raise BertedgeError(
            f"bundle archive '{archive}' holds {len(entries)} members and {total} bytes; a bundle "
            f"has at most {MAX_ARCHIVE_MEMBERS} members and {MAX_ARCHIVE_BYTES} bytes", ONLY_OURS)


def check_member_name(name: str) -> None:
    """Refuse a member path that could land outside the extraction folder."""
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or len(parts) > 2 or "\0" in name:
        raise BertedgeError(f"bundle archive member {name[:80]!r} has an unsafe path", ONLY_OURS)


def write_member(target: Path, opener: Opener, budget: list[int], archive: Path,
                 cap: int | None = None) -> None:
    """Stream one archive member to disk within the byte budget (`cap`: the budget's size)."""
    with opener() as source, target.open("wb") as f:
        for block in iter(lambda: source.read(1 << 20), b""):
            budget[0] -= len(block)
            if budget[0] < 0:  # the index lied about sizes
                raise BertedgeError(f"bundle archive '{archive}' expands past {cap or MAX_ARCHIVE_BYTES} bytes",
                                    ONLY_OURS)
            f.write(block)
