"""The one record type every evaluation dataset is normalised to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.request import EditRequest


@dataclass(frozen=True)
class EvalRecord:
    """One counterfactual edit and the prompts it is measured on.

    index: the record's position in its file (0-based); stays the same under shuffling.
    case_id: the dataset's own id, when it has one.
    prompt/target_new: the edit: after it, `prompt` should continue with `target_new`.
    target_true: the true object the edit replaces (None when the dataset has none; then the
        CounterFact-protocol metrics, which compare o* with oᶜ, are not computed for the record).
    subject: the entity the fact is about.
    paraphrases: other prompts for the same fact (generalization).
    paraphrase_kinds: what each of `paraphrases` is, where the dataset mixes kinds (core/rephrases.py):
        "paraphrase", the same question, or "generation", a CounterFact generation prompt about the
        subject whose answer need not be the target; empty = every one a paraphrase.
    neighborhood: (prompt, true answer) pairs of the same relation for other subjects, whose answer
        must stay (CounterFact NS; also part of token locality).
    locality: (prompt, answer) pairs unrelated to the edit, whose predictions must stay.
    generation_prompts: prompts to generate from for fluency (the edit prompt when empty).
    """

    index: int
    prompt: str
    target_new: str
    target_true: str | None = None
    subject: str | None = None
    case_id: str | int | None = None
    paraphrases: tuple[str, ...] = ()
    paraphrase_kinds: tuple[str, ...] = ()
    neighborhood: tuple[tuple[str, str], ...] = ()
    locality: tuple[tuple[str, str], ...] = ()
    generation_prompts: tuple[str, ...] = ()

    def to_request(self) -> EditRequest:
        """The edit the Editor gets: prompt, target and subject only. Paraphrases and locality prompts
        are held out, so a method cannot train on the prompts it is measured on."""
        return EditRequest(self.prompt, self.target_new, self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "case_id": self.case_id,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "subject": self.subject,
            "paraphrases": list(self.paraphrases),
            "paraphrase_kinds": list(self.paraphrase_kinds),
            "neighborhood": [list(p) for p in self.neighborhood],
            "locality": [list(p) for p in self.locality],
            "generation_prompts": list(self.generation_prompts),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalRecord:
        return cls(
            index=int(data["index"]),
            prompt=data["prompt"],
            target_new=data["target_new"],
            target_true=data.get("target_true"),
            subject=data.get("subject"),
            case_id=data.get("case_id"),
            paraphrases=tuple(data.get("paraphrases", ())),
            paraphrase_kinds=tuple(data.get("paraphrase_kinds", ())),
            neighborhood=tuple((p, a) for p, a in data.get("neighborhood", ())),
            locality=tuple((p, a) for p, a in data.get("locality", ())),
            generation_prompts=tuple(data.get("generation_prompts", ())),
        )
