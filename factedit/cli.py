"""The `factedit` command line.

    factedit edit --prompt P --target T [--method ft_l] [--journal F] [--model M] [--set key=value]
    factedit revert ID --journal F
    factedit history --journal F
    factedit journal compact --journal F [--older-than-days D]   (drop reverted edits' deltas; records stay)
    factedit diff ID --journal F [--probe P ...]
    factedit export --journal F --format peft OUT/ [--id ID ...] [--rank R | --exact]   (a PEFT LoRA adapter)
    factedit export --journal F --format merged OUT/           (the edited model as a HuggingFace folder)
    factedit export --journal F --format peft-ia3 OUT/ [--id ID ...]   (ia3 edits as a PEFT IA³ adapter)
    factedit export --journal F --format gguf-lora OUT.gguf [--id ID ...] [--rank R | --exact] [--base-gguf B]
                                                               (a GGUF LoRA adapter for llama.cpp / Ollama)
    factedit export --journal F --format gguf OUT.gguf [--dtype f32|f16|q8_0|base|f32-all] [--base-gguf B]
                                                               (the edited model as one GGUF file)
    factedit import --journal F ADAPTER_DIR/ [--model M]       (a PEFT LoRA adapter as one edit)
    factedit eval method=ft_l data=counterfact n=200 ...      (Hydra overrides; see factedit/conf/eval.yaml)
    factedit train-mend ...                                    (Hydra overrides; see factedit/conf/mend/)
    factedit serve [--model M] [--journal F] [--port 8000] [--token-file F]   (the HTTP API; see server/)

Each run with a journal reloads the base model recorded in the journal and replays its active edits.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core.errors import FacteditError

# The commands import what they use when they run: `factedit --help` and a mistyped command answer at
# once, without loading torch, transformers and peft first (seconds).

DEFAULT_METHOD = "ft_l"


def _parse_value(text: str) -> Any:
    """`--set` values: JSON when it parses (numbers, lists, null), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {pair!r}")
        result[key] = _parse_value(value)
    return result


def _journal_model_and_method(
    path: Path | None, model_arg: str | None, create: bool
) -> tuple[str | None, str | None]:
    """The model to load (the journal's, unless it is new) and the journal's last method. Without
    `create`, a missing journal is an error (nothing is created)."""
    from .core.methods import available_methods
    from .editing.journal import Journal

    if path is None or (create and not path.exists()):
        return model_arg, None
    with Journal(path, create=create) as journal:
        if journal.is_new:
            return model_arg, None
        recorded = journal.meta["model_id"]
        if model_arg is not None and model_arg != recorded:
            raise SystemExit(f"journal {path} was made with model {recorded!r}, not {model_arg!r}")
        # The newest edit's method; an imported adapter's "import" names no method to edit with.
        methods = (journal.record(edit_id, delta=False).method for edit_id in reversed(journal.order()))
        method = next((m for m in methods if m in available_methods()), None)
    return (None if recorded == "default" else recorded), method


def _open(args: argparse.Namespace, method: str | None = None, *, create: bool = False, **overrides: Any):
    """Load the journal's model and an Editor that replayed it; only `edit` may create a journal."""
    from .editing.editor import Editor
    from .model.loading import load_model

    journal = Path(args.journal) if args.journal else None
    model_name, journal_method = _journal_model_and_method(journal, getattr(args, "model", None), create)
    model, tokenizer = load_model(model_name)
    editor = Editor(method or journal_method or DEFAULT_METHOD, tokenizer=tokenizer, journal=journal, **overrides)
    editor.attach(model)
    return model, editor


def cmd_edit(args: argparse.Namespace) -> int:
    from . import display

    model, editor = _open(args, args.method, create=True, **_overrides(args.set))
    with editor:
        record = editor.edit(model, args.prompt, args.target, paraphrases=args.paraphrase, locality=args.locality)
        print(json.dumps(record.to_dict(), indent=2) if args.json else display.format_record(record))
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    model, editor = _open(args)
    with editor:
        record = editor.revert(model, args.id)
        print(f"reverted {record.id} ({record.request.prompt!r} -> {record.request.target!r})")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from . import display
    from .editing.journal import Journal

    with Journal(args.journal, create=False) as journal:
        records = journal.records(deltas=False)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
    else:
        print(display.format_history(records))
    return 0


