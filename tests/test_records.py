"""The records cache (data.load_records): the data file's records as one byte buffer + offsets and word counts,
built once, giving exactly json.load's samples; JSON errors still name the file."""

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest

import minillava.data as data
from minillava import formats
from minillava.data import WORDS_INVALID, load_records

RECORDS = [
    {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                     {"from": "gpt", "value": "A café, 東京 \u00e9\t\"quoted\""}]},
    {"id": 7, "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok 1.5e3"}],
     "extra": [1, 2.5, None, True, {"nested": []}]},
    {"id": "no-turns"},
    {"id": "zero", "conversations": [{"from": "human", "value": "   "}]},
]  # fmt: skip


@pytest.mark.parametrize("indent", [None, 2, "\t"])
def test_records_are_json_loads_samples_and_their_word_counts(tmp_path, indent):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS, indent=indent, ensure_ascii=False) + "\n  ", encoding="utf-8")
    records = load_records(str(path))
    assert len(records) == 4 and list(records) == json.loads(path.read_text(encoding="utf-8"))
    assert records[-1] == RECORDS[-1] and records[1:3] == RECORDS[1:3]
    assert records.words.tolist() == [9, -4, WORDS_INVALID, WORDS_INVALID]  # + image, - text-only, no turns, 0 words
    with pytest.raises(IndexError):
        records[4]
    assert pickle.loads(pickle.dumps(records))[0] == RECORDS[0]  # spawned DataLoader workers reopen the file


def test_json_lines_give_the_same_records(tmp_path):
    """A .jsonl file (one record per line, as LLaVA-NeXT reads it; blank lines and a missing last newline allowed)
    gives the records and word counts of the same samples as a JSON list."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS[:2]) + "\n\n  " +
                    "\n".join(json.dumps(r) for r in RECORDS[2:]), encoding="utf-8")  # fmt: skip
    records = load_records(str(path))
    assert list(records) == RECORDS and records.words.tolist() == [9, -4, WORDS_INVALID, WORDS_INVALID]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": 1}\n{"id": 2,\n', r"line 2 is not JSON \(Expecting property name enclosed in double quotes"),
        ('{"id": 1} {"id": 2}\n', "line 1 is not one JSON object"),
        ('{"id": 1}\n[{"id": 2}]\n', "line 2 is not one JSON object"),
        ("\n \n", "the file holds no samples"),
        ('[{"id": 1},\n{"id": 2}]', "line 1 is not JSON"),  # a JSON list named .jsonl
    ],
)
def test_bad_json_lines_name_the_file_and_the_line(tmp_path, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^--data_path {path}: {message}"):
        load_records(str(path))


def test_the_cache_is_built_once_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS[:2]))
    scans = []
    real = data._scan_records
    monkeypatch.setattr(data, "_scan_records", lambda *a: scans.append(1) or real(*a))
    first = load_records(str(path))
    assert load_records(str(path))[1] == first[1] == RECORDS[1] and len(scans) == 1  # the second read no JSON
    path.write_text(json.dumps(RECORDS[:1]))
    os.utime(path, ns=(1, 1))  # a new modification time even on a coarse clock
    assert len(load_records(str(path))) == 1 and len(scans) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": 1}', "expected a JSON list of samples, got a dict"),
        ("[]", "the list holds no samples"),
        ('[{"id": 1},]', "cannot read JSON: Expecting value"),
        ('[{"id": 1}] [', "cannot read JSON: Extra data"),
        ('[{"id": 1} {"id": 2}]', "cannot read JSON: Expecting ',' delimiter"),
        ("", "cannot read JSON: Expecting value"),
    ],
)
def test_bad_json_names_the_file_and_leaves_no_cache(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^--data_path {path}: {message}"):
        load_records(str(path))
    root = os.path.join(os.environ["MINILLAVA_CACHE"], "records")
    assert not [n for n in os.listdir(root) if ".tmp-" in n]


def test_the_data_hash_is_read_once_per_file_version(tmp_path, monkeypatch):
    """run_manifest's data_sha256 is kept beside the records cache: a second start reads no data; an edited file
    (new size or modification time) is hashed again."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS))
    first = formats.data_sha256(str(path))
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(formats.records, "file_sha256", lambda p: pytest.fail("hashed the data again"))
    assert formats.data_sha256(str(path)) == first
    monkeypatch.undo()
    path.write_text(json.dumps(RECORDS[:2]))
    assert formats.data_sha256(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest() != first


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "other arrays"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_note_naming_it(tmp_path, capsys, damage):
    """A truncated, empty or foreign index.npz (it gave a BadZipFile / EOFError traceback on every run) is detected
    (the zip's CRCs, a checksum of what was written, offsets that fit the file) and rebuilt, once."""
    import numpy as np

    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS))
    load_records(str(path))
    index = Path(formats.records_cache_dir(str(path))) / "index.npz"
    good = index.read_bytes()
    if damage == "other arrays":
        np.savez(index, offsets=np.array([0, 10**9]), words=np.array([1], np.int32), digest=np.zeros(32, np.uint8))
    else:
        index.write_bytes({"truncated": good[: len(good) // 2], "empty": b"", "garbage": b"x" * 100}[damage])
    capsys.readouterr()
    assert list(load_records(str(path))) == RECORDS
    note = capsys.readouterr().out
    assert note.startswith(f"note: records cache {os.path.dirname(index)}: damaged (") and "rebuilding it" in note
    assert index.read_bytes() == good
    load_records(str(path))
    assert capsys.readouterr().out == ""


def test_an_unwritable_cache_falls_back_to_memory_with_one_note(tmp_path, monkeypatch, capsys):
    """A cache folder that cannot be created or written (read-only home, quota: here its parent is a file, which
    holds for root too) indexes in memory, with one note naming the cache folder, not the data file."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("MINILLAVA_CACHE", str(blocker / "cache"))
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS))
    assert list(load_records(str(path))) == RECORDS
    out = capsys.readouterr().out
    assert out == (f"note: records cache {blocker / 'cache'} is not writable (Not a directory): indexing {path} in "
                   "memory for this run (set MINILLAVA_CACHE to a writable folder to keep it)\n")  # fmt: skip


def test_an_edit_that_keeps_size_and_modification_time_is_seen(tmp_path):
    """The cache key includes the file's change time, which any write moves (its size and mtime can be kept)."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "aaaa"}, {"id": "b"}]))
    st = os.stat(path)
    assert load_records(str(path))[0] == {"id": "aaaa"}
    path.write_text(json.dumps([{"id": "a"}, {"id": "bbbb"}]))  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and list(load_records(str(path))) == [{"id": "a"}, {"id": "bbbb"}]


def test_a_data_file_replaced_during_a_run(tmp_path):
    """The run keeps reading the file it started with when a new one replaces it (rename, a script writing a new
    file); a file written over in place (cp onto it) stops the read with a line saying so, never a stale offset."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS))
    records = load_records(str(path))
    new = tmp_path / "new.json"
    new.write_text(json.dumps(RECORDS[::-1]))
    os.replace(new, path)
    assert records[0] == RECORDS[0] and list(records) == RECORDS  # the original, still open
    records = load_records(str(path))
    with open(path, "r+") as f:
        f.write(json.dumps(RECORDS[::-1])[:10])
    with pytest.raises(ValueError, match=f"^--data_path {path}: the file changed while the run was reading it"):
        records[1]
