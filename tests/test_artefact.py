"""`distillab.artefact`: directories written whole or not at all, files checked against their
manifest entries (sha256 computed here with hashlib), and the umask's permissions."""

import hashlib
import os

import pytest

from distillab.artefact import AtomicDirectory, entry_lock, file_digests, file_problem
from distillab.files import umask


def test_an_atomic_directory_is_replaced_whole_or_not_at_all(tmp_path):
    final = tmp_path / "entry"
    with AtomicDirectory(final) as tmp:
        (tmp / "a").write_text("1")
        assert not final.exists()  # nothing in place until the block ends
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with AtomicDirectory(final) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed half way")
    assert (final / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["entry"]
    leftover = tmp_path / ".tmp-entry-killed"  # a build killed before it could clean up
    leftover.mkdir()
    with AtomicDirectory(final) as tmp:
        (tmp / "b").write_text("3")
        os.chmod(tmp / "b", 0o600)  # as safetensors writes its files
    assert not leftover.exists() and sorted(p.name for p in final.iterdir()) == ["b"]
    assert (final / "b").stat().st_mode & 0o777 == 0o666 & ~umask()


def test_the_entry_lock_clears_leftovers_of_its_entry_only(tmp_path):
    mine, other = tmp_path / ".tmp-entry-1", tmp_path / ".tmp-other-1"
    mine.mkdir()
    other.mkdir()
    with entry_lock(tmp_path / "entry"):
        assert not mine.exists() and other.exists()


def test_file_problems_name_missing_resized_and_changed_files(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert file_digests(tmp_path) == {"x.bin": digest}
    assert file_problem(path, digest, size=3) is None
    assert file_problem(tmp_path / "y.bin", digest) == f"{tmp_path / 'y.bin'}: missing"
    path.write_bytes(b"ab")
    assert "2 bytes, the manifest says 3" in file_problem(path, digest, size=3)
    path.write_bytes(b"abd")
    assert "checksum mismatch" in file_problem(path, digest, size=3)
