"""Safe extraction of uploaded `.zip` / `.tar.gz` archives holding a PEFT adapter or a native artifact.

Uploads come from users, so nothing is trusted: members are written one by one by us (never extractall), with paths
checked, links and devices refused, sizes and counts capped while reading (declared sizes can lie), pickle files
refused, and on any error the partial extraction is removed so nothing is left on disk.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import socket
import stat
import tarfile
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from .errors import InvalidPrompt, PayloadTooLarge, StorageFull, is_disk_full
from .format import MANIFEST_NAME
from .peft_io import CONFIG_NAME, PICKLE_REFUSAL, PICKLE_SUFFIXES

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps against zip/gzip bombs: compressed input, total uncompressed bytes, one file, and member count."""
    max_archive_bytes: int = 256 << 20
    max_total_bytes: int = 512 << 20
    max_file_bytes: int = 512 << 20
    max_files: int = 32


# beside the one tensor file, an adapter folder holds small JSON/text files (config, manifest, a model card)
_SMALL_FILES_BYTES = 4 << 20


def limits_for_model(fp, max_virtual_tokens: int, max_archive_bytes: int) -> ArchiveLimits:
    """Caps a valid adapter for this model cannot exceed, so a bomb within the upload limit is refused while it is
    being extracted, not after filling the disk. The largest valid tensor is max_virtual_tokens rows of
    max(D, L*2*H_kv*Dh) (prefix tuning) values of at most 8 bytes; safetensors adds a small header."""
    per_token = max(fp.hidden_size, fp.num_layers * 2 * fp.num_kv_heads * fp.head_dim)
    tensor = max_virtual_tokens * per_token * 8 + (1 << 20)
    return ArchiveLimits(max_archive_bytes=max_archive_bytes, max_file_bytes=tensor,
                         max_total_bytes=tensor + _SMALL_FILES_BYTES)


