"""The records cache of a data file (data.load_records): where each record starts and its word count, kept under
$MINILLAVA_CACHE so that only a file's first run scans it, checksummed so that a damaged entry is rebuilt, never
trusted; and the file's sha256 beside it (the manifest's)."""

import contextlib
import hashlib
import os

RECORDS_VERSION = 2  # bump when the layout below changes: older caches are then rebuilt


def records_cache_dir(data_path: str) -> str:
    """Where the compact form of a data file lives: $MINILLAVA_CACHE (default ~/.cache/minillava)/records/<key>,
    the key naming the file's real path, inode, size, modification and change times: any write to the file (even
    one that keeps its size and modification time) changes the change time, so an edited file gets a new cache."""
    st = os.stat(data_path)
    key = f"{os.path.realpath(data_path)}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{RECORDS_VERSION}"
    root = os.environ.get("MINILLAVA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minillava")
    return os.path.join(root, "records", hashlib.sha256(key.encode()).hexdigest()[:24])


def _records_digest(offsets, words) -> bytes:
    return hashlib.sha256(offsets.tobytes() + words.tobytes()).digest()


def write_records_cache(folder: str, offsets: list[int], words: list[int]) -> None:
    """index.npz: the byte offset of every record's JSON text in the data file (int64, n records + 1: record i is
    bytes offsets[i]:offsets[i + 1], separators included), each record's signed word count (int32, see
    data.RecordFile) and the sha256 of both (read_records_cache checks it). Written under a temporary name and
    renamed into place. OSError if the cache cannot be written."""
    import numpy as np

    offsets, words = np.array(offsets, dtype=np.int64), np.array(words, dtype=np.int32)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"index.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, offsets=offsets, words=words, digest=np.frombuffer(_records_digest(offsets, words), np.uint8))
        os.replace(tmp, os.path.join(folder, "index.npz"))
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def data_sha256(data_path: str) -> str:
    """file_sha256 of a data file, kept beside its records cache (same key: path, size, modification time), so
    only the first run reads the whole file for it (about 3 s for LLaVA-665K's 1.36 GB)."""
    path = os.path.join(records_cache_dir(data_path), "sha256")
    try:
        with open(path) as f:
            if len(digest := f.read().strip()) == 64:
                return digest
    except OSError:
        pass
    digest = file_sha256(data_path)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run the hash again
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp, path)
    return digest


def read_records_cache(folder: str, data_size: int):
    """(offsets, words) of a complete cache folder for a data file of data_size bytes; None if there is none. A
    damaged one (truncated, empty, not what write_records_cache wrote, its digest wrong) is removed, with a note
    naming it, and None returned: the caller rebuilds it."""
    import numpy as np

    path = os.path.join(folder, "index.npz")
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as index:
            offsets, words, digest = index["offsets"], index["words"], index["digest"].tobytes()
        problem = None if digest == _records_digest(offsets, words) else "its checksum does not match"
        if problem is None and (len(words) != len(offsets) - 1 or np.any(np.diff(offsets) < 0)
                                or offsets[-1] > data_size):  # fmt: skip
            problem = "its offsets do not fit the data file"
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError: whatever the damage
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        return offsets, words
    print(f"note: records cache {folder}: damaged ({problem}); rebuilding it", flush=True)
    with contextlib.suppress(OSError):
        os.remove(path)
    return None
