"""Evaluation datasets: local JSON/JSONL files read with HuggingFace `datasets`, normalised to EvalRecord.

Formats (`format=`):
    counterfact  the flat CounterFact of factedit/data/counterfact/*.json (EasyEdit's): prompt, target_new,
                 ground_truth, subject, rephrase_prompt, locality_prompt + locality_ground_truth
                 (the neighbourhood prompt, same relation, true answer: CounterFact NS); each rephrase
                 prompt is told a paraphrase or a generation prompt (core/rephrases.py)
    rome         the original ROME CounterFact: requested_rewrite {prompt template with "{}", subject,
                 target_new.str, target_true.str}, paraphrase_prompts, neighborhood_prompts (strings or
                 {prompt, target}), generation_prompts
    zsre         zsRE in the MEND format: src, alt, answers, subject, rephrase, loc + loc_ans
                 (unrelated pairs: token locality)
    mapped       any JSON/JSONL with `fields`: record field -> source field (dotted paths reach into
                 nested objects), see MAPPED_FIELDS
    auto         told apart by the first record's fields (`mapped` when `fields` are given)

A malformed record raises DatasetError naming the file, the record (0-based) and the field; with
`skip_invalid=True` such records are skipped, counted and logged instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import FacteditError
from ..core.hashing import file_sha256
from ..core.rephrases import rephrase_kind
from .records import EvalRecord

logger = logging.getLogger(__name__)

FORMATS = ("auto", "counterfact", "rome", "zsre", "mapped")
REPHRASE_CHOICES = ("all", "paraphrase", "generation")  # which records `select_records` keeps (core/rephrases.py)
# Fields a `mapped` dataset may map; the values of list fields may be a string or a list of strings.
MAPPED_FIELDS = {
    "prompt": "the edit prompt (required; a '{}' in it is replaced by the subject)",
    "target_new": "the new object (required)",
    "target_true": "the true object",
    "subject": "the subject",
    "case_id": "an id",
    "paraphrases": "paraphrased prompts",
    "neighborhood": "neighbourhood prompts (their answer: neighborhood_answers, else target_true)",
    "neighborhood_answers": "answers of the neighbourhood prompts (one, or one per prompt)",
    "locality": "unrelated prompts",
    "locality_answers": "answers of the unrelated prompts (one, or one per prompt)",
    "generation_prompts": "prompts for fluency generations",
}


class DatasetError(FacteditError, ValueError):
    """A dataset file that cannot be read, or a malformed record in it."""


@dataclass(frozen=True)
class LoadedData:
    """The valid records of one file, in file order, and what was skipped."""

    records: list[EvalRecord]
    path: Path
    sha256: str
    format: str
    total: int  # records in the file
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # one line per skipped record


class _Row:
    """Typed access to one raw record; every problem names the file, the record and the field."""

    def __init__(self, raw: Any, path: Path, index: int) -> None:
        self.raw, self.path, self.index = raw, path, index
        if not isinstance(raw, Mapping):
            raise self.error("<record>", f"expected a JSON object, got {type(raw).__name__}")

    def error(self, name: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.path}: record {self.index}: field {name!r}: {problem}")

    def value(self, name: str) -> Any:
        value: Any = self.raw
        for part in name.split("."):
            if not isinstance(value, Mapping):
                return None
            value = value.get(part)
        return value

    def text(self, name: str, required: bool = True) -> str | None:
        value = self.value(name)
        if value is None:
            if required:
                raise self.error(name, "missing")
            return None
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {type(value).__name__} {value!r:.60}")
        if not value.strip():
            raise self.error(name, "empty")
        return value

    def texts(self, name: str) -> list[str]:
        """A list of non-empty strings from a string, a list of strings, or nothing."""
        value = self.value(name)
        items = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
            raise self.error(name, f"expected a non-empty string or a list of them, got {value!r:.80}")
        return list(items)

    def answered(self, prompts: list[str], answers: list[str], name: str) -> tuple[tuple[str, str], ...]:
        """Pair prompts with answers: one answer for all, or one each."""
        if prompts and not answers:
            raise self.error(name, "prompts without an answer")
        if len(answers) not in (1, len(prompts)) and prompts:
            raise self.error(name, f"{len(prompts)} prompts but {len(answers)} answers")
        return tuple((p, answers[0] if len(answers) == 1 else answers[i]) for i, p in enumerate(prompts))

    def case_id(self, name: str = "case_id") -> str | int | None:
        value = self.value(name)
        return value if isinstance(value, (str, int)) or value is None else str(value)


def _counterfact(row: _Row) -> EvalRecord:
    true = row.text("ground_truth")
    neighbours = row.texts("locality_prompt")
    answers = row.texts("locality_ground_truth") or ([true] if true else [])
    subject = row.text("subject", required=False)
    rephrases = row.texts("rephrase_prompt")
    return EvalRecord(
        index=row.index,
        prompt=row.text("prompt"),
        target_new=row.text("target_new"),
        target_true=true,
        subject=subject,
        case_id=row.case_id(),
        paraphrases=tuple(rephrases),
        paraphrase_kinds=tuple(rephrase_kind(p, subject) for p in rephrases),
        neighborhood=row.answered(neighbours, answers, "locality_ground_truth"),
    )


def _rome(row: _Row) -> EvalRecord:
    template = row.text("requested_rewrite.prompt")
    if "{}" not in template:
        raise row.error("requested_rewrite.prompt", "the template has no '{}' for the subject")
    subject = row.text("requested_rewrite.subject")
    true = row.text("requested_rewrite.target_true.str")
    neighbours = row.value("neighborhood_prompts") or []
    if not isinstance(neighbours, list):
        raise row.error("neighborhood_prompts", "expected a list")
    pairs = []
    for item in neighbours:  # a string (answer: the true object) or {"prompt", "target"}
        if isinstance(item, Mapping):
            prompt, answer = item.get("prompt"), item.get("target", true)
        else:
            prompt, answer = item, true
        if not (isinstance(prompt, str) and prompt.strip() and isinstance(answer, str) and answer.strip()):
            raise row.error("neighborhood_prompts", f"malformed item {item!r:.80}")
        pairs.append((prompt, answer))
    return EvalRecord(
        index=row.index,
        prompt=template.replace("{}", subject),
        target_new=row.text("requested_rewrite.target_new.str"),
        target_true=true,
        subject=subject,
        case_id=row.case_id(),
        paraphrases=tuple(row.texts("paraphrase_prompts")),
        neighborhood=tuple(pairs),
        generation_prompts=tuple(row.texts("generation_prompts")),
    )


def _zsre(row: _Row) -> EvalRecord:
    answers = row.texts("answers")
    loc = row.text("loc", required=False)
    return EvalRecord(
        index=row.index,
        prompt=row.text("src"),
        target_new=row.text("alt"),
        target_true=answers[0] if answers else row.text("pred", required=False),
        subject=row.text("subject", required=False),
        case_id=row.case_id(),
        paraphrases=tuple(row.texts("rephrase")),
        locality=((loc, row.text("loc_ans")),) if loc is not None else (),
    )


def _mapped(fields: Mapping[str, str]) -> Callable[[_Row], EvalRecord]:
    unknown = sorted(set(fields) - set(MAPPED_FIELDS))
    missing = [k for k in ("prompt", "target_new") if k not in fields]
    if unknown or missing:
        raise DatasetError(
            f"data.fields: unknown {unknown} / missing {missing}; the fields are: "
            + "; ".join(f"{k}: {v}" for k, v in MAPPED_FIELDS.items())
        )

    def texts(row: _Row, key: str) -> list[str]:
        return row.texts(fields[key]) if key in fields else []

    def convert(row: _Row) -> EvalRecord:
        prompt = row.text(fields["prompt"])
        subject = row.text(fields["subject"], required=False) if "subject" in fields else None
        if subject is not None:
            prompt = prompt.replace("{}", subject)
        true = row.text(fields["target_true"], required=False) if "target_true" in fields else None
        neighbour_answers = texts(row, "neighborhood_answers") or ([true] if true else [])
        return EvalRecord(
            index=row.index,
            prompt=prompt,
            target_new=row.text(fields["target_new"]),
            target_true=true,
            subject=subject,
            case_id=row.case_id(fields["case_id"]) if "case_id" in fields else None,
            paraphrases=tuple(texts(row, "paraphrases")),
            neighborhood=row.answered(
                texts(row, "neighborhood"), neighbour_answers, fields.get("neighborhood", "")
            ),
            locality=row.answered(
                texts(row, "locality"), texts(row, "locality_answers"), fields.get("locality", "")
            ),
            generation_prompts=tuple(texts(row, "generation_prompts")),
        )

    return convert


_CONVERTERS: dict[str, Callable[[_Row], EvalRecord]] = {
    "counterfact": _counterfact,
    "rome": _rome,
    "zsre": _zsre,
}


def detect_format(first: Any, path: Path) -> str:
    keys = set(first) if isinstance(first, Mapping) else set()
    if "requested_rewrite" in keys:
        return "rome"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "target_new", "ground_truth"} <= keys:
        return "counterfact"
    raise DatasetError(
        f"{path}: cannot tell the dataset format from the fields {sorted(keys)}; set data.format to one of "
        f"{', '.join(FORMATS[1:])} (for `mapped`, give data.fields: record field -> source field)"
    )


class _Unparsable:
    """A JSONL line that is not JSON (kept so its record index is reported)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _read_rows(path: Path) -> list[Any]:
    """Every record of a JSON array or JSONL file, read with `datasets`. When Arrow cannot build a
    table (a syntax error in a line, types that differ between records), the file is re-read with the
    json module so each bad record can be named (or skipped)."""
    import datasets

    try:
        return datasets.load_dataset("json", data_files=str(path), split="train").to_list()
    except (datasets.exceptions.DatasetGenerationError, ValueError) as exc:
        logger.info("datasets could not read %s as one table (%s); reading it record by record", path, exc)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        return data
    if data is not None and not text.lstrip().startswith("{"):
        raise DatasetError(f"{path}: expected a JSON array of records or JSON lines")
    rows: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            rows.append(_Unparsable(f"line {number} is not JSON ({exc.msg})"))
    return rows


