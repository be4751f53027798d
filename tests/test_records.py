"""The records cache (data.load_records): the data file's records as one byte buffer + offsets and word counts,
built once, giving exactly json.load's samples; JSON errors still name the file."""

import hashlib
import json
import os
import pickle

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
    monkeypatch.setattr(formats, "file_sha256", lambda p: pytest.fail("hashed the data again"))
    assert formats.data_sha256(str(path)) == first
    monkeypatch.undo()
    path.write_text(json.dumps(RECORDS[:2]))
    assert formats.data_sha256(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest() != first
