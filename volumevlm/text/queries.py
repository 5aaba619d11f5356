"""Free-phrased text-retrieval queries per finding set: what ``volumevlm evaluate`` types
into the report-section search to see whether the text tower reads meaning.

A query set is a small YAML file (plain data) named after the finding set it serves
(:data:`volumevlm.text.findings.FINDING_SETS`), bundled as
``volumevlm/text/data/queries/<finding set>.yaml``::

    name: synthetic
    description: ...
    findings:
      splenomegaly:
        positive: ["Enlargement of the spleen.", ...]   # state the finding present
        negated: ["No enlargement of the spleen.", ...]  # deny it (optional)

Another finding set adds its own by adding ``<its name>.yaml`` there (or a user passes a
file path). Every finding key must be one the findings labeler knows
(:mod:`volumevlm.text.labeler`), because the labeler judges what a query retrieves.
The phrasings are held out: written in a radiologist's words, not copied from the
reports a model trains on or from the zero-shot prompts (the bundled file says why).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from volumevlm.errors import InputError, VolumeVLMError
from volumevlm.text.findings import FINDING_SETS

QUERY_FOLDER = "queries"
POLARITIES = ("positive", "negated")
_TOP_KEYS = ("name", "description", "findings")


@dataclass(frozen=True)
class QuerySet:
    """Retrieval queries of one finding set.

    findings: {finding key: {"positive": (str, ...), "negated": (str, ...)}} in file order;
    "positive" is never empty, "negated" may be. source: a path or "<dict>" (error messages).
    """

    name: str
    description: str
    findings: Mapping[str, Mapping[str, tuple[str, ...]]]
    source: str = "<dict>"

    @property
    def keys(self) -> list[str]:
        return list(self.findings)

    def queries(self, polarity: str) -> list[tuple[str, str]]:
        """(finding key, query text) of one polarity, finding by finding in file order."""
        if polarity not in POLARITIES:
            raise VolumeVLMError(f"text queries: polarity must be one of {', '.join(POLARITIES)}, got {polarity!r}")
        return [(key, text) for key, lists in self.findings.items() for text in lists[polarity]]

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "QuerySet":
        """Validate plain data (a parsed YAML file) into a QuerySet; a one-line
        :class:`InputError` naming the source and the key otherwise."""
        from volumevlm.text.labeler import resolve_findings

        if not isinstance(data, Mapping):
            raise InputError(source, f"expected a mapping with keys {', '.join(_TOP_KEYS)}, got {type(data).__name__}")
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise InputError(source, f"unknown key {unknown[0]!r} (allowed: {', '.join(_TOP_KEYS)})")
        name, description, findings = data.get("name"), data.get("description", ""), data.get("findings")
        if not isinstance(name, str) or not name.strip():
            raise InputError(source, "name: must be a non-empty string (the finding set the queries serve)")
        if not isinstance(description, str):
            raise InputError(source, "description: must be a string")
        if not isinstance(findings, Mapping) or not findings:
            raise InputError(source, "findings: must be a non-empty mapping of finding key -> {positive, negated}")
        out: dict[str, dict[str, tuple[str, ...]]] = {}
        for key, entry in findings.items():
            where = f"findings.{key}"
            try:
                resolve_findings([str(key)])
            except VolumeVLMError:
                raise InputError(source, f"{where}: the findings labeler does not know {key!r}, so it cannot judge "
                                          "what the query retrieves") from None
            if not isinstance(entry, Mapping):
                raise InputError(source, f"{where}: expected a mapping with positive (and negated) lists")
            extra = [k for k in entry if k not in POLARITIES]
            if extra:
                raise InputError(source, f"{where}: unknown key {extra[0]!r} (allowed: {', '.join(POLARITIES)})")
            lists: dict[str, tuple[str, ...]] = {}
            for polarity in POLARITIES:
                value = entry.get(polarity, [] if polarity == "negated" else None)
                if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                    raise InputError(source, f"{where}.{polarity}: must be a list of query strings")
                if polarity == "positive" and not value:
                    raise InputError(source, f"{where}.positive: needs at least one query")
                for i, text in enumerate(value):
                    if not isinstance(text, str) or not text.strip():
                        raise InputError(source, f"{where}.{polarity}[{i}]: must be a non-empty string, got {text!r}")
                lists[polarity] = tuple(" ".join(t.split()) for t in value)
            out[str(key)] = lists
        return cls(name=name.strip(), description=" ".join(description.split()), findings=out, source=str(source))


def _bundled_folder():
    return resources.files("volumevlm.text").joinpath("data", QUERY_FOLDER)


def available_query_sets() -> list[str]:
    """Finding sets with bundled retrieval queries (sorted)."""
    folder = _bundled_folder()
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def load_query_set(name_or_path: str | os.PathLike) -> QuerySet:
    """A query set by finding-set name (bundled) or from a YAML path (a ``Path``, or a
    string holding a path separator or ending in .yaml/.yml)."""
    import yaml

    from volumevlm.text.prompts import _yaml_loader

    text = os.fspath(name_or_path)
    if isinstance(name_or_path, Path) or os.sep in text or "/" in text or text.endswith((".yaml", ".yml")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise InputError(path, "no such text-query file")
        source, raw = str(path), None
    else:
        if text not in available_query_sets():
            sets = ", ".join(available_query_sets()) or "none"
            raise VolumeVLMError(f"text queries: no bundled query set {text!r} (bundled: {sets}; or give a YAML path)")
        path = _bundled_folder().joinpath(f"{text}.yaml")
        source = f"volumevlm/text/data/{QUERY_FOLDER}/{text}.yaml"
    try:
        raw = path.read_text(encoding="utf-8")
        data = yaml.load(raw, Loader=_yaml_loader())
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(source, f"cannot read text queries ({err})") from None
    except yaml.YAMLError as err:
        raise InputError(source, f"malformed YAML ({' '.join(str(err).split())})") from None
    return QuerySet.from_dict(data, source=source)


def query_set_for(findings: Sequence[str]) -> QuerySet | None:
    """The bundled query set serving ``findings`` (a model's finding keys): the one whose
    finding set shares the most keys with them; None when none shares any."""
    wanted = set(findings)
    best, overlap = None, 0
    for name in available_query_sets():
        shared = len(wanted & set(FINDING_SETS.get(name, ())))
        if shared > overlap:
            best, overlap = name, shared
    return load_query_set(best) if best is not None else None
