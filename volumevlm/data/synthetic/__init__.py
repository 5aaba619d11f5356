"""Synthetic CT cohort generator: SYNTHETIC, NOT CLINICAL DATA.

The embedded default dataset and smoke benchmark of volumevlm: procedural torso
phantoms (HU) with label maps, radiology reports by organ system, ICD-10-CM codes and
phecodes, and a manifest. See :mod:`volumevlm.data.synthetic.cohort` for the layout.
"""

from volumevlm.data.synthetic.cohort import (
    DEFAULT_SHAPE,
    format_summary,
    generate_cohort,
    render_case,
    sample_case,
    sample_cohort,
    summarize_cohort,
)
from volumevlm.data.synthetic.findings import FINDING_NAMES, FINDINGS
from volumevlm.data.synthetic.reports import check_report, finding_mentions

__all__ = [
    "DEFAULT_SHAPE",
    "FINDINGS",
    "FINDING_NAMES",
    "check_report",
    "finding_mentions",
    "format_summary",
    "generate_cohort",
    "render_case",
    "sample_case",
    "sample_cohort",
    "summarize_cohort",
]
