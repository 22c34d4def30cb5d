"""Which of a flat CounterFact record's other prompts ask the same question: paraphrases or
generation prompts.

ROME's CounterFact (Meng et al. 2022) gives each fact two kinds of other prompts about its subject:
`paraphrase_prompts`, the same question in other words after a sentence of unrelated text ("... Danielle
Darrieux's mother tongue is"), and `generation_prompts`, written from a few templates per relation to
draw free text about the subject ("Where {} is from, people speak the language of", "{}'s surroundings
include"), whose answer follows from the fact but is often not its object: a subject now from London
makes the language English, not "London". EasyEdit's flat split, which `data/counterfact/*.json` is,
keeps one prompt of either kind in `rephrase_prompt`, unlabelled: 83 % of its 11,919 records hold a
generation prompt.

A rephrase prompt is a generation prompt when, the subject replaced by "{}", it is one of the
templates below: the 70 such templates the two files hold, each at least 10 times; no other
rephrase prompt occurs more than once (a paraphrase prompt carries its own sentence before the subject).
Teacher-forced success (P(o*) > P(oᶜ)) compares the two objects after either kind; whether the model
then *says* the target is a test of paraphrases only.
"""

from __future__ import annotations

from typing import Literal

RephraseKind = Literal["paraphrase", "generation"]

GENERATION_TEMPLATES = frozenset({
    "Every morning, {} looks forward to going to work at",
    "In the capital of {}, famous tourist attractions include",
    "In {}, people speak",
    "One can get to {} by navigating",
    "One can get to {}'s headquarters by navigating",
    "People around {} speak the language of",
    "People in {}'s capital speak the language of",
    "People in {}'s twin city speak the language of",
    "The affiliation of {} is",
    "The best restaurants around {} include",
    "The company that owns and sells {}'s music is",
    "The development of {} is overseen by",
    "The development of {} occurred in",
    "The expertise of {} becomes important when",
    "The founders of {} are from the location of",
    "The headquarters of {} is surrounded by restaurants including",
    "The inspiration for {} came from",
    "The language used by people in {} is",
    "The language {} was written in is called",
    "The origin of {}'s name is that",
    "The passport that {} carries is",
    "The production of {} is overseen by",
    "The reason {} has its name is that",
    "The trademark of {} is owned by",
    "The tragic death of {} occurred in",
    "To get to work every day, {} has to",
    "When {} was killed, the locals held a",
    "Where {} is from, people speak the language of",
    "Where {} passed away, people speak the language of",
    "{} aired alongside other programs including",
    "{} currently lives in",
    "{} first aired on",
    "{} is a citizen of",
    "{} is extraordinarily good at",
    "{} is full of people who speak",
    "{} is incredible at",
    "{} is known for",
    "{} is my favorite product out of everything created by",
    "{} is my favorite product out of everything owned by",
    "{} is my favorite show that has aired on",
    "{} is part of",
    "{} is sold by",
    "{} is surrounded by restaurants including",
    "{} lives in",
    "{} originated from",
    "{} originates from",
    "{} produces the most amazing music on the",
    "{} recently entered an agreement with the record label",
    "{} regularly attends religious events at the local",
    "{} was born in",
    "{} was written in the country of",
    "{} works as a",
    "{} worships",
    "{}'s author is from",
    "{}'s capital is known for",
    "{}'s favorite lunchtime work meals include",
    "{}'s friends all speak the language of",
    "{}'s greatest accomplishment is",
    "{}'s greatest artistic work is",
    "{}'s greatest strength is",
    "{}'s greatest weakness is",
    "{}'s headquarters is surrounded by",
    "{}'s mother tongue is",
    "{}'s music is owned by",
    "{}'s parents are from",
    "{}'s religious values strongly emphasize",
    "{}'s surroundings include",
    "{}'s twin city has famous tourist attractions including",
    "{}'s twin city is known for",
    "{}'s work office is surrounded by",
})


def rephrase_kind(prompt: str, subject: str | None) -> RephraseKind:
    """The kind of a rephrase prompt: "generation" when it is one of CounterFact's generation-prompt
    templates filled with `subject`, else "paraphrase" (also without a subject, or with one the prompt
    does not name)."""
    if not subject or subject not in prompt:
        return "paraphrase"
    return "generation" if prompt.replace(subject, "{}") in GENERATION_TEMPLATES else "paraphrase"
