"""The edit methods on the page: a one-line description each, and their main settings as inputs whose help
is the config dataclass's own (the comment beside a field, or its paragraph in the class docstring)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
from collections.abc import Mapping
from typing import Any

import streamlit as st

from factedit import ConfigError
from factedit.core.methods import config_to_dict, get_method, make_config
from factedit.core.settable import checked, settable_fields
from factedit.session import EditSession

DESCRIPTIONS = {
    "ft_l": "Constrained fine-tuning (FT+L): the MLP matrices of one block are trained on the new target, "
            "each weight kept within a small L∞ ball and the change off the keys plain text uses: "
            "the fine-tuning method that holds up best when edits accumulate.",
    "ft": "Plain fine-tuning of one MLP matrix on the new target, unconstrained: the baseline; it drifts "
          "most when edits accumulate.",
    "lora": "A LoRA adapter (HuggingFace peft, LoRA+: B learns 16 times faster) trained on the new target "
            "and folded into a low-rank delta; the method whose edits leave as adapters.",
    "mend": "MEND: a trained editor network turns one gradient of the base model into a low-rank update "
            "(the fact at its subject, on the prompt and under five short contexts the model writes; small "
            "steps from fresh gradients where the first falls short): of the lifelong editors it keeps "
            "edits best on the default model (the default there); its trained network fits that model only.",
    "ultraedit": "UltraEdit: MEND's machinery with no trained network, for any model: normalised gradient "
                 "steps (statistics that keep learning from every edit) solved in the null space of plain "
                 "text's keys. Needs no checkpoint: the default on a model `mend`'s network was not trained for.",
}
# The settings the page offers per method (the rest stay as configured in factedit/conf/app.yaml).
MAIN_SETTINGS = {
    "ft_l": ("layers", "lr", "max_steps", "norm_constraint"),
    "ft": ("layers", "lr", "max_steps"),
    "lora": ("layers", "rank", "lr", "b_lr_ratio", "max_steps"),
    "mend": ("positions", "step_scales", "extra_steps", "finish_steps", "take_margin", "chat_context",
             "fallback_ridges", "prefixes", "prefix_rows"),
    "ultraedit": ("lr", "extra_steps", "step_scales", "take_margin", "chat_context", "prefixes", "prefix_rows"),
    **dict.fromkeys(("alphaedit", "memit", "rome"),
                    ("layers", "v_lr", "v_stop_nll", "v_shrink_checks", "chat_context", "prefixes")),
}
PER_ROW = 4  # inputs side by side on the page
# Human labels of the settings the page offers; the field's own name stays in its help.
LABELS = {
    "layers": "Blocks to edit", "lr": "Learning rate", "max_steps": "Training steps (at most)",
    "norm_constraint": "Largest change of one weight", "rank": "LoRA rank",
    "step_scales": "Step size (per block)", "fallback_ridges": "Fallback ridges", "extra_steps": "Extra steps",
    "b_lr_ratio": "B learns this many times faster (LoRA+)",
    "anchor": "Where the loss reaches the edited block (subject: its last token)",
    "positions": "Where the edit is keyed (subject: its last token)",
    "finish_steps": "Finishing steps at the prompt's end (subject-keyed edits)",
    "take_margin": "Lead the target must take over the runner-up (nats)",
    "chat_context": "Also edit the fact asked as a chat",
    "prefixes": "Also edit under contexts the model writes",
    "prefix_rows": "What the contexts' rows do",
    "v_lr": "Learning rate of the value", "v_stop_nll": "Stop once the target's NLL is under",
    "v_shrink_checks": "Shorten the value (bisection checks)",
}
# The guide to the methods: figures from the README and docs/ (default model, CounterFact, this 2-core CPU).
GUIDE = (
    "**For edits you keep, use `mend`** (the default on the default model; keyed on the subject, under "
    "five contexts the model writes): 200 edits kept one after another on held-out facts give ES 0.995, "
    "the new target said for 0.94 of them at the end, PS 0.90, chat answers 0.395, neighbours about as "
    "unedited (NS 0.62 against 0.635) and drift 1.079× (docs/lifelong.md, “Several contexts”), at about "
    "7.5 forward+backward passes an edit. Turning “Also edit under contexts the model writes” off (the "
    "prompt alone, MEND as published) edits in about half the time and reaches fewer other wordings (PS "
    "0.855, chat 0.20 after the same 200). `ultraedit` needs no trained network (the default on another "
    "model) and keeps the same 200 at ES 0.985, said 0.86, PS 0.685, drift 1.014×, at 4.4 passes. "
    "`ft_l` (one edit at a time ES 1.00, "
    "PS 0.62, NS 0.61 against 0.63 unedited; 200 kept edits at ES 0.935 and drift 1.19×) is the fine-tuning "
    "baseline that holds up; with `anchor` \"subject\" and prefixes (radius 0.05) it reaches paraphrases "
    "(PS 0.80-0.92 on held-out facts, chat 0.4) at three times the cost and more drift when kept; `lora` "
    "(LoRA+) reaches ES 1.00, PS 0.65 at 3.8 forward+backward passes an edit (plain LoRA, `b_lr_ratio` 1: "
    "10.2) and drifts more when edits are kept; "
    "`ft` drifts most when edits pile up (1.66× after 200). "
    "`alphaedit` (locate-then-edit) generalises best and keeps edits well (100 kept: ES 0.99, PS 0.97, "
    "retention 0.97, drift 1.12×) at 7-9 forward+backward passes an edit, and answers best through the "
    "chat (one at a time on held-out facts: the chat reply names the new target for 0.75 of prompts and "
    "0.60 of paraphrases). `grace` and `tpatcher` leave "
    "every neighbour as it was but do not reach paraphrases; `adapter` reaches paraphrases and moves "
    "neighbours most. Other methods in the list come from the registry. Whatever you pick, "
    "“Preview edit” shows what it would do before anything is applied, and “Compare methods” runs several "
    "side by side."
)


def compare_default(methods: list[str], wanted: tuple[str, ...]) -> list[str]:
    """The methods preselected for a comparison: `wanted` (the app's setting) as far as registered, else all."""
    return [m for m in wanted if m in methods] or list(methods)


def method_guide() -> str:
    """One paragraph: which method for what, with the measured figures, and the recommendation for kept edits."""
    return GUIDE


def label(name: str) -> str:
    """A setting's label on the page ("Learning rate" for lr)."""
    return LABELS.get(name, name.replace("_", " ").capitalize())


def description(method: str) -> str:
    if method in DESCRIPTIONS:
        return DESCRIPTIONS[method]
    spec = get_method(method)
    if getattr(spec, "description", ""):  # the registry's own line (MethodSpec.description)
        return spec.description
    doc = inspect.getdoc(spec.config_cls) or ""
    return doc.split("\n\n")[0].replace("\n", " ") or "A registered edit method."


@functools.cache
def field_help(config_cls: type) -> dict[str, str]:
    """Help text of each field of a config dataclass, from its source: the comment on the field's line,
    else the field's paragraph in the docstring ("name: text" or "a / b: text"), searched up the classes
    it derives from."""
    found: dict[str, str] = {}
    for cls in config_cls.__mro__:
        if not dataclasses.is_dataclass(cls):
            continue
        for name, text in {**_docstring_help(cls), **_comment_help(cls)}.items():
            found.setdefault(name, text)
    return found


def _comment_help(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.lineno in comments:
            out[node.target.id] = comments[node.lineno]
    return out


_PARAGRAPH = re.compile(r"^(\w+(?: / \w+)*): (.*)$")


def _docstring_help(cls: type) -> dict[str, str]:
    doc = cls.__dict__.get("__doc__") or ""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in textwrap.dedent("\n".join(doc.splitlines()[1:])).splitlines():
        match = _PARAGRAPH.match(line)
        if match:
            current = [match.group(2)]
            for name in match.group(1).split(" / "):
                out[name] = current
        elif line.startswith((" ", "\t")) and current:
            current.append(line.strip())
        else:
            current = []
    return {name: " ".join(parts) for name, parts in out.items()}


def configured(service: EditSession, method: str) -> dict[str, Any]:
    """The method's config as the session uses it (its defaults plus factedit/conf/app.yaml's overrides)."""
    spec = get_method(method)
    return config_to_dict(make_config(spec.config_cls, service.config.overrides_for(method)))


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping):  # a nested config (prefixes, preserve): on or off, its fields as configured
        return "on"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


FLAG_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def parse_value(text: str, default: Any, annotation: str) -> Any:
    """`text` as the type of the field (from its annotation and default); "" = None where None is allowed."""
    text = text.strip()
    if not text:
        if "None" in annotation:
            return None
        raise ConfigError("a value is needed")
    if nested(annotation, default):  # on: as configured (or the nested config's defaults); off: None
        return (dict(default) if isinstance(default, Mapping) else {}) if flag(text, "on or off") else None
    if annotation == "bool" or isinstance(default, bool):
        return flag(text, "true or false")
    element = "float" if "float" in annotation else "int" if "int" in annotation else "str"
    convert = {"float": float, "int": int, "str": str}[element]
    try:
        if annotation.startswith("tuple") or isinstance(default, (list, tuple)):
            return [convert(part.strip()) for part in text.split(",") if part.strip()]
        return convert(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not {'a list of ' if ',' in text else ''}{element}") from None


def flag(text: str, words: str) -> bool:
    """`text` as one of FLAG_WORDS; ConfigError naming `words` otherwise."""
    if text.lower() not in FLAG_WORDS:
        raise ConfigError(f"{text!r} is not {words}")
    return FLAG_WORDS[text.lower()]


def nested(annotation: str, default: Any) -> bool:
    """Whether a field holds a nested config (e.g. `PrefixConfig | None`), set on the page as on / off."""
    return isinstance(default, Mapping) or re.search(r"\w+Config\b", annotation) is not None


def _texts(method: str) -> dict[str, str]:
    """What the user typed into a method's settings (kept while other methods are shown)."""
    return st.session_state.setdefault("setting_texts", {}).setdefault(method, {})


def settings_inputs(service: EditSession, method: str) -> None:
    """Inputs for the method's main settings, with the config's help; shows what is wrong, if anything."""
    spec = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    current = configured(service, method)
    helps = field_help(spec.config_cls)
    names = [n for n in MAIN_SETTINGS.get(method, ()) if n in fields]
    texts = _texts(method)
    for start in range(0, len(names), PER_ROW):
        row = names[start:start + PER_ROW]
        for col, name in zip(st.columns(PER_ROW), row, strict=False):
            annotation = str(fields[name].type)
            optional = (" on / off." if nested(annotation, current[name])
                        else " Empty = None." if "None" in annotation else "")
            help_text = (helps.get(name, "") or "No description.") + optional + f" (setting `{name}`)"
            texts[name] = col.text_input(label(name), value=texts.get(name, format_value(current[name])),
                                         key=f"setting:{method}:{name}", help=help_text)
    st.caption("Unchanged settings are those of factedit/conf/app.yaml (or the method's defaults).")
    try:
        stored_overrides(service, method)
    except ConfigError as exc:
        st.error(f"These settings would be refused: {exc}", icon="⚠️")


def stored_overrides(service: EditSession, method: str) -> dict[str, Any]:
    """The settings the user changed for `method`, as config overrides; ConfigError when one is invalid."""
    spec = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    current = configured(service, method)
    overrides = {}
    for name, text in _texts(method).items():
        if name not in fields or text.strip() == format_value(current[name]):
            continue
        try:
            overrides[name] = parse_value(text, current[name], str(fields[name].type))
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if overrides:
        # The bounds the session holds every caller to (settable.py), then the config's own checks.
        checked(settable_fields(spec.config_cls), overrides, f"config of {method}")
        make_config(spec.config_cls, {**service.config.overrides_for(method), **overrides})  # raises if invalid
    return overrides


def changed_settings(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in overrides.items()) or "as configured"