class _Budget:
    """Counts bytes and files actually written, whatever the headers claim."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits, self.total, self.files = limits, 0, 0

    def admit(self, dest: Path, name: str, is_dir: bool, size: int) -> tuple[str, ...] | None:
        """A member's checked path parts, its header's size within the limits; None for a directory (made here)."""
        parts = _safe_parts(name)
        _check_name(parts, is_dir)
        if is_dir:
            dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
            return None
        self.add_file()
        if size > self.limits.max_file_bytes or self.total + size > self.limits.max_total_bytes:
            raise PayloadTooLarge(f"{name!r}: expected at most {self.limits.max_total_bytes} bytes "
                                  f"uncompressed in total, found a member of {size}")
        return parts

    def add_file(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise PayloadTooLarge(f"archive expected at most {self.limits.max_files} files, found more")

    def add_bytes(self, n: int, file_total: int, name: str) -> None:
        self.total += n
        if file_total > self.limits.max_file_bytes:
            raise PayloadTooLarge(f"{name}: expected at most {self.limits.max_file_bytes} bytes uncompressed, "
                                  f"found more")
        if self.total > self.limits.max_total_bytes:
            raise PayloadTooLarge(f"archive expected at most {self.limits.max_total_bytes} bytes uncompressed in "
                                  f"total, found more")


def _safe_parts(name: str) -> tuple[str, ...]:
    """Relative, normalized member path parts; refuses absolute paths, '..', drive letters and odd names."""
    if not name or "\x00" in name:
        raise InvalidPrompt(f"archive member name expected a relative path, found {name!r}")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise InvalidPrompt(f"archive member expected a relative path, found absolute path {name!r}")
    if "\\" in name:
        raise InvalidPrompt(f"archive member expected '/' separators, found {name!r}")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise InvalidPrompt(f"archive member expected a path inside the archive, found {name!r} (contains '..')")
    if not parts:
        raise InvalidPrompt(f"archive member name expected a relative path, found {name!r}")
    return parts


def _check_name(parts: tuple[str, ...], is_dir: bool) -> None:
    if not is_dir and parts[-1].lower().endswith(PICKLE_SUFFIXES):
        raise InvalidPrompt(f"archive holds {'/'.join(parts)!r}: {PICKLE_REFUSAL}")
    if len(parts) > 8:
        raise InvalidPrompt(f"archive member expected at most 8 path levels, found {'/'.join(parts)!r}")


def _write_member(dest: Path, parts: tuple[str, ...], src: BinaryIO, budget: _Budget) -> None:
    target = dest.joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    name = "/".join(parts)
    written = 0
    try:
        out = open(target, "xb")  # x: a duplicate name is refused, never overwritten
    except FileExistsError:
        raise InvalidPrompt(f"archive holds {name!r} twice") from None
    with out:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            written += len(chunk)
            budget.add_bytes(len(chunk), written, name)
            out.write(chunk)


def _extract_zip(data: BinaryIO, dest: Path, limits: ArchiveLimits) -> None:
    budget = _Budget(limits)
    with zipfile.ZipFile(data) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files * 4:
            raise PayloadTooLarge(f"archive expected at most {limits.max_files} files, found {len(infos)} entries")
        for info in infos:
            mode = (info.external_attr >> 16) & 0o170000
            if mode and mode not in (stat.S_IFREG, stat.S_IFDIR):
                what = "a symbolic link" if mode == stat.S_IFLNK else "a special file"
                raise InvalidPrompt(f"archive member {info.filename!r} expected a regular file, found {what}")
            if info.flag_bits & 0x1:
                raise InvalidPrompt(f"archive member {info.filename!r} is encrypted; expected plain files")
            parts = budget.admit(dest, info.filename, info.is_dir(), info.file_size)
            if parts is None:
                continue
            with zf.open(info) as src:  # CRC and size are verified while streaming
                _write_member(dest, parts, src, budget)


def _extract_tar(data: BinaryIO, dest: Path, limits: ArchiveLimits) -> None:
    budget = _Budget(limits)
    entries = 0
    with tarfile.open(fileobj=data, mode="r:gz") as tf:
        while True:
            member = tf.next()
            if member is None:
                break
            entries += 1
            if entries > limits.max_files * 4:
                raise PayloadTooLarge(f"archive expected at most {limits.max_files} files, found more entries")
            if member.issym() or member.islnk():
                raise InvalidPrompt(f"archive member {member.name!r} expected a regular file, found a "
                                    f"{'symbolic' if member.issym() else 'hard'} link")
            if not (member.isreg() or member.isdir()) or member.issparse():
                raise InvalidPrompt(f"archive member {member.name!r} expected a regular file, found a special file")
            parts = budget.admit(dest, member.name, member.isdir(), member.size)
            if parts is None:
                continue
            src = tf.extractfile(member)
            if src is None:
                raise InvalidPrompt(f"archive member {member.name!r} could not be read")
            _write_member(dest, parts, src, budget)
            if (dest.joinpath(*parts)).stat().st_size != member.size:
                raise InvalidPrompt(f"archive is truncated: {member.name!r} expected {member.size} bytes, found "
                                    f"{dest.joinpath(*parts).stat().st_size}")


def content_root(dest: Path) -> Path:
    """The files may sit at the top level or inside exactly one directory."""
    entries = [p for p in dest.iterdir() if p.name not in ("__MACOSX", ".DS_Store")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def detect_layout(root: Path) -> str:
    """'native' (task.json) or 'peft' (adapter_config.json)."""
    if (root / MANIFEST_NAME).is_file():
        return "native"
    if (root / CONFIG_NAME).is_file():
        return "peft"
    found = sorted(p.name for p in root.iterdir())[:10]
    raise InvalidPrompt(f"expected {MANIFEST_NAME} (native artifact) or {CONFIG_NAME} (PEFT adapter), found {found}")


def extract_archive(data: bytes | BinaryIO | Path, dest_parent: Path, *, filename: str = "",
                    limits: ArchiveLimits = ArchiveLimits()) -> tuple[Path, Path]:
    """Extract into a fresh temp dir under dest_parent; returns (temp_dir, content_root). The caller removes
    temp_dir (or use `extracted`). On error nothing is left behind."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > limits.max_archive_bytes:
            raise PayloadTooLarge(f"archive expected at most {limits.max_archive_bytes} bytes, found {len(data)}")
        stream: BinaryIO = io.BytesIO(data)
    elif isinstance(data, Path):
        size = data.stat().st_size
        if size > limits.max_archive_bytes:
            raise PayloadTooLarge(f"archive expected at most {limits.max_archive_bytes} bytes, found {size}")
        stream = open(data, "rb")
    else:
        stream = data
    try:
        head = stream.read(4)
        stream.seek(0)
        Path(dest_parent).mkdir(parents=True, exist_ok=True)
        # host and pid in the name: a restarted store removes a killed process's extraction at once
        tmp = Path(tempfile.mkdtemp(prefix=f"upload-{socket.gethostname()}-{os.getpid()}-", dir=dest_parent))
        try:
            if head[:2] == b"PK":
                _extract_zip(stream, tmp, limits)
            elif head[:2] == b"\x1f\x8b":
                _extract_tar(stream, tmp, limits)
            else:
                raise InvalidPrompt(f"archive {filename!r} expected a .zip or .tar.gz, found neither "
                                    f"(first bytes {head!r})")
            root = content_root(tmp)
            detect_layout(root)
            return tmp, root
        except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, OSError,
                NotImplementedError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):
                raise StorageFull(f"no space left on the store's disk while extracting the upload: {e}") from e
            if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.errno is not None:
                raise  # a local I/O fault (permissions, EIO), not the archive's fault
            raise InvalidPrompt(f"archive {filename!r} is corrupt or truncated: {type(e).__name__}: {e}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if isinstance(data, Path):
            stream.close()


@contextmanager
def extracted(data: bytes | BinaryIO | Path, dest_parent: Path, *, filename: str = "",
              limits: ArchiveLimits = ArchiveLimits()) -> Iterator[Path]:
    """`with extracted(upload, store.staging_dir) as root: store.create(..., source_dir=root)`; always cleans up."""
    tmp, root = extract_archive(data, dest_parent, filename=filename, limits=limits)
    try:
        yield root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