def cmd_journal_compact(args: argparse.Namespace) -> int:
    if args.older_than_days < 0:
        raise SystemExit("--older-than-days must be >= 0")
    from .editing.journal import Journal

    with Journal(args.journal, create=False) as journal:
        report = journal.compact(args.older_than_days * 86400)
    print(json.dumps(report) if args.json else
          f"dropped the deltas of {report['dropped']} reverted edit(s); "
          f"{report['bytes_before']:,} -> {report['bytes_after']:,} bytes")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from . import display

    model, editor = _open(args)
    with editor:
        diff = editor.diff(args.id, model=model, probes=args.probe)
        print(json.dumps(diff.to_dict(), indent=2) if args.json else display.format_diff(diff))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format not in ("gguf", "gguf-lora") and (args.base_gguf or args.dtype):
        raise SystemExit("--base-gguf and --dtype apply to --format gguf and gguf-lora")
    if args.format == "gguf-lora" and args.dtype:
        raise SystemExit("--dtype applies to --format gguf (the adapter's factors are float32)")
    if args.format == "gguf" and (args.id or args.rank is not None or args.exact):
        raise SystemExit("--id, --rank and --exact apply to adapters; a merged GGUF holds every active edit")
    if args.format == "peft-ia3" and (args.rank is not None or args.exact):
        raise SystemExit("--rank and --exact apply to LoRA adapters; an IA³ adapter holds the ia3 vectors exactly")
    from .artifacts.adapters import check_vllm_compatible
    from .artifacts.peft_ia3 import export_ia3_adapter

    model, editor = _open(args)
    with editor:
        if args.format == "peft-ia3":
            active = [editor.record(r.id) for r in editor.history if r.status == "active"]
            ia3 = export_ia3_adapter(model, active, args.out, ids=args.id or None)
            print(f"wrote a PEFT IA³ adapter of {len(ia3.edits)} edit(s), {len(ia3.modules)} module(s), to {ia3.path} "
                  f"(vectors give the edits within {ia3.max_error:.2g} relative)")
            return 0
        if args.format == "gguf-lora":
            result = editor.export_adapter(args.out, args.id or None, rank=args.rank, exact=args.exact,
                                           format="gguf", base_gguf=args.base_gguf)
            print(f"wrote a GGUF LoRA adapter ({result.architecture}) of {len(result.edits)} edit(s), rank "
                  f"{result.rank}, {len(result.tensors)} tensor pair(s), to {result.path}")
            print(f"  base: {result.base or 'none checked (give --base-gguf)'}")
            for name, error in result.svd_errors.items():
                print(f"  {name}: dense edits as a rank-{result.svd_rank} SVD, relative error {error:.3g}")
            return 0
        if args.format == "gguf":
            merged = editor.export_merged(model, args.out, format="gguf", base_gguf=args.base_gguf,
                                          dtype=args.dtype or "f32")
            print(f"wrote the edited model ({len(merged.edits)} active edit(s)) as GGUF to {merged.path}: "
                  f"{len(merged.tensors)} edited tensor(s) written, {merged.copied} copied from {merged.base.name}")
            for name, kind in merged.tensors.items():
                error = merged.edit_errors.get(name)
                print(f"  {name}: {kind}" + ("" if error is None else f", edit relative error {error:.3g}"))
            return 0
        if args.format == "merged":
            if args.id or args.rank is not None or args.exact:
                raise SystemExit("--id, --rank and --exact apply to --format peft; merged holds every active edit")
            path = editor.export_merged(model, args.out)
            active = sum(r.status == "active" for r in editor.history)
            print(f"wrote the edited model ({active} active edit(s)) to {path}")
            return 0
        result = editor.export_adapter(args.out, args.id or None, rank=args.rank, exact=args.exact)
        print(f"wrote a PEFT LoRA adapter of {len(result.edits)} edit(s), rank {result.rank}, to {result.path}")
        for name, error in result.svd_errors.items():
            print(f"  {name}: dense edits as a rank-{result.svd_rank} SVD, relative error {error:.3g}")
        for problem in check_vllm_compatible(result.path):
            print(f"  note: vLLM will not serve it: {problem}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from . import display

    model, editor = _open(args, create=True)
    with editor:
        record = editor.import_adapter(model, args.adapter)
        print(json.dumps(record.to_dict(), indent=2) if args.json else display.format_record(record))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factedit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_journal_commands(sub)
    _add_artifact_commands(sub)
    from .server.cli import add_parser as add_serve_parser  # the HTTP stack loads only when used

    add_serve_parser(sub)
    return parser


def _add_journal_commands(sub: Any) -> None:
    """edit, journal compact, revert, history, diff: the commands that read or change a journal."""
    edit = sub.add_parser("edit", help="apply one edit")
    edit.add_argument("--prompt", required=True)
    edit.add_argument("--target", required=True)
    edit.add_argument("--method", default=None, help=f"registered method (default {DEFAULT_METHOD})")
    edit.add_argument("--journal", help="journal file (created if missing); without it nothing persists")
    edit.add_argument("--model", help="hub id or local folder for a new journal (default: embedded model)")
    edit.add_argument("--paraphrase", action="append", default=[])
    edit.add_argument("--locality", action="append", default=[])
    edit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config override")
    edit.add_argument("--json", action="store_true")
    edit.set_defaults(func=cmd_edit)

    journal = sub.add_parser("journal", help="maintain a journal")
    journal_sub = journal.add_subparsers(dest="journal_command", required=True)
    compact = journal_sub.add_parser(
        "compact", help="drop the deltas of edits reverted long ago (records stay; replay is unchanged)")
    compact.add_argument("--journal", required=True)
    compact.add_argument("--older-than-days", type=float, default=0.0,
                         help="only edits reverted at least this long ago (default 0: every reverted edit)")
    compact.add_argument("--json", action="store_true")
    compact.set_defaults(func=cmd_journal_compact)

    revert = sub.add_parser("revert", help="revert one edit exactly")
    revert.add_argument("id")
    revert.add_argument("--journal", required=True)
    revert.set_defaults(func=cmd_revert)

    history = sub.add_parser("history", help="list a journal's edits")
    history.add_argument("--journal", required=True)
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=cmd_history)

    diff = sub.add_parser("diff", help="what one edit changed")
    diff.add_argument("id")
    diff.add_argument("--journal", required=True)
    diff.add_argument("--probe", action="append", default=[], help="extra prompt to compare before/after")
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(func=cmd_diff)


