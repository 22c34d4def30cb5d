"""The locate-then-edit family's one config: `alphaedit`, `memit` and `rome` are its defaults.

Defaults for the default model (SmolLM2-135M: 30 blocks, hidden 576, down projection input 1536),
chosen on CounterFact train records (bench/bench_editing.py --split train); docs/locate.md gives the
figures on validation records that no choice used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..core.settable import LAYERS, Choice, Flag, Integer, Nested, Number, Settable
from ..model.contexts import PrefixConfig
from ..safety.preserve import PreserveConfig, preserve_field


@dataclass(frozen=True)
class LocateConfig:
    """Keys at the subject's last token, a value v* fitted there, least squares spread over `layers`.

    With `preserve` set (AlphaEdit) the solve holds earlier edits' keys and runs in the null space of
    the reference corpus's keys (by default the whole space, weighing the corpus keys' outputs: the
    default model has no null space); with `preserve` None (MEMIT, ROME) it weighs the corpus keys'
    outputs by `cov_weight` and holds no earlier keys.
    """

    layers: tuple[int, ...] = (3, 4, 5, 6, 7)  # blocks whose MLP down projection is edited; v* is fitted at the last
    position: str = "subject_last"  # where keys are read and v* written: "subject_last", or "last" (prompt's last)
    # Context prefixes the model writes (contexts.py); keys and values are taken over them. None = prompt alone.
    prefixes: PrefixConfig | None = field(default=PrefixConfig(), metadata={"dataclass": PrefixConfig})
    # Fit v* also on the prompt asked as a chat (the tokenizer's chat template, the target as the reply's
    # start): one more row per fact (none without a chat template), in the loss, not in the stop check.
    # Keys stay those of the prefixed prompts. On held-out CounterFact val[20:40] (alphaedit): chat 0.50
    # -> 0.75, chat para 0.45 -> 0.60, said para, NS and neighbours kept unchanged, 9.7 v* steps for 9.1
    # (docs/locate.md, "Locate-then-edit").
    chat_context: bool = True
    v_steps: int = 20  # at most this many Adam steps on the value's δ
    # Adam learning rate of δ. MEMIT's 0.5 (GPT-J) takes 12-21 steps on the default model, most of them
    # walking δ to the ~0.7-1.5 ‖h‖ it needs; 2.0 takes ~8 on CounterFact train[20:40], with ES, said,
    # paraphrase and NS no worse there (docs/locate.md, "Locate-then-edit").
    v_lr: float = 2.0
    # "adam" (MEMIT's): v_lr is Adam's learning rate. "gradient": each step moves δ_i by v_lr × ‖h_i‖ along
    # its own gradient; Adam's first steps move every coordinate alike (sign-like), and the coordinates the
    # target does not need are written into the weights with the rest.
    v_optimizer: str = "adam"
    v_weight_decay: float | None = 1e-3  # loss term × ‖δ‖ / ‖h‖² (MEMIT's); None = off
    clamp_norm: float | None = 4.0  # ‖δ‖ kept <= clamp_norm × ‖h‖, h the hidden state it is added to; None = off
    kl_factor: float | None = 0.0625  # weight of KL(edited ‖ unedited) on `kl_prompt`; None = off
    kl_prompt: str = "{} is a"  # the subject's other facts: the next token after this, "{}" = the subject
    # Weight of KL(edited ‖ unedited) of the token after the target, in each row that has one: what follows
    # the new object stays what the model would say after it ("Paris, France", not "Paris, Paris"); None = off.
    after_kl: float | None = None
    # How many tokens after the target `after_kl` holds: 1, the next token; more, the unedited model's
    # greedy continuation of after_tokens - 1 tokens is appended to each row and each prediction along it held.
    after_tokens: int = 1
    v_stop_nll: float = 0.05  # stop once every request's mean target NLL (over its contexts) is below
    # After the stop, each request's δ is shortened to the smallest fraction of it that still meets the
    # stop, found by this many bisection passes (forward only); 0 = δ as the steps left it. Adam at lr 2.0
    # stops with ‖δ‖ 1.1-2.2 ‖h‖ where 0.7-1.6 meet the stop, and the excess is written into the weights:
    # 4 checks cut the drift of 100 kept edits by a third (CounterFact train[3000:3100]: 1.084x against
    # 1.125x, ES / PS / NS alike) but leave less margin, and one edit at a time the prompt's greedy answer
    # is the target a little less often (held-out val[1740:1780]: 0.875 against 0.925): off by default,
    # the setting for long streams of kept edits (docs/locate.md, "Locate-then-edit").
    v_shrink_checks: int = 0
    # v* is fitted for at most this many requests at a time (each request stopping on its own NLL, as
    # if fitted alone): the fit's memory grows with its rows (about 0.2 GB a fact on the default model: an
    # edit_batch of 100 facts in one fit needed more than 23 GB). Batches up to this size are one fit.
    v_chunk: int = 16
    # Without preserve: the corpus keys count as this many tokens; 0 = exact (ROME); None = the edited
    # matrix's input width (1536 on the default model). kᵀC⁻¹k grows with the width (its mean over the
    # corpus is the width), so a weight in proportion to it trades reach against the corpus alike on
    # every model: MEMIT's 15000 for GPT-J's 16384-wide keys is 0.92 × the width. On the default model
    # 15000 leaves France -> Rome untaken; about the width (1500, then 1536) takes it, paraphrases too
    # (preserve.covariance_weight; not tuned further).
    cov_weight: float | None = None
    # AlphaEdit's solve: earlier edits' keys (subject's last token) held when protect_edits, the update
    # confined to the directions whose eigenvalue of the corpus keys' E[kkᵀ] is under threshold × the
    # mean, with a ridge and MEMIT's covariance term inside them (cov_weight). None = MEMIT's covariance
    # solve (the cov_weight field above), no keys held. The default model's MLPs have no null space
    # (bench/bench_key_spectrum.py: the smallest eigenvalue of blocks 3-7 is 11-17 % of the mean), so
    # the default is the whole space (threshold above every eigenvalue) with the covariance term: 200 kept
    # edits on held-out CounterFact val[1700:1900] drift 1.175x against 1.380x with the published null
    # space (threshold 0.5, ridge 1), with ES, PS, what the model says and retention as good or better
    # (docs/locate.md; measured with cov_weight 1500, now the width: 1536). On a model whose MLPs have
    # a null space, threshold=0.5, ridge=1.0, cov_weight=0 is AlphaEdit as published.
    preserve: PreserveConfig | None = preserve_field(PreserveConfig(threshold=1000.0, ridge=0.01, cov_weight=None))
    # More passes of the spread while the update falls short of v* at the measured block: after a pass,
    # when some request still has more than `refine_tol` of its initial ‖v* − h‖ left (a regularised
    # solve, e.g. preserve.cov_weight, gives each key less than it asks for), the blocks are solved
    # again, lowest first, for what is left. 0 = one pass (MEMIT, AlphaEdit).
    refine_passes: int = 0
    refine_tol: float = 0.1

    # What the app and the service may set per edit (settable.py); kl_prompt (free text) is not.
    SETTABLE: ClassVar[Settable] = {
        "layers": LAYERS, "position": Choice("subject_last", "last"), "prefixes": Nested(PrefixConfig.SETTABLE),
        "chat_context": Flag(), "v_steps": Integer(0, 100), "v_lr": Number(1e-4, 10.0),
        "v_optimizer": Choice("adam", "gradient"), "v_chunk": Integer(1, 256),
        "v_weight_decay": Number(0.0, 1.0, optional=True),
        "clamp_norm": Number(0.0, 100.0, optional=True), "kl_factor": Number(0.0, 10.0, optional=True),
        "after_kl": Number(0.0, 100.0, optional=True), "after_tokens": Integer(1, 8),
        "v_stop_nll": Number(0.0, 10.0), "v_shrink_checks": Integer(0, 16),
        "cov_weight": Number(0.0, 1e6, optional=True), "preserve": Nested(PreserveConfig.SETTABLE),
        "refine_passes": Integer(0, 8), "refine_tol": Number(0.0, 1.0),
    }

    def __post_init__(self) -> None:
        if self.position not in ("subject_last", "last"):
            raise ValueError(f"position must be 'subject_last' or 'last', got {self.position!r}")
        if self.v_optimizer not in ("adam", "gradient"):
            raise ValueError(f"v_optimizer must be 'adam' or 'gradient', got {self.v_optimizer!r}")
        if not self.layers:
            raise ValueError("layers must name at least one block")
        if self.v_chunk < 1 or self.after_tokens < 1:
            raise ValueError("v_chunk and after_tokens must be >= 1")
        if self.v_steps < 0 or self.v_shrink_checks < 0 or not (0 < self.v_lr < float("inf")):
            raise ValueError("v_steps and v_shrink_checks must be >= 0 and v_lr a finite number > 0")
        for name in ("v_weight_decay", "clamp_norm", "kl_factor", "after_kl"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, or None to turn it off")
        if self.kl_prompt.count("{}") != 1:
            raise ValueError(f"kl_prompt must hold one '{{}}' for the subject, got {self.kl_prompt!r}")
        if (self.cov_weight is not None and not self.cov_weight >= 0) or self.v_stop_nll < 0:
            raise ValueError("cov_weight (a number, or None for the key width) and v_stop_nll must be >= 0")
        if self.refine_passes < 0 or not (0 <= self.refine_tol <= 1):
            raise ValueError("refine_passes must be >= 0 and refine_tol in [0, 1]")


@dataclass(frozen=True)
class MEMITConfig(LocateConfig):
    """MEMIT (Meng et al. 2023): the same keys and values, no null space: covariance-weighted least squares."""

    preserve: PreserveConfig | None = preserve_field(None)


@dataclass(frozen=True)
class ROMEConfig(LocateConfig):
    """ROME (Meng et al. 2022): one block, each key inserted exactly with the smallest change in the
    corpus keys' norm (cov_weight 0: for one fact the rank-one update (v − Wk)(C⁻¹k)ᵀ / kᵀC⁻¹k)."""

    layers: tuple[int, ...] = (5,)
    cov_weight: float = 0.0
    preserve: PreserveConfig | None = preserve_field(None)
