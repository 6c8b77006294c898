"""The fingerprint of a model's structure: what a freeze plan records about the model it was
resolved against, so that a plan file is never applied to another model without a word.

Two models have one fingerprint when they are the same architecture with the same layer count
and the same parameter names and shapes: a meta skeleton and the loaded model match, so do a
model and its DDP, DeepSpeed, FSDP1 or FSDP2 wrapping (the scan reads a wrapped model by its
original class, names and unsharded shapes); a Llama and a GPT-2 of four layers do not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from layerscope.errors import PlanError, StructureError
from layerscope.scan import ModelScan


@dataclass(frozen=True)
class ModelFingerprint:
    """Architecture, block count, and a digest of every parameter name with its shape.

    Attributes:
        architecture: the model's class name (``LlamaForCausalLM``), wrappers removed (as
            :attr:`ModelScan.model_type <layerscope.scan.ModelScan.model_type>`).
        num_layers: blocks in the main stack, or None without one.
        num_params: parameter names (every alias of a tied tensor).
        digest: the first 16 hex digits of the SHA-256 of the sorted ``name:shape`` lines.
    """

    architecture: str
    num_layers: int | None
    num_params: int
    digest: str

    @classmethod
    def of(cls, s: ModelScan) -> ModelFingerprint:
        """The fingerprint of a scanned model (a wrapped one is scanned as the model it wraps)."""
        lines = sorted(f"{p.name}:{','.join(map(str, p.shape))}" for p in s.params)
        try:
            layers: int | None = s.num_layers
        except StructureError:
            layers = None
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
        return cls(s.model_type, layers, len(lines), digest)

    def differences(self, other: ModelFingerprint) -> list[str]:
        """What differs from ``other``, in words (empty when they match)."""
        out = []
        if self.architecture != other.architecture:
            out.append(f"architecture {self.architecture} vs {other.architecture}")
        if self.num_layers != other.num_layers:
            out.append(f"{self.num_layers} vs {other.num_layers} layers")
        if self.num_params != other.num_params:
            out.append(f"{self.num_params} vs {other.num_params} parameter names")
        if self.digest != other.digest and not out:
            out.append("parameter names or shapes differ")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "num_layers": self.num_layers,
                "num_params": self.num_params, "digest": self.digest}

    @classmethod
    def from_dict(cls, data: object) -> ModelFingerprint:
        """Read :meth:`to_dict`'s output back, checking every field.

        Raises:
            PlanError: not a dict with those four fields of those types.
        """
        keys = ("architecture", "num_layers", "num_params", "digest")
        expected = "an object: architecture (str), num_layers (int or null), num_params (int), digest (str)"
        if not isinstance(data, dict) or set(data) != set(keys):
            raise PlanError(f"plan model fingerprint: expected {expected}, got {str(data)[:200]}")
        arch, layers, count, digest = (data[k] for k in keys)
        ok = (
            isinstance(arch, str)
            and (layers is None or (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0))
            and isinstance(count, int) and not isinstance(count, bool) and count >= 0
            and isinstance(digest, str)
        )
        if not ok:
            raise PlanError(f"plan model fingerprint: expected {expected}, got {str(data)[:200]}")
        return cls(arch, layers, count, digest)
