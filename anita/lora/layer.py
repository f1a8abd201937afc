"""The LoRA layer: a drop-in linear that adds a trainable low-rank update to a frozen base linear.

References: Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language Models* (arXiv 2106.09685),
§4.1 (y = W x + (α/r)·B A x, A random, B zero); Kalajdzievski 2023, *A Rank Stabilization Scaling
Factor for Fine-Tuning with LoRA* (rsLoRA, arXiv 2312.03732), scale α/√r; Liu et al. 2024, *DoRA:
Weight-Decomposed Low-Rank Adaptation* (arXiv 2402.09353), Eq. 5 and §4.3. Numerics and parameter
names follow PEFT's `tuners/lora/layer.py` and `tuners/lora/dora.py`, so adapter files need no key
map (see `anita.lora.peft_format`); unlike PEFT, a layer holds exactly one adapter.

The base is an `nn.Linear` or anita's frozen 4-bit `anita.quant.Linear4bit`; the adapter keeps its
own dtype (fp32 or bf16), independent of the base's.

Shapes: B batch, T time, I input features, O output features, R LoRA rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anita.dtypes import ADAPTER_DTYPES, parse_dtype
from anita.errors import AnitaError, check_number
from anita.lora import lean
from anita.model.llama import PROJECTIONS
from anita.quant import Linear4bit

INITS = ("kaiming", "gaussian")


@dataclass
class LoraConfig:
    """What `apply_lora` builds; the field names follow PEFT's `LoraConfig` where they overlap."""

    r: int = 8  # R, the rank of the update
    alpha: float = 8.0  # PEFT's `lora_alpha`; the update is scaled by alpha/r (alpha/√r with rsLoRA)
    dropout: float = 0.0  # dropout on the adapter's input only; the base path never sees it
    # Names matched against the end of each module's dotted name ("q_proj" matches
    # "model.layers.3.self_attn.q_proj"), or "all-linear": every linear except lm_head, as PEFT.
    target_modules: tuple[str, ...] | str = PROJECTIONS
    use_rslora: bool = False  # scale alpha/√r: keeps the update's size stable as r grows (rsLoRA)
    use_dora: bool = False  # weight-decomposed LoRA: learn a per-row magnitude too (DoRA)
    init: str = "kaiming"  # A's init: PEFT's default Kaiming-uniform, or "gaussian" N(0, 1/r²)
    dtype: torch.dtype | str = torch.float32  # adapter weights: float32 or bfloat16

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise AnitaError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        check_number("LoraConfig.alpha", self.alpha, 0, low_open=True)  # NaN or inf: every merged weight NaN
        check_number("LoraConfig.dropout", self.dropout, 0, 1, high_open=True)
        if self.init not in INITS:
            raise AnitaError(f"LoraConfig.init must be one of {', '.join(INITS)}, got {self.init!r}")
        self.dtype = parse_dtype(self.dtype, ADAPTER_DTYPES, "LoraConfig.dtype (adapter weights)")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                raise AnitaError(f"LoraConfig.target_modules: expected a list of module names or "
                                 f"'all-linear', got the string {targets!r}")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise AnitaError(f"LoraConfig.target_modules: expected a non-empty list of module names, got {targets!r}")
        else:
            self.target_modules = tuple(targets)

    @property
    def scale(self) -> float:
        """The factor on B·A: alpha/r (Hu et al. §4.1), or alpha/√r with rsLoRA (Kalajdzievski, Thm 3.2)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def is_base_linear(module: nn.Module) -> bool:
    """A linear LoRA can wrap: `nn.Linear` or anita's 4-bit `Linear4bit` (not one already wrapped)."""
    return isinstance(module, (nn.Linear, Linear4bit))


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base's weight (O, I) as a dense fp32 tensor: as stored, or dequantized from 4 bits."""
    return base.dequantize(torch.float32) if isinstance(base, Linear4bit) else base.weight.float()


def module_device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()))
    return tensor.device


