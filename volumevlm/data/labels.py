"""The segmentation label table: integer index <-> structure name.

Names follow TotalSegmentator's naming so that users' TotalSegmentator label maps map
onto ours by name. Index 0 is background. The synthetic cohort writes label maps with
these indices, segmentation heads predict them, and masks carry the names with them.
"""

from __future__ import annotations

LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "gallbladder",
    6: "pancreas",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "urinary_bladder",
    11: "lung_left",
    12: "lung_right",
    13: "heart",
    14: "vertebrae",
}

LABEL_INDEX: dict[str, int] = {name: index for index, name in LABELS.items()}

# The large organs, over which segmentation figures are also averaged ("mean_dice_large"):
# the quality bar is stated on these.
LARGE_ORGANS: tuple[str, ...] = ("liver", "spleen", "kidney_left", "kidney_right", "aorta", "lung_left", "lung_right")

# TotalSegmentator splits some of our structures into parts; these prefixes fold the
# parts back into our label (e.g. "vertebrae_L1" -> vertebrae, "lung_lower_lobe_left" -> lung_left).
TOTALSEGMENTATOR_ALIASES: dict[str, str] = {
    "vertebrae_": "vertebrae",
    "lung_upper_lobe_left": "lung_left",
    "lung_lower_lobe_left": "lung_left",
    "lung_upper_lobe_right": "lung_right",
    "lung_middle_lobe_right": "lung_right",
    "lung_lower_lobe_right": "lung_right",
}


def label_for_structure(name: str) -> int | None:
    """Our label index for a structure name (ours or TotalSegmentator's), or None if unmapped."""
    if name in LABEL_INDEX:
        return LABEL_INDEX[name]
    for alias, ours in TOTALSEGMENTATOR_ALIASES.items():
        if name == alias or (alias.endswith("_") and name.startswith(alias)):
            return LABEL_INDEX[ours]
    return None
