"""Every label table, checked for every raw value 0..255 against the peers' own tables."""

import numpy as np
import pytest

from san_fast.config import NUM_CLASSES
from san_fast.data import labels as L

# STEGO's and PiCIE's fine_to_coarse dict, copied verbatim (STEGO src/data.py, class Coco), as
# the independent reference for the table labels.py derives from COCO-Stuff's hierarchy.
STEGO_FINE_TO_COARSE = {
    0: 9, 1: 11, 2: 11, 3: 11, 4: 11, 5: 11, 6: 11, 7: 11, 8: 11, 9: 8, 10: 8, 11: 8, 12: 8,
    13: 8, 14: 8, 15: 7, 16: 7, 17: 7, 18: 7, 19: 7, 20: 7, 21: 7, 22: 7, 23: 7, 24: 7,
    25: 6, 26: 6, 27: 6, 28: 6, 29: 6, 30: 6, 31: 6, 32: 6, 33: 10, 34: 10, 35: 10, 36: 10,
    37: 10, 38: 10, 39: 10, 40: 10, 41: 10, 42: 10, 43: 5, 44: 5, 45: 5, 46: 5, 47: 5, 48: 5,
    49: 5, 50: 5, 51: 2, 52: 2, 53: 2, 54: 2, 55: 2, 56: 2, 57: 2, 58: 2, 59: 2, 60: 2,
    61: 3, 62: 3, 63: 3, 64: 3, 65: 3, 66: 3, 67: 3, 68: 3, 69: 3, 70: 3, 71: 0, 72: 0,
    73: 0, 74: 0, 75: 0, 76: 0, 77: 1, 78: 1, 79: 1, 80: 1, 81: 1, 82: 1, 83: 4, 84: 4,
    85: 4, 86: 4, 87: 4, 88: 4, 89: 4, 90: 4, 91: 17, 92: 17, 93: 22, 94: 20, 95: 20, 96: 22,
    97: 15, 98: 25, 99: 16, 100: 13, 101: 12, 102: 12, 103: 17, 104: 17, 105: 23, 106: 15,
    107: 15, 108: 17, 109: 15, 110: 21, 111: 15, 112: 25, 113: 13, 114: 13, 115: 13, 116: 13,
    117: 13, 118: 22, 119: 26, 120: 14, 121: 14, 122: 15, 123: 22, 124: 21, 125: 21, 126: 24,
    127: 20, 128: 22, 129: 15, 130: 17, 131: 16, 132: 15, 133: 22, 134: 24, 135: 21, 136: 17,
    137: 25, 138: 16, 139: 21, 140: 17, 141: 22, 142: 16, 143: 21, 144: 21, 145: 25, 146: 21,
    147: 26, 148: 21, 149: 24, 150: 20, 151: 17, 152: 14, 153: 21, 154: 26, 155: 15, 156: 23,
    157: 20, 158: 21, 159: 24, 160: 15, 161: 24, 162: 22, 163: 25, 164: 15, 165: 20, 166: 17,
    167: 17, 168: 22, 169: 14, 170: 18, 171: 18, 172: 18, 173: 18, 174: 18, 175: 18, 176: 18,
    177: 26, 178: 26, 179: 19, 180: 19, 181: 24,
}
# STEGO: cocostuff3_coarse_classes = [23, 22, 21] -> sky 0, plant 1, ground 2.
STEGO_COCO3 = {23: 0, 22: 1, 21: 2}
# IIC potsdam.py: _fine_to_coarse_dict
IIC_POTSDAM_6_TO_3 = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}

TABLES = ["COCO_FINE_TO_27", "COCO_FINE_TO_15", "COCO_FINE_TO_3", "CITYSCAPES_TO_27",
          "POTSDAM_6_TO_3", "POTSDAM_6_TO_6", "COARSE27_TO_27", "COARSE27_TO_15", "COARSE27_TO_3"]


@pytest.mark.parametrize("name", TABLES)
def test_tables_are_uint8_luts_of_256_entries(name):
    table = getattr(L, name)
    assert table.dtype == np.uint8 and table.shape == (256,)
    assert not table.flags.writeable
    assert table[255] == 255


def _expect(mapping, raw):
    return mapping.get(raw, 255)


def test_coco_fine_to_27_equals_stego_for_every_value():
    for raw in range(256):
        assert L.COCO_FINE_TO_27[raw] == _expect(STEGO_FINE_TO_COARSE, raw), raw


