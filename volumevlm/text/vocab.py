"""The phecode vocabulary: which phecodes the phenotype head predicts, in which column.

Built from the TRAINING cases' phecode lists (a code enters when enough cases carry
it) and saved with every checkpoint as ``phecodes.json``, so column ``j`` of the
phenotype logits always means ``vocab.codes[j]``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from volumevlm.errors import InputError, VolumeVLMError

VOCAB_FORMAT = "volumevlm-phecodes"
VOCAB_VERSION = 1


def phecode_sort_key(code: str) -> tuple[int, float, str]:
    """Numeric order, as :func:`volumevlm.text.phecodes.all_phecodes` sorts ("8" < "38"
    < "250.2"); codes that are not numbers go last, alphabetically."""
    try:
        return (0, float(code), code)
    except ValueError:
        return (1, 0.0, code)


def _clean_code(code: Any, where: str) -> str:
    if not isinstance(code, str) or not code.strip():
        raise VolumeVLMError(f"{where}: phecode {code!r} is not a non-empty string")
    return code.strip()


class PhecodeVocabulary:
    """Ordered phecodes: the columns of the phenotype head.

    codes: the phecodes in column order (unique). counts: how many training cases
    carried each code (missing entries read as 0). min_count: the threshold the
    vocabulary was built with (kept for the record). cases: how many training cases
    carried any code (the denominator of :meth:`prevalence`; None when unknown, as in
    vocabularies written before it was recorded).
    """

    def __init__(
        self,
        codes: Sequence[str],
        counts: Mapping[str, int] | None = None,
        min_count: int = 1,
        cases: int | None = None,
    ):
        cleaned = [_clean_code(code, "phecode vocabulary") for code in codes]
        if len(set(cleaned)) != len(cleaned):
            dupes = sorted({c for c in cleaned if cleaned.count(c) > 1}, key=phecode_sort_key)
            raise VolumeVLMError(f"phecode vocabulary: duplicate codes {dupes[:5]}")
        self.codes: list[str] = cleaned
        counts = dict(counts or {})
        self.counts: dict[str, int] = {code: int(counts.get(code, 0)) for code in cleaned}
        self.min_count = int(min_count)
        self.cases = None if cases is None else int(cases)
        if self.cases is not None and any(n > self.cases for n in self.counts.values()):
            raise VolumeVLMError(f"phecode vocabulary: a code is counted in more cases than the {self.cases} recorded")
        self._index = {code: i for i, code in enumerate(cleaned)}
        self._stored_descriptions: dict[str, str] = {}

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, code_lists: Iterable[Sequence[str]], min_count: int = 1) -> "PhecodeVocabulary":
        """Vocabulary of the codes carried by at least ``min_count`` cases.

        code_lists: one list of phecodes per case (a code listed twice in one case
        counts once). Codes are sorted numerically. An empty result (no case, or no
        code frequent enough) is a valid vocabulary of 0 columns.
        """
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise VolumeVLMError(f"phecode vocabulary: min_count must be an integer >= 1, got {min_count!r}")
        counter: Counter[str] = Counter()
        cases = 0
        for i, codes in enumerate(code_lists):
            if codes is None:
                continue
            if isinstance(codes, str):
                raise VolumeVLMError(f"phecode vocabulary: case {i} lists its phecodes as one string, not a list")
            counter.update({_clean_code(code, f"phecode vocabulary case {i}") for code in codes})
            cases += bool(codes)
        kept = sorted((code for code, n in counter.items() if n >= min_count), key=phecode_sort_key)
        return cls(kept, {code: counter[code] for code in kept}, min_count=min_count, cases=cases)

    # ------------------------------------------------------------------ use

    def __len__(self) -> int:
        return len(self.codes)

    def prevalence(self) -> list[float] | None:
        """Share of the coded training cases that carry each code, in column order
        (add-one-half smoothed, so no share is 0 or 1); None when ``cases`` is unknown."""
        if not self.cases:
            return None
        return [(self.counts[code] + 0.5) / (self.cases + 1.0) for code in self.codes]

    def __contains__(self, code: object) -> bool:
        return isinstance(code, str) and code.strip() in self._index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PhecodeVocabulary):
            return NotImplemented
        return self.codes == other.codes and self.counts == other.counts and self.min_count == other.min_count

    def __repr__(self) -> str:
        return f"PhecodeVocabulary({len(self)} codes, min_count={self.min_count})"

    def index(self, code: str) -> int:
        """Column of ``code``; VolumeVLMError when the vocabulary lacks it."""
        key = str(code).strip()
        if key not in self._index:
            raise VolumeVLMError(f"phecode {code!r}: not in the vocabulary")
        return self._index[key]

    def encode(self, codes: Iterable[str] | None) -> list[float]:
        """Multi-hot float list of length ``len(self)``: 1.0 in the column of each code
        the case carries, 0.0 elsewhere. Codes outside the vocabulary are ignored
        (they were too rare in training to get a column)."""
        out = [0.0] * len(self.codes)
        if codes is None:
            return out
        if isinstance(codes, str):
            raise VolumeVLMError("phecode vocabulary: encode() needs a list of codes, got one string")
        for code in codes:
            column = self._index.get(str(code).strip())
            if column is not None:
                out[column] = 1.0
        return out

    def decode(self, values: Any, threshold: float = 0.5) -> list[str]:
        """Codes whose value is >= threshold, in column order.

        values: a multi-hot vector or probabilities of length ``len(self)`` (list,
        numpy array or 1-D tensor). For logits pass threshold=0.0.
        """
        if hasattr(values, "tolist"):
            values = values.tolist()
        values = list(values)
        if len(values) != len(self.codes):
            raise VolumeVLMError(f"phecode vocabulary: decode() got {len(values)} values for {len(self.codes)} codes")
        return [code for code, value in zip(self.codes, values) if float(value) >= threshold]

    def description(self, code: str) -> str:
        """Description from the bundled phecode table ("" when the table lacks the code)."""
        from volumevlm.text.phecodes import phecode_description

        try:
            return phecode_description(code)
        except InputError:
            return self._stored_descriptions.get(str(code).strip(), "")

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": VOCAB_FORMAT,
            "format_version": VOCAB_VERSION,
            "min_count": self.min_count,
            **({"cases": self.cases} if self.cases is not None else {}),
            "codes": list(self.codes),
            "counts": {code: self.counts[code] for code in self.codes},
            "descriptions": {code: self.description(code) for code in self.codes},
        }

    def to_json(self) -> str:
        """JSON text (ends with a newline) that :meth:`from_json` reads back."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "PhecodeVocabulary":
        """Read :meth:`to_json` output; column order is kept exactly as stored.

        Raises VolumeVLMError (one line) for malformed JSON or a wrong structure.
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise VolumeVLMError(f"phecode vocabulary JSON: unreadable ({reason})") from None
        if not isinstance(data, dict):
            raise VolumeVLMError("phecode vocabulary JSON: expected an object with 'codes'")
        if data.get("format", VOCAB_FORMAT) != VOCAB_FORMAT:
            raise VolumeVLMError(f"phecode vocabulary JSON: format is {data.get('format')!r}, not {VOCAB_FORMAT!r}")
        codes, counts = data.get("codes"), data.get("counts", {})
        descriptions = data.get("descriptions", {})
        if not isinstance(codes, list):
            raise VolumeVLMError("phecode vocabulary JSON: 'codes' must be a list of strings")
        if not isinstance(counts, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()
        ):
            raise VolumeVLMError("phecode vocabulary JSON: 'counts' must map codes to non-negative integers")
        if not isinstance(descriptions, dict):
            raise VolumeVLMError("phecode vocabulary JSON: 'descriptions' must map codes to strings")
        min_count = data.get("min_count", 1)
        if isinstance(min_count, bool) or not isinstance(min_count, int):
            raise VolumeVLMError(f"phecode vocabulary JSON: 'min_count' must be an integer, got {min_count!r}")
        cases = data.get("cases")
        if cases is not None and (isinstance(cases, bool) or not isinstance(cases, int) or cases < 0):
            raise VolumeVLMError(f"phecode vocabulary JSON: 'cases' must be a non-negative integer, got {cases!r}")
        vocab = cls(codes, counts, min_count=min_count, cases=cases)
        vocab._stored_descriptions = {str(k): str(v) for k, v in descriptions.items() if isinstance(v, str)}
        return vocab
