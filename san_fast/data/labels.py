"""Label maps of the real datasets: raw label value -> training id, and class names.

Every map is a numpy uint8 lookup table of 256 entries, indexed by the raw value found in the
dataset's label files; 255 marks pixels that are ignored (void, unlabeled, or outside the label
set). Apply one with ``table[label]`` on a uint8 label array.

Sources:
- COCO-Stuff fine ids and hierarchy: the COCO-Stuff release (Caesar et al. 2018), files
  ``labels.txt`` (nightrome/cocostuff) and ``cocostuff_hierarchy.y`` (xu-ji/IIC). The coarse
  order (12 thing groups, then 15 stuff groups) is IIC's ``_sorted_coarse_names``; PiCIE and
  STEGO copy the resulting ``fine_to_coarse`` dict verbatim, so this table equals theirs
  (tests/test_data_labels.py checks it against STEGO's literal dict).
- COCO-Stuff-15 (stuff only, coarse - 12) and COCO-Stuff-3 (sky, plant, ground): IIC
  (``_CocoFull._filter_label`` and ``_CocoFew.label_names``; STEGO's ``cocostuff3_coarse_classes
  = [23, 22, 21]`` gives the same order).
- Cityscapes: label ids 7..33 -> 0..26 (the 27 non-void classes), as PiCIE and STEGO
  (``first_nonvoid = 7``); names from cityscapesscripts ``labels.py``.
- Potsdam: IIC's ``potsdam_prepare.py`` colour -> index dict and ``_fine_to_coarse_dict``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

IGNORE = 255


def _table(pairs: dict[int, int]) -> np.ndarray:
    table = np.full(256, IGNORE, dtype=np.uint8)
    for raw, train_id in pairs.items():
        table[raw] = train_id
    table.setflags(write=False)
    return table


def _valid(values: range, void: int = IGNORE) -> np.ndarray:
    """Which raw values may appear in a label file: the label set plus the void value."""
    mask = np.zeros(256, dtype=bool)
    mask[list(values)] = True
    mask[void] = True
    mask.setflags(write=False)
    return mask


# --- COCO-Stuff ------------------------------------------------------------------------------

# Value v in a stuffthingmaps PNG is COCO-Stuff id v + 1 of labels.txt: 0-90 things (80 used,
# 11 ids unused by COCO), 91-181 stuff, 255 unlabeled.
COCO_FINE_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror",
    "dining table", "window", "desk", "toilet", "door", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "blender",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    # stuff, 91-181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
COCO_NUM_FINE = 182
COCO_FIRST_STUFF_FINE = 91

# The 27 coarse groups in IIC's order (things 0-11, stuff 12-26), each with its fine classes
# as listed in COCO-Stuff's label hierarchy.
COCO_HIERARCHY = (
    ("electronic", ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone")),
    ("appliance", ("microwave", "oven", "toaster", "sink", "refrigerator", "blender")),
    ("food", ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
              "donut", "cake")),
    ("furniture", ("chair", "couch", "potted plant", "bed", "mirror", "dining table", "window",
                   "desk", "toilet", "door")),
    ("indoor", ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
                "hair brush")),
    ("kitchen", ("bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl")),
    ("accessory", ("hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie",
                   "suitcase")),
    ("animal", ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                "giraffe")),
    ("outdoor", ("traffic light", "fire hydrant", "street sign", "stop sign", "parking meter",
                 "bench")),
    ("person", ("person",)),
    ("sports", ("frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
                "baseball glove", "skateboard", "surfboard", "tennis racket")),
    ("vehicle", ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat")),
    ("ceiling", ("ceiling-tile", "ceiling-other")),
    ("floor", ("carpet", "floor-tile", "floor-wood", "floor-marble", "floor-stone",
               "floor-other")),
    ("food", ("fruit", "salad", "vegetable", "food-other")),
    ("furniture", ("door-stuff", "desk-stuff", "table", "shelf", "cabinet", "cupboard",
                   "mirror-stuff", "counter", "light", "stairs", "furniture-other")),
    ("rawmaterial", ("cardboard", "paper", "plastic", "metal")),
    ("textile", ("rug", "mat", "towel", "napkin", "clothes", "cloth", "curtain", "blanket",
                 "pillow", "banner", "textile-other")),
    ("wall", ("wall-tile", "wall-panel", "wall-wood", "wall-brick", "wall-stone",
              "wall-concrete", "wall-other")),
    ("window", ("window-blind", "window-other")),
    ("building", ("house", "skyscraper", "bridge", "tent", "roof", "building-other")),
    ("ground", ("sand", "snow", "dirt", "mud", "gravel", "road", "pavement", "railroad",
                "platform", "playingfield", "ground-other")),
    ("plant", ("grass", "tree", "bush", "leaves", "flower", "branch", "moss", "straw",
               "plant-other")),
    ("sky", ("clouds", "sky-other")),
    ("solid", ("wood", "rock", "stone", "mountain", "hill", "solid-other")),
    ("structural", ("fence", "cage", "net", "railing", "structural-other")),
    ("water", ("fog", "river", "sea", "waterdrops", "water-other")),
)
COCO_FIRST_STUFF_COARSE = 12


def _coco_fine_to_coarse() -> dict[int, int]:
    fine_index = {name: i for i, name in enumerate(COCO_FINE_NAMES)}
    pairs: dict[int, int] = {}
    for coarse, (_, members) in enumerate(COCO_HIERARCHY):
        # "food" and "furniture" name both a thing group and a stuff group: the fine ids of a
        # thing group are < 91, those of a stuff group >= 91, which keeps them apart.
        is_stuff = coarse >= COCO_FIRST_STUFF_COARSE
        for name in members:
            fine = fine_index[name]
            assert (fine >= COCO_FIRST_STUFF_FINE) == is_stuff, name
            pairs[fine] = coarse
    assert sorted(pairs) == list(range(COCO_NUM_FINE))
    return pairs


COCO27_NAMES = tuple(name for name, _ in COCO_HIERARCHY)
COCO15_NAMES = COCO27_NAMES[COCO_FIRST_STUFF_COARSE:]
COCO3_NAMES = ("sky", "plant", "ground")
_COCO3_COARSE = tuple(COCO27_NAMES.index(n, COCO_FIRST_STUFF_COARSE) for n in COCO3_NAMES)

# Coarse-27 id -> smaller label sets. The prepare cache stores coarse-27 label maps, so the
# loaders apply these to cached labels and the COCO_FINE_TO_* tables to original ones.
COARSE27_TO_27 = _table({c: c for c in range(27)})
COARSE27_TO_15 = _table({c: c - COCO_FIRST_STUFF_COARSE for c in range(COCO_FIRST_STUFF_COARSE, 27)})
COARSE27_TO_3 = _table({c: i for i, c in enumerate(_COCO3_COARSE)})

COCO_FINE_TO_27 = _table(_coco_fine_to_coarse())
COCO_FINE_TO_15 = _table({f: int(COARSE27_TO_15[c]) for f, c in _coco_fine_to_coarse().items()})
COCO_FINE_TO_3 = _table({f: int(COARSE27_TO_3[c]) for f, c in _coco_fine_to_coarse().items()})

COCO_FINE_VALID = _valid(range(COCO_NUM_FINE))
COARSE27_VALID = _valid(range(27))

# --- Cityscapes ------------------------------------------------------------------------------

CITYSCAPES_FIRST_NONVOID = 7
CITYSCAPES27_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)
# gtFine_labelIds.png holds ids 0..33; ids 0..6 are void (unlabeled, ego vehicle, rectification
# border, out of roi, static, dynamic, ground). License plate (-1) is written as 255.
CITYSCAPES_TO_27 = _table({i: i - CITYSCAPES_FIRST_NONVOID for i in range(CITYSCAPES_FIRST_NONVOID, 34)})
CITYSCAPES_VALID = _valid(range(34))

# --- Potsdam ---------------------------------------------------------------------------------

POTSDAM6_NAMES = ("roads", "buildings", "low vegetation", "tree", "car", "clutter")
POTSDAM3_NAMES = ("roads and cars", "buildings and clutter", "vegetation and trees")
POTSDAM_6_TO_6 = _table({c: c for c in range(6)})
POTSDAM_6_TO_3 = _table({0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2})
POTSDAM_VALID = _valid(range(6))

# --- lookup by dataset name -------------------------------------------------------------------

_NAMES = {
    "coco27": COCO27_NAMES,
    "coco15": COCO15_NAMES,
    "coco3": COCO3_NAMES,
    "cityscapes": CITYSCAPES27_NAMES,
    "potsdam": POTSDAM6_NAMES,
    "potsdam3": POTSDAM3_NAMES,
}


def class_names(dataset_name: str) -> Optional[tuple[str, ...]]:
    """Class names in training-id order; None for the synthetic data (its classes are unnamed)."""
    if dataset_name == "synthetic":
        return None
    try:
        return _NAMES[dataset_name]
    except KeyError:
        raise ValueError(
            f"no class names for dataset {dataset_name!r}: expected synthetic or one of "
            f"{', '.join(_NAMES)}"
        ) from None
