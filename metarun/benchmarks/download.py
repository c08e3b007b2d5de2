"""Verified, resumable downloads with a progress bar, and safe zip extraction (urllib only: no new dependency).

Bytes go to `<file>.part`; a later attempt continues it with an HTTP Range request, so an interrupted
download of a large archive does not start over. The file gets its final name only after its md5
matches, so a present file is a verified file. Network failures are one-line UserInputErrors that
carry the manual instructions, because the usual cause is a machine without internet access.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from metarun.errors import UserInputError

TIMEOUT_S = 30
BLOCK = 1 << 16


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, manual: str) -> Path:
    """Fetch `url` to `dest` unless a file with the right md5 is already there. `manual` is the instruction
    appended to every failure (what to fetch by hand and where to put it)."""
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "metarun", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as ex:
        if ex.code != 416 or not have:  # 416: nothing left past `have`, i.e. the .part is already whole
            raise UserInputError(f"cannot download {url}: HTTP {ex.code} {ex.reason}; {manual}") from None
    except (urllib.error.URLError, OSError) as ex:
        reason = getattr(ex, "reason", None) or ex
        raise UserInputError(f"cannot reach {url} ({reason}); {manual}") from None
    else:
        with response:
            _receive(response, part, have, url, manual)
    actual = md5sum(part)
    if actual != md5:
        part.unlink()
        raise UserInputError(f"checksum mismatch for {dest.name} from {url}: md5 {actual}, expected {md5}; "
                             f"the partial file was deleted, run the command again; {manual}")
    os.replace(part, dest)
    return dest


def _receive(response, part: Path, have: int, url: str, manual: str) -> None:  # type: ignore[no-untyped-def]
    """Append to the .part when the server honoured the Range request (206), else start it over."""
    resumed = have and response.status == 206
    start = have if resumed else 0
    length = response.headers.get("Content-Length")
    total = start + int(length) if length and length.isdigit() else None
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    written = start
    part.parent.mkdir(parents=True, exist_ok=True)  # only once the server answered: no empty folders offline
    try:
        with open(part, "ab" if resumed else "wb") as out, Progress(*columns, transient=False) as progress:
            label = f"{part.name.removesuffix('.part')}{' (resumed)' if resumed else ''}"
            task = progress.add_task(label, total=total, completed=start)
            while block := response.read(BLOCK):
                out.write(block)
                written += len(block)
                progress.update(task, advance=len(block))
    except OSError as ex:  # connection dropped mid-way: keep the .part for the next attempt
        raise UserInputError(f"download of {url} interrupted after {written} bytes ({ex}); run the command again "
                             f"to resume; {manual}") from None


def extract(archive: Path, into: Path, top: str) -> Path:
    """Unpack `archive`, whose members all lie under `top/`, to `into/top`. Goes through a temporary folder
    renamed at the end, so a half-finished extraction is never taken for data; refuses unsafe member paths."""
    final = into / top
    staging = into / f".{top}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as handle:
            for name in handle.namelist():
                path = PurePosixPath(name)
                if path.is_absolute() or ".." in path.parts or path.parts[0] != top:
                    raise UserInputError(f"{archive} holds an unexpected member {name!r} (expected all under {top}/)")
            handle.extractall(staging)
    except (zipfile.BadZipFile, OSError) as ex:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserInputError(f"cannot unpack {archive}: {ex}") from None
    return _install(staging, final, top)


def _install(staging: Path, final: Path, top: str) -> Path:
    """The unpacked `staging/top` becomes `final` in one rename (replacing an older copy); staging goes."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging / top, final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def extract_tar(archive: Path, into: Path, top: str) -> Path:
    """Unpack the members of a .tar/.tgz under `top/` to `into/top` (others, such as CUB's attributes.txt beside
    its folder, are skipped), through a temporary folder renamed at the end; refuses unsafe member paths and
    links."""
    import tarfile

    final = into / top
    staging = into / f".{top}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(archive) as handle:
            members = []
            for member in handle.getmembers():
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts:
                    raise UserInputError(f"{archive} holds an unsafe member {member.name!r}")
                if path.parts and path.parts[0] == top and (member.isfile() or member.isdir()):
                    members.append(member)
            if not members:
                raise UserInputError(f"{archive} holds nothing under {top}/")
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
            handle.extractall(staging, members=members, **safe)
    except (tarfile.TarError, OSError, EOFError) as ex:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserInputError(f"cannot unpack {archive}: {ex}") from None
    return _install(staging, final, top)
