import json

import pytest
from PIL import Image

from r3v.errors import DataError
from r3v.io import repair_jsonl_tail
from r3v.records import Example, Sample, TrainItem, load_image, read_jsonl, write_jsonl


def test_sample_jsonl_round_trip(tmp_path):
    samples = [
        Sample("ex-1", 0, "There are 3.\nAnswer: 3", "3", True, "tiny", {"temperature": 0.9}, 7, 10, 5, "stop", 1),
        Sample("ex-1", 1, "ünïcode ✓", None, False, "tiny", {"greedy": True}, 7),
    ]
    path = tmp_path / "s.jsonl"
    write_jsonl(path, samples)
    assert [Sample.from_dict(r) for r in read_jsonl(path)] == samples


def test_example_round_trip_with_lazy_image_paths(tmp_path):
    image_path = tmp_path / "a.png"
    Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(image_path)
    example = Example("e1", "t", "q?", "4", [str(image_path)], ["x", "y"], {"grade": 3})
    path = tmp_path / "e.jsonl"
    write_jsonl(path, [example])
    loaded = Example.from_dict(read_jsonl(path)[0])
    assert loaded == example
    (image,) = loaded.load_images()
    assert image.mode == "RGB" and image.size == (5, 4)


def test_train_item_round_trip():
    item = TrainItem("refine", "e1", "prompt", "target")
    assert TrainItem.from_dict(json.loads(json.dumps(item.to_dict()))) == item
    assert item.objective == "refine"


def test_missing_field_is_named():
    with pytest.raises(DataError, match="missing field.*correct"):
        Sample.from_dict({"example_id": "e", "sample_index": 0, "text": "", "answer": None, "model": "m",
                          "sampling": {}, "seed": 0})


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n{not json}\n')
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(path) in str(info.value) and "line 2" in str(info.value)


def test_invalid_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(path)


def test_torn_tail_is_repaired_but_complete_lines_kept(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert repair_jsonl_tail(path) == len('{"a": ')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_corrupt_and_missing_images_are_named(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError) as info:
        load_image(bad, record="q-7")
    assert str(bad) in str(info.value) and "q-7" in str(info.value)
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png", record="q-8")


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "L", "P", "1"])
def test_odd_image_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (1, 1)).save(path)
    assert load_image(path).mode == "RGB"