def load_records(
    path: str | Path,
    format: str = "auto",
    fields: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
) -> LoadedData:
    """Read and normalise every record of a local JSON/JSONL file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    if format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; known: {', '.join(FORMATS)}")
    rows = _read_rows(path)
    if not rows:
        raise DatasetError(f"{path} holds no records")
    if format == "auto":
        format = "mapped" if fields else detect_format(rows[0], path)
    if format == "mapped" and not fields:
        raise DatasetError("format 'mapped' needs data.fields (record field -> source field)")
    convert = _mapped(fields) if format == "mapped" else _CONVERTERS[format]  # type: ignore[arg-type]
    records: list[EvalRecord] = []
    errors: list[str] = []
    for index, raw in enumerate(rows):
        try:
            if isinstance(raw, _Unparsable):
                raise DatasetError(f"{path}: record {index}: field '<json>': {raw.problem}")
            records.append(convert(_Row(raw, path, index)))
        except DatasetError as exc:
            if not skip_invalid:
                raise DatasetError(f"{exc} (set skip_invalid=true to skip malformed records)") from None
            errors.append(str(exc))
    if errors:
        logger.warning(
            "skipped %d malformed record(s) of %d in %s; first: %s", len(errors), len(rows), path, errors[0]
        )
    if not records:
        raise DatasetError(f"{path}: no valid records")
    return LoadedData(records, path, file_sha256(path), format, len(rows), len(errors), errors)


def select_records(
    records: Sequence[EvalRecord], n: int | None = None, shuffle: bool = False, seed: int = 0, start: int = 0,
    rephrase: str = "all",
) -> list[EvalRecord]:
    """`n` records from position `start` (e.g. held-out ones past those tuned on), in file order or
    (shuffle) in a seeded random order; with `rephrase` "paraphrase" or "generation", of the records from
    `start` on only those with a rephrase prompt of that kind (EvalRecord.paraphrase_kinds; a record
    without kinds holds paraphrases only)."""
    import random

    if rephrase not in REPHRASE_CHOICES:
        raise ValueError(f"rephrase must be one of {', '.join(REPHRASE_CHOICES)}, got {rephrase!r}")
    chosen = list(records)
    if shuffle:
        random.Random(seed).shuffle(chosen)
    chosen = chosen[start:]
    if rephrase != "all":
        chosen = [r for r in chosen if rephrase in (r.paraphrase_kinds or ("paraphrase",) * len(r.paraphrases))]
    return chosen if n is None else chosen[:n]
