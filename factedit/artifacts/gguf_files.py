"""GGUF names and files for the GGUF exports (gguf_export.py): which GGUF architecture and tensor name an
HF model's MLP matrix has, the base GGUF opened and checked against the model, and writing a GGUF file
atomically (a copy of a base with some tensors replaced, or every tensor dequantized to F32).

The `gguf` package (llama.cpp's gguf-py) reads and writes; gguf_export.py's docstring says what the
exports contain and why.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError, InvalidDeltaError, ModelMismatchError, UnsupportedModelError
from ..core.record import EditRecord
from ..model.loading import DEFAULT_MODEL_ID, default_gguf_path
from ..model.specs import mlp_param_names, num_layers, spec_for, weight_layout

__all__ = [
    "ARTIFACT_KEY",
    "BaseGGUF",
    "base_gguf_for",
    "copy_gguf",
    "encode",
    "export_gguf_f32",
    "gguf_architecture",
    "gguf_tensor_name",
    "new_gguf_file",
    "out_in",
    "tensor_names",
    "write_gguf",
]

ARTIFACT_KEY = "factedit.artifact"  # metadata key holding the JSON that describes the artifact

# config.model_type -> the GGUF architecture llama.cpp's convert_hf_to_gguf.py writes for it (Mistral
# and Llama-style SmolLM are written as "llama"). Used when no base GGUF is given; a base GGUF's own
# general.architecture always wins.
GGUF_ARCHITECTURES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "gpt_neox": "gptneox",
    "gptj": "gptj", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3",
}



# --- names ------------------------------------------------------------------------------------------
def gguf_architecture(model: nn.Module) -> str:
    """The GGUF architecture name llama.cpp's converter gives this model's type; refused when none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = GGUF_ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"no GGUF architecture known for model type {model_type!r}; GGUF export supports "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    return arch


def _arch_enum(arch: str) -> Any:
    import gguf

    for value, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return value
    raise UnsupportedModelError(f"the gguf package knows no architecture {arch!r}")


def gguf_tensor_name(model: nn.Module, name: str, arch: str) -> str:
    """The GGUF tensor name of the MLP matrix `name` ("model.layers.8.mlp.down_proj.weight" ->
    "blk.8.ffn_down.weight"). Refused for a parameter that is not an MLP matrix (attention weights are
    permuted by llama.cpp's converters, embeddings and norms are not LoRA targets here) or that gguf-py's
    tensor map does not name for `arch`."""
    import gguf

    spec = spec_for(model)
    mlp = set(mlp_param_names(model, range(num_layers(model)), spec.roles))
    if name not in mlp:
        raise InvalidDeltaError(
            f"{name!r} is not an MLP matrix of this {spec.name!r} model; GGUF export covers the MLP matrices "
            f"({', '.join(spec.mlp_modules.values())}) only: llama.cpp permutes attention Q/K rows when it "
            "converts a model, and embeddings, norms and added modules have no GGUF LoRA form here"
        )
    mapped = gguf.get_tensor_name_map(_arch_enum(arch), num_layers(model)).get_name(name, try_suffixes=(".weight",))
    if mapped is None:
        raise UnsupportedModelError(f"gguf's tensor map for architecture {arch!r} has no name for {name!r}")
    return mapped


def base_gguf_for(records: Sequence[EditRecord], base: str | os.PathLike | None) -> Path | None:
    """The base GGUF to use: `base` when given, the default model's GGUF (the file factedit loads the
    default model from) for edits made on it, else None."""
    if base is not None:
        path = Path(base)
        if not path.is_file():
            raise ConfigError(f"base GGUF {path} does not exist")
        return path
    if records and records[0].model_id == DEFAULT_MODEL_ID:
        return default_gguf_path()
    return None