class LoraLinear(nn.Module):
    """`y = base(x) + scale · B(A(dropout(x)))`, with the base frozen and A (R, I), B (O, R) trained.

    With DoRA (Liu et al. Eq. 5) the adapted weight W' = W + scale·B·A is split into a direction,
    normalised per output row, and a learned magnitude m (O,): y = m / ||W'||_row · W' x. The
    norm is treated as a constant in backward (DoRA §4.3; PEFT does the same).
    """

    # The one switch of the shortcut: plain LoRA's sum as `anita.lora.lean`'s single autograd node (the
    # same numbers, less memory). Set `LoraLinear.lean = False` (or `layer.lean`) for the paper's path.
    lean = True

    def __init__(self, base: nn.Module, config: LoraConfig):
        super().__init__()
        if not is_base_linear(base):
            raise AnitaError(f"LoRA wraps nn.Linear or anita.quant.Linear4bit, got {type(base).__name__}")
        self.base_layer = base
        self.config = config
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scale = config.scale
        self.disabled = False  # True: forward is exactly the base layer (DPO's reference model)
        device, R = module_device(base), config.r
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, R, bias=False, device=device, dtype=config.dtype)
        self.lora_B = nn.Linear(R, self.out_features, bias=False, device=device, dtype=config.dtype)
        self.lora_magnitude_vector = None
        self.reset_lora_parameters()
        if config.use_dora:
            # m starts at the row norms of the adapted weight, so the layer starts equal to the base.
            self.lora_magnitude_vector = nn.Parameter(self.dora_norm(self.adapted_weight()).to(config.dtype))
        self.train(base.training)  # a new module starts in training mode; follow the model's mode

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A random (Kaiming-uniform with a=√5 as nn.Linear and PEFT, or N(0, 1/r²)); B zero.

        B = 0 makes B·A = 0: the wrapped model starts exactly equal to the base model, so training
        begins from the pretrained function and DPO's step-0 reference equals the policy. A must
        then be random, or B's gradient (which is ∝ A x) would be zero too and nothing would learn.
        """
        if self.config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / self.config.r)
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scale · B·A as an fp32 (O, I) matrix: what LoRA adds to the base weight."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # (O, R) @ (R, I)

    @torch.no_grad()
    def adapted_weight(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """W + scale·B·A in fp32 (O, I), no gradient; `w` is the dense base weight if the caller has it."""
        return (dense_weight(self.base_layer) if w is None else w) + self.delta_weight()

    @staticmethod
    @torch.no_grad()
    def dora_norm(adapted: torch.Tensor) -> torch.Tensor:
        """DoRA's per-row norm ||W + scale·B·A||_row (O,) of the adapted weight (O, I); a constant for
        backward (DoRA §4.3)."""
        return adapted.norm(dim=1)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The single fp32 matrix (O, I) this layer computes: W + scale·B·A, times m/||·||_row with DoRA."""
        adapted = self.adapted_weight()
        if self.lora_magnitude_vector is None:
            return adapted
        return (self.lora_magnitude_vector.float() / self.dora_norm(adapted))[:, None] * adapted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + scale · B(A(dropout(x))) (Hu et al. §4.1): x (B, T, I) -> y (B, T, O).

        `update` is the second term. Where `lean.applies` (plain LoRA, with the switch `lean` on, the
        default), the same sum comes from `anita.lora.lean`: one autograd node, less memory, held equal
        to this line by tests/lora/test_lean.py."""
        if self.disabled:
            return self.base_layer(x)
        if lean.applies(self):
            return lean.forward(self, x)
        y = self.base_layer(x)
        return y + self.update(x, y)  # base(x) + scale · B(A(dropout(x))), the update in y's dtype

    def add_adapter(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + the update, where y = base(x) (B, T, O) was computed by the caller (a fused matmul of
        several frozen bases: `anita.model.fused`)."""
        if self.disabled:
            return y
        if lean.applies(self):
            return y + lean.lora_delta(x, self, y.dtype)
        return y + self.update(x, y)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """scale · B(A(dropout(x))) in y's dtype (B, T, O), computed in the adapter's dtype; with DoRA
        what its rescaling adds to y = base(x) (`_dora_extra`)."""
        xa = self.lora_dropout(x.to(self.lora_A.weight.dtype))  # (B, T, I) in the adapter's dtype
        lora = self.scale * self.lora_B(self.lora_A(xa))  # (B, T, R) -> (B, T, O)
        if self.lora_magnitude_vector is not None:
            lora = self._dora_extra(xa, y, lora)
        return lora.to(y.dtype)

    def _dora_extra(self, xa, y, lora) -> torch.Tensor:
        """What DoRA adds to base(x): (m/n - 1)·W x + (m/n)·scale·B A x, n = ||W + scale·BA||_row.

        Without dropout this makes y = (m/n)·(W + scale·BA) x. With dropout active the W x of the
        correction uses the dropped-out input, as PEFT's `DoraLinearLayer.forward` does.
        """
        w = dense_weight(self.base_layer)
        factor = self.lora_magnitude_vector / self.dora_norm(self.adapted_weight(w))  # (O,)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            base = F.linear(xa, w.to(xa.dtype))  # (B, T, O), W applied to the dropped-out input
        else:
            bias = getattr(self.base_layer, "bias", None)
            base = y if bias is None else y - bias
        return (factor - 1) * base + factor * lora

    def extra_repr(self) -> str:
        c = self.config
        return (f"r={c.r}, alpha={c.alpha}, scale={self.scale:.4g}, dropout={c.dropout}, "
                f"dora={c.use_dora}, dtype={c.dtype}, disabled={self.disabled}")
