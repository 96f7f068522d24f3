"""Writing files and folders so that a reader never sees half of one: each is written under a temporary sibling
name, then renamed into place (a rename within a folder is atomic), and a failure leaves nothing new."""
import os
import shutil
from pathlib import Path


def temporary(path: Path) -> Path:
    """The hidden sibling a write goes to first: .<name>.tmp<pid> (one per process, so two never collide)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write(path, write):
    """Write the file `path` through `write(tmp)`, then rename tmp to path."""
    path = Path(path)
    tmp = temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        remove(tmp)


def write_folders(writers: dict):
    """{folder: write(tmp)}: each folder is written into a temporary sibling, and they move into place only once
    every one is written, so a failure leaves no new folder (an existing one keeps its files, the new ones replacing
    those of the same name)."""
    temps = {}
    try:
        for folder, write in writers.items():
            temps[folder] = temporary(Path(folder))
            remove(temps[folder])
            temps[folder].mkdir(parents=True)
            write(temps[folder])
        for folder, tmp in temps.items():
            if Path(folder).exists():
                for f in tmp.iterdir():
                    os.replace(f, Path(folder) / f.name)
            else:
                os.replace(tmp, folder)
    finally:
        for tmp in temps.values():
            remove(tmp)
