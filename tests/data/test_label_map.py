"""The label map: category ids of any shape -> labels 1..K, names made unique, num_classes from
the data or checked against it, and the json round trip train.py / eval.py / predict.py share."""

from __future__ import annotations

import numpy as np
import pytest

from mrcnn_jax.data import label_map as lm

# Roboflow's layout: an unused parent class with id 0 whose name repeats a real class's.
ROBOFLOW = [(0, "facade"), (1, "facade"), (2, "window"), (7, "door")]


def test_roboflow_parent_dropped_and_labels_contiguous_from_the_data():
    mapping, notes = lm.label_map_for_data(ROBOFLOW, used_category_ids=[1, 2, 7],
                                           num_classes=0)
    assert mapping.num_classes == 4
    assert mapping.label_to_category_id == {1: 1, 2: 2, 3: 7}
    # The parent is unused, so "facade" is no longer repeated among the kept classes.
    assert mapping.names == ("facade", "window", "door")
    assert any("id 0 'facade'" in n and "no annotation uses" in n for n in notes)
    assert any("model.num_classes = 4 from the data" in n for n in notes)
    np.testing.assert_array_equal(mapping.category_to_label_table(),
                                  [0, 1, 2, 0, 0, 0, 0, 3])


def test_category_zero_used_and_repeated_names_made_unique():
    mapping, notes = lm.label_map_for_data(ROBOFLOW, used_category_ids=None, num_classes=5)
    assert mapping.label_to_category_id == {1: 0, 2: 1, 3: 2, 4: 7}  # id 0 is label 1, not 0
    assert mapping.names == ("facade (id 0)", "facade (id 1)", "window", "door")
    assert sum("is used by 2 categories" in n for n in notes) == 2


def test_num_classes_contradicting_the_data_names_both_numbers():
    with pytest.raises(ValueError, match=r"model.num_classes = 11 contradicts the data: it has "
                                         r"3 classes \(\+ background = 4\)"):
        lm.label_map_for_data(ROBOFLOW, [1, 2, 7], num_classes=11)
    with pytest.raises(ValueError, match="no annotation uses any"):
        lm.label_map_for_data(ROBOFLOW, [], num_classes=0)


def test_category_ids_as_labels_only_for_torchvisions_convention():
    # torchvision's COCO head: 91 outputs indexed by category id (ids 1..90, none is 0).
    mapping, notes = lm.label_map_for_data([(1, "person"), (3, "car"), (90, "toothbrush")],
                                           None, num_classes=91)
    assert mapping.layout == lm.CATEGORY_IDS
    assert mapping.label_to_category_id == {1: 1, 3: 3, 90: 90}
    assert any("torchvision's COCO convention" in n for n in notes)
    # Only for that head: ids 1, 3, 5 with num_classes = 6 contradict the data (3 classes).
    with pytest.raises(ValueError, match="contradicts"):
        lm.label_map_for_data([(1, "a"), (3, "b"), (5, "c")], None, num_classes=6)
    # Id 0 can never be a label (0 is the background).
    with pytest.raises(ValueError, match="contradicts"):
        lm.label_map_for_data([(0, "a"), (1, "b"), (90, "c")], None, num_classes=91)


def test_json_round_trip_and_bad_files(tmp_path):
    mapping, _ = lm.label_map_for_data(ROBOFLOW, None, 0)
    path = mapping.save(tmp_path)
    assert path.endswith(lm.LABEL_MAP_FILE)
    assert lm.LabelMap.load(tmp_path) == mapping
    assert lm.LabelMap.load(path) == mapping
    with pytest.raises(FileNotFoundError, match="label map not found"):
        lm.LabelMap.load(tmp_path / "nowhere")
    bad = tmp_path / "bad.json"
    bad.write_text('{"labels": [{"label": 1}]}')
    with pytest.raises(ValueError, match=r"bad.json: not a label map \(KeyError"):
        lm.LabelMap.load(bad)
    with pytest.raises(ValueError, match="must lie in 1..2"):
        lm.LabelMap(3, (0, 1), (5, 6), ("a", "b"))
    with pytest.raises(ValueError, match="repeated names"):
        lm.LabelMap(3, (1, 2), (5, 6), ("a", "a"))
