"""The cache store on its own: recipe keys, verified reads, atomic writes, the file-hash memo."""
from __future__ import annotations

import os
import time

import pytest
import torch

from engine.data import cache
from engine.data.cache import CacheEntryError, CacheStore, FileHashIndex, recipe_key


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(16, 2, 3, 4, generator=g), "states": torch.randn(5, 8, generator=g).bfloat16()}


def test_recipe_key_is_stable_and_sensitive():
    a = {"kind": "window", "start": 0, "transform": [64, 48, 0, 0, 64, 48]}
    assert recipe_key(a) == recipe_key(dict(reversed(list(a.items()))))  # key order does not matter
    assert recipe_key(a) != recipe_key({**a, "start": 8})
    assert len(recipe_key(a)) == 64


def test_write_read_roundtrip_with_meta(tmp_path):
    store = CacheStore(tmp_path)
    key = recipe_key({"kind": "text", "x": 1})
    store.write("text", key, _tensors(), {"kind": "text", "x": 1}, meta={"length": 5})
    got, meta = store.read("text", key)
    for name, t in _tensors().items():
        assert torch.equal(got[name], t) and got[name].dtype == t.dtype
    assert meta == {"length": "5"}
    assert store.has("text", key) and store.has("text", key, verify=True)
    assert store.keys("text") == {key}


def test_corrupt_entry_is_never_returned_and_is_removed(tmp_path):
    store = CacheStore(tmp_path)
    key = recipe_key({"kind": "window"})
    path = store.write("window", key, _tensors())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the tensor data: the header check cannot see it, the digest does
    path.write_bytes(bytes(data))
    assert store.has("window", key)  # cheap check passes ...
    with pytest.raises(CacheEntryError, match="digest"):
        store.read("window", key)
    assert not store.has("window", key, verify=True)  # ... the full check fails and drops the entry
    assert not path.exists()


def test_truncated_entry_counts_as_missing(tmp_path):
    store = CacheStore(tmp_path)
    key = recipe_key({"kind": "audio"})
    path = store.write("audio", key, _tensors())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CacheEntryError, match=str(path.name)):
        store.read("audio", key)
    assert not store.has("audio", key)
    assert not path.exists()


def test_entry_under_another_name_is_rejected(tmp_path):
    store = CacheStore(tmp_path)
    k1, k2 = recipe_key({"n": 1}), recipe_key({"n": 2})
    p1 = store.write("text", k1, _tensors())
    p2 = store.path_for("text", k2)
    p2.parent.mkdir(parents=True, exist_ok=True)
    p2.write_bytes(p1.read_bytes())  # a copied file must not answer for another recipe
    with pytest.raises(CacheEntryError, match="does not match its name"):
        store.read("text", k2)


def test_write_killed_before_rename_leaves_no_entry(tmp_path, monkeypatch):
    store = CacheStore(tmp_path)
    key = recipe_key({"kind": "window", "killed": True})

    def killed(temp, final):
        assert temp.exists() and temp.stat().st_size > 0  # the bytes were written ...
        raise KeyboardInterrupt("killed")  # ... and the process died before the rename

    monkeypatch.setattr(cache, "commit_temp", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write("window", key, _tensors())
    monkeypatch.undo()
    assert not store.has("window", key)
    with pytest.raises(FileNotFoundError):
        store.read("window", key)
    # The writer cleans its own temp file on exceptions; a SIGKILL would leave it: simulate and sweep.
    orphan = cache.write_temp(store.path_for("window", key).parent, b"partial")
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    assert store.remove_stale_temps() == 1 and not orphan.exists()
    store.write("window", key, _tensors())
    assert store.has("window", key, verify=True)


def test_file_hash_index_memoises_by_size_and_mtime(tmp_path):
    f = tmp_path / "clip.bin"
    f.write_bytes(b"a" * 1000)
    index = FileHashIndex(tmp_path / "index.json")
    d1 = index.digest(f)
    assert index.digest(f) == d1 and index.hashed == [f.resolve()]  # second call: no re-read
    index.save()
    again = FileHashIndex(tmp_path / "index.json")
    assert again.digest(f) == d1 and again.hashed == []  # persisted memo
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))  # touch: re-hash, same content hash
    assert again.digest(f) == d1 and again.hashed == [f.resolve()]
    f.write_bytes(b"b" * 1000)
    assert again.digest(f) != d1


def test_folder_identity_follows_content(tmp_path):
    store = CacheStore(tmp_path / "cache")
    comp = tmp_path / "vae"
    comp.mkdir()
    (comp / "config.json").write_text("{}")
    (comp / "weights.bin").write_bytes(b"\x00" * 64)
    first = store.folder_identity(comp)
    (comp / "weights.bin").write_bytes(b"\x01" * 64)  # same names and sizes, other weights
    assert store.folder_identity(comp) != first
    with pytest.raises(FileNotFoundError, match="model.source"):
        store.folder_identity(tmp_path / "missing")