# --- the base GGUF ----------------------------------------------------------------------------------
class BaseGGUF:
    """A base GGUF opened with gguf-py's reader and checked to be a model."""

    def __init__(self, path: Path) -> None:
        import gguf

        try:
            self.reader = gguf.GGUFReader(path, "r")
        except (ValueError, OSError) as exc:
            raise ConfigError(f"cannot read base GGUF {path}: {exc}") from None
        self.path = path
        if self.reader.endianess != gguf.GGUFEndian.LITTLE:
            raise ConfigError(f"base GGUF {path} is big-endian; factedit writes little-endian GGUF only")
        kind = self.string("general.type") or "model"
        if kind != "model":
            raise ConfigError(f"{path} is a GGUF {kind!r}, not a model: give the base model's GGUF")
        self.arch = self.string("general.architecture")
        if not self.arch:
            raise ConfigError(f"base GGUF {path} has no general.architecture")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def string(self, key: str) -> str | None:
        f = self.reader.get_field(key)
        return None if f is None else str(f.contents())

    def check(self, model: nn.Module, names: Mapping[str, str], base_weights: Mapping[str, torch.Tensor] | None,
              expected_arch: str) -> None:
        """Every edited tensor is in the base with the model's shape (and, given the Editor's base weights,
        its values); the architecture is the one the model converts to."""
        if self.arch != expected_arch:
            raise ModelMismatchError(
                f"base GGUF {self.path} is a {self.arch!r} model; this model converts to {expected_arch!r}"
            )
        params = dict(model.named_parameters())
        for name, tname in names.items():
            tensor = self.tensors.get(tname)
            if tensor is None:
                raise ModelMismatchError(f"base GGUF {self.path} has no tensor {tname!r} (for {name}): another model")
            weight = out_in(model, name, params[name].detach())
            ne = tuple(int(n) for n in tensor.shape)  # GGUF order: (in, out)
            if ne != (weight.shape[1], weight.shape[0]):
                raise ModelMismatchError(
                    f"base GGUF {self.path}: {tname} has ne {ne}, this model's {name} needs "
                    f"{(weight.shape[1], weight.shape[0])}: another model"
                )
            if base_weights is not None and name in base_weights:
                values = self.dequantized(tname)
                if values is None:
                    continue  # a type gguf-py cannot dequantize: names and shapes were checked
                base = out_in(model, name, base_weights[name].detach().float().cpu())
                scale = float(base.abs().max()) or 1.0
                if values.shape != base.shape or float((values - base).abs().max()) > 1e-5 * scale:
                    raise ModelMismatchError(
                        f"base GGUF {self.path}: {tname} dequantized differs from the weights of {name} these "
                        "edits were made on: the GGUF is another checkpoint of this model (give the GGUF the "
                        "model was loaded from)"
                    )

    def dequantized(self, tname: str) -> torch.Tensor | None:
        """The tensor as float32 (out, in), or None where gguf-py cannot dequantize its type."""
        import gguf

        tensor = self.tensors[tname]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            return None
        return torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy


def out_in(model: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """A weight in (out, in) order, GGUF's numpy order for a matrix (GPT-2's Conv1D is stored (in, out))."""
    return weight.T if weight_layout(model, name) == "in_out" else weight


def tensor_names(model: nn.Module, names: Sequence[str], arch: str) -> dict[str, str]:
    return {name: gguf_tensor_name(model, name, arch) for name in names}


# --- files ------------------------------------------------------------------------------------------
def new_gguf_file(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new file name")
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"{out}: a GGUF file name must end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def write_gguf(out: Path, fill: Any) -> None:
    """Write a GGUF to a temporary name next to `out`, then rename: a failure leaves no partial file."""
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        writer = fill(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def encode(values: np.ndarray, qtype: Any) -> np.ndarray:
    """(out, in) float32 values in GGUF type `qtype` (F32/F16 as float arrays, others as quantized bytes)."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if values.shape[-1] % block:
        raise ConfigError(f"rows of {values.shape[-1]} values do not split into {qtype.name} blocks of {block}")
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        raise ConfigError(
            f"the gguf package cannot quantize to {qtype.name}; export the edited tensors as f32, f16 or q8_0"
        ) from None


def export_gguf_f32(base: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The base GGUF with every tensor dequantized to F32 and its metadata as it is: the unedited weights
    factedit computes with, for llama.cpp (a GGUF LoRA adapter applies to it as to the quantized base). llama.cpp
    then computes in float32, without the 8-bit activations its quantized matrix products use."""
    opened = BaseGGUF(Path(base))
    out = new_gguf_file(path)
    copy_gguf(opened, opened.arch, out, {}, {}, None, all_f32=True)
    return out


def copy_gguf(opened: BaseGGUF, arch: str, out: Path, replaced: Mapping[str, np.ndarray], types: Mapping[str, str],
               artifact: str | None, *, all_f32: bool) -> int:
    """Write `opened` to `out` with `replaced` tensors (of `types`), the others as they are or, with `all_f32`,
    dequantized to F32; every metadata key copied (general.file_type becomes ALL_F32 with `all_f32`). Returns
    how many tensors were copied byte for byte."""
    import gguf

    skip = {"general.architecture"}  # the writer writes it; GGUF.* are the header, not metadata
    if all_f32:
        skip.add(gguf.Keys.General.FILE_TYPE)
    f32 = gguf.GGMLQuantizationType.F32
    copied = sum(t.name not in replaced and (not all_f32 or t.tensor_type == f32) for t in opened.reader.tensors)

    def fill(tmp: Path) -> Any:
        writer = gguf.GGUFWriter(tmp, arch)
        for f in opened.reader.fields.values():
            if f.name.startswith("GGUF.") or f.name in skip or f.name == ARTIFACT_KEY:
                continue
            if f.name == gguf.Keys.General.ALIGNMENT:
                writer.data_alignment = int(f.contents())
            value_type = f.types[0]
            sub_type = f.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), value_type, sub_type=sub_type)
        if all_f32:
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        if artifact is not None:
            writer.add_string(ARTIFACT_KEY, artifact)
        for t in opened.reader.tensors:
            if t.name in replaced:
                writer.add_tensor(t.name, replaced[t.name], raw_dtype=gguf.GGMLQuantizationType[types[t.name]])
            elif all_f32 and t.tensor_type != f32:
                values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                writer.add_tensor(t.name, values, raw_dtype=f32)
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        return writer

    write_gguf(out, fill)
    return copied