def test_coco_fine_to_15_keeps_stuff_only_for_every_value():
    for raw in range(256):
        coarse = STEGO_FINE_TO_COARSE.get(raw)
        expected = coarse - 12 if coarse is not None and coarse >= 12 else 255
        assert L.COCO_FINE_TO_15[raw] == expected, raw


def test_coco_fine_to_3_for_every_value():
    for raw in range(256):
        coarse = STEGO_FINE_TO_COARSE.get(raw)
        assert L.COCO_FINE_TO_3[raw] == STEGO_COCO3.get(coarse, 255), raw


def test_coarse_tables_compose_to_the_fine_tables():
    for raw in range(256):
        coarse = L.COCO_FINE_TO_27[raw]
        assert L.COARSE27_TO_27[coarse] == L.COCO_FINE_TO_27[raw]
        assert L.COARSE27_TO_15[coarse] == L.COCO_FINE_TO_15[raw]
        assert L.COARSE27_TO_3[coarse] == L.COCO_FINE_TO_3[raw]


def test_coco_things_and_stuff_stay_apart():
    fine = np.arange(182)
    coarse = L.COCO_FINE_TO_27[fine]
    assert (coarse[fine < 91] < 12).all() and (coarse[fine >= 91] >= 12).all()
    # labels.txt of COCO-Stuff, id - 1
    assert (L.COCO_FINE_NAMES[0], L.COCO_FINE_NAMES[91], L.COCO_FINE_NAMES[181]) == (
        "person", "banner", "wood")
    assert len(L.COCO_FINE_NAMES) == 182


def test_cityscapes_to_27_for_every_value():
    for raw in range(256):
        expected = raw - 7 if 7 <= raw <= 33 else 255
        assert L.CITYSCAPES_TO_27[raw] == expected, raw


def test_potsdam_tables_for_every_value():
    for raw in range(256):
        assert L.POTSDAM_6_TO_3[raw] == _expect(IIC_POTSDAM_6_TO_3, raw), raw
        assert L.POTSDAM_6_TO_6[raw] == (raw if raw < 6 else 255), raw


@pytest.mark.parametrize("table,valid", [
    ("COCO_FINE_VALID", set(range(182)) | {255}),
    ("COARSE27_VALID", set(range(27)) | {255}),
    ("CITYSCAPES_VALID", set(range(34)) | {255}),
    ("POTSDAM_VALID", set(range(6)) | {255}),
])
def test_valid_raw_values(table, valid):
    mask = getattr(L, table)
    assert {v for v in range(256) if mask[v]} == valid


def test_names_match_class_counts_and_tables():
    expected = {
        "coco27": L.COCO27_NAMES, "coco15": L.COCO15_NAMES, "coco3": L.COCO3_NAMES,
        "cityscapes": L.CITYSCAPES27_NAMES, "potsdam": L.POTSDAM6_NAMES,
        "potsdam3": L.POTSDAM3_NAMES,
    }
    for dataset, names in expected.items():
        assert L.class_names(dataset) == names
        assert len(names) == NUM_CLASSES[dataset]
    assert L.COCO27_NAMES == (
        "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory",
        "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food",
        "furniture", "rawmaterial", "textile", "wall", "window", "building", "ground", "plant",
        "sky", "solid", "structural", "water")
    assert L.COCO15_NAMES == L.COCO27_NAMES[12:]
    assert L.COCO3_NAMES == ("sky", "plant", "ground")
    assert L.CITYSCAPES27_NAMES[0] == "road" and L.CITYSCAPES27_NAMES[-1] == "bicycle"
    # every table's ids index the names
    for table, names in [(L.COCO_FINE_TO_27, L.COCO27_NAMES), (L.COCO_FINE_TO_15, L.COCO15_NAMES),
                         (L.COCO_FINE_TO_3, L.COCO3_NAMES), (L.CITYSCAPES_TO_27, L.CITYSCAPES27_NAMES),
                         (L.POTSDAM_6_TO_3, L.POTSDAM3_NAMES)]:
        ids = set(table[table != 255].tolist())
        assert ids == set(range(len(names)))


def test_class_names_synthetic_and_unknown():
    assert L.class_names("synthetic") is None
    with pytest.raises(ValueError, match="no class names"):
        L.class_names("imagenet")