def _add_artifact_commands(sub: Any) -> None:
    """export and import: edits to and from adapter files and merged models."""
    export = sub.add_parser("export", help="the active edits as a LoRA adapter (PEFT, GGUF), or the edited model")
    export.add_argument("out", help="folder to write (new or empty); a new .gguf file for the gguf formats")
    export.add_argument("--journal", required=True)
    export.add_argument("--format", choices=("peft", "merged", "gguf-lora", "gguf", "peft-ia3"), default="peft",
                        help="peft: PEFT LoRA folder; merged: HuggingFace folder; gguf-lora: GGUF LoRA adapter "
                             "(llama.cpp, Ollama); gguf: the edited model as GGUF; "
                             "peft-ia3: ia3 edits as a PEFT IA³ adapter")
    export.add_argument("--base-gguf", default=None,
                        help="the base model's GGUF (default: the default model's own)")
    export.add_argument("--dtype", choices=("f32", "f16", "q8_0", "base", "f32-all"), default=None,
                        help="--format gguf: type of the edited tensors (default f32; base = re-quantized to "
                             "the base tensor's type, which can lose the edit; f32-all = every tensor F32)")
    export.add_argument("--id", action="append", default=[], help="edit to export (repeat; default: all active)")
    export.add_argument("--rank", type=int, default=None, help="SVD rank for dense edits (ft, ft_l)")
    export.add_argument("--exact", action="store_true", help="refuse dense edits instead of approximating them")
    export.set_defaults(func=cmd_export)

    import_ = sub.add_parser("import", help="apply a PEFT LoRA adapter as one edit")
    import_.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    import_.add_argument("--journal", required=True, help="journal file (created if missing)")
    import_.add_argument("--model", help="hub id or local folder for a new journal (default: embedded model)")
    import_.add_argument("--json", action="store_true")
    import_.set_defaults(func=cmd_import)


# Subcommands that take Hydra overrides are dispatched before argparse sees them.
_HYDRA_COMMANDS = {
    "eval": "factedit.evaluation.cli",
    "train-mend": "factedit.mend.train",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in _HYDRA_COMMANDS:
        import importlib

        return importlib.import_module(_HYDRA_COMMANDS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FacteditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
