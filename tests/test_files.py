"""The one atomic-write helper: a failed write leaves neither a partial file nor its temporary, a finished one
replaces the old file whole; folders move into place only when every one of them is written."""
import pytest

from src.files import atomic_write, temporary, write_folders


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")

    def half(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and not temporary(path).exists()


def test_folders_appear_only_when_every_one_is_written(tmp_path):
    a, b = tmp_path / "adapter", tmp_path / "model"

    def fail(tmp):
        raise ValueError("no space")

    with pytest.raises(ValueError):
        write_folders({a: lambda tmp: (tmp / "x.json").write_text("1"), b: fail})
    assert list(tmp_path.iterdir()) == []
    b.mkdir()
    (b / "keep.txt").write_text("kept")
    write_folders({a: lambda tmp: (tmp / "x.json").write_text("1"), b: lambda tmp: (tmp / "w.bin").write_text("2")})
    assert (a / "x.json").read_text() == "1" and {p.name for p in b.iterdir()} == {"keep.txt", "w.bin"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "model"]
