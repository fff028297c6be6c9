"""Error types the CLI prints as one line: each names the key, file or row at fault and what was expected."""


class LongtuneError(Exception):
    """Base class for errors caused by the user's input, printed without a traceback."""


class ConfigError(LongtuneError):
    """A config key is unknown, has a wrong type or value, or conflicts with another key."""


class DataError(LongtuneError):
    """A dataset file, row or field is missing or malformed."""


class StorageError(LongtuneError):
    """Writing the run directory failed because the disk (or the file-size limit) is full."""


_FULL_ERRNOS = {28, 122, 27}  # ENOSPC, EDQUOT, EFBIG
# What torch's zip writer and safetensors say when a write comes up short; they do not keep the errno.
_FULL_MESSAGES = ("unexpected pos", "No space left", "File too large", "Disk quota exceeded")


def storage_error(exc: BaseException, path: object) -> StorageError | None:
    """A one-line StorageError if `exc` means the disk filled up while writing `path`, else None."""
    full = (isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS) or any(m in str(exc) for m in _FULL_MESSAGES)
    if not full:
        return None
    import shutil
    from pathlib import Path

    where = Path(str(path)).resolve()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free / 2**30
    return StorageError(f"writing '{path}' failed: no space left on device ({free:.1f} GiB free on {where}) "
                        "or the file-size limit (ulimit -f) was reached; free space or "
                        "point output_dir elsewhere")
