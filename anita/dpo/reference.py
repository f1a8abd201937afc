"""DPO's reference model π_ref, three ways that give the same numbers, and the reference-free mode.

DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) scores the policy against a frozen reference,
the model training starts from. With LoRA that model is already in memory:

(a) `AdaptersOff`: training a fresh adapter starts from the base, so π_ref is the policy with every
    LoRA layer switched off (`anita.lora.disable_lora`): no second copy of the model. This is
    the recipe's reference (docs/recipe.md) and TRL's for a PEFT model.
(b) `FrozenAdapter`: continuing from an SFT adapter, training starts from base + SFT adapter, so
    that is π_ref, not the bare base (using the bare base is a known pitfall: the rewards are then
    not 0 at step 0 and DPO also pulls the policy back towards the pre-SFT model). A copy of the
    adapter tensors taken at the start (small: only the adapter) is swapped in for the reference
    pass and the trained ones swapped back. TRL loads the adapter a second time as "ref" instead.
(c) `Precomputed`: the log-probs of (a) or (b), computed once over the data before training and
    stored in a safetensors file keyed by row index (TRL's `precompute_ref_log_probs`). The file
    carries fingerprints of the tokenized data and of the reference model, so a later run with the
    same data and model reads it instead of computing it again.

Every reference pass runs without gradients and with dropout off. At step 0 all three give the
policy's own log-probs, so every reward is 0 and the sigmoid loss is ln 2.

Shapes: B batch (pairs), N rows of a data set.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from anita.dpo.logps import concatenated_logps
from anita.errors import AnitaError
from anita.files import save_safetensors
from anita.lora import disable_lora, lora_parameters
from anita.runtime import eval_mode


@contextmanager
def _reference_pass(model):
    """No gradients, no dropout; the model's train/eval mode is restored afterwards."""
    with eval_mode(model), torch.no_grad():
        yield


def _split(out) -> tuple[torch.Tensor, torch.Tensor]:
    return out.chosen.detach(), out.rejected.detach()


class AdaptersOff:
    """(a) π_ref = the policy with its LoRA layers switched off, i.e. the base model."""

    kind = "adapters-off"

    def logps(self, model, batch: dict, chunk_size: int):
        with _reference_pass(model), disable_lora(model):
            return _split(concatenated_logps(model, batch, chunk_size))  # [B], [B]


class FrozenAdapter:
    """(b) π_ref = base + the adapter as it was when this object was made (the SFT adapter)."""

    kind = "adapter"

    def __init__(self, model):
        params = lora_parameters(model)
        if not params:
            raise AnitaError("reference 'adapter': the model has no LoRA layers; load the SFT adapter first")
        self.frozen = [p.detach().clone() for p in params]  # the SFT adapter, never trained

    @contextmanager
    def swapped_in(self, model):
        """Inside the `with`, the adapter holds the frozen copy; the trained values come back after.

        Under autocast, torch caches the low-precision copy of each parameter for the rest of the
        autocast region; an in-place swap would go unseen (the reference would silently equal the
        policy), so the cache is cleared on the way in and on the way out.
        """
        params = lora_parameters(model)
        with torch.no_grad():
            trained = [p.detach().clone() for p in params]
            for p, f in zip(params, self.frozen):
                p.copy_(f)
        torch.clear_autocast_cache()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(params, trained):
                    p.copy_(t)
            torch.clear_autocast_cache()

    def logps(self, model, batch: dict, chunk_size: int):
        with _reference_pass(model), self.swapped_in(model):
            return _split(concatenated_logps(model, batch, chunk_size))  # [B], [B]


class Precomputed:
    """(c) π_ref read from the batch: `PreferenceBatches` attaches the cached log-probs by row index."""

    kind = "precomputed"

    def logps(self, model, batch: dict, chunk_size: int):
        if "ref_chosen_logps" not in batch:
            raise AnitaError("reference 'precomputed': the batch carries no reference log-probs; "
                             "build the batches with the precomputed table (see precompute_reference)")
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]


class ReferenceFree:
    """No reference: log π_ref = 0 (SimPO-style objectives, Meng et al. 2024, arXiv 2405.14734)."""

    kind = "none"

    def logps(self, model, batch: dict, chunk_size: int):
        return None, None


# ----------------------------------------------------------------------------- precompute
def precompute_reference(model, batches, reference, chunk_size: int,
                         autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over `batches` (epoch 0 of a `PreferenceBatches`) -> (chosen [N], rejected [N]) fp32 on CPU.

    `reference` is `AdaptersOff` or `FrozenAdapter`; `autocast` the training run's autocast context
    factory (so the numbers are computed exactly as the live reference would compute them).
    """
    n = len(batches.pairs)
    chosen, rejected = torch.full((n,), float("nan")), torch.full((n,), float("nan"))  # [N] each
    device = model.device
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            c, r = reference.logps(model, batch, chunk_size)
        index = batch["index"].cpu()
        chosen[index], rejected[index] = c.float().cpu(), r.float().cpu()
    if torch.isnan(chosen).any() or torch.isnan(rejected).any():
        raise AnitaError("precompute_reference: the batches did not cover every row of the data set")
    return chosen, rejected


def model_fingerprint(model, include_adapter: bool) -> str:
    """sha256 over every tensor of the model's state (names, shapes, dtypes, bytes).

    The adapter's tensors count only for reference (b): with the adapters off, (a) is the base alone.
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if ".lora_" in name and not include_adapter:
            continue
        if not isinstance(t, torch.Tensor):  # a module's extra state, if any
            h.update(f"{name}|{t!r}|".encode())
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(data_fingerprint: str, model_fingerprint_: str, kind: str, precision: str,
              head_dtype: str = "fp32") -> dict[str, str]:
    """The metadata a cache file must match to be reused (the head's dtype rounds the log-probs too)."""
    return {"data": data_fingerprint, "model": model_fingerprint_, "reference": kind, "precision": precision,
            "head_dtype": head_dtype}


def read_cache(path, key: dict[str, str]):
    """(chosen [N], rejected [N]) from a cache file whose metadata equals `key`, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise AnitaError(f"{path}: cannot read the reference log-prob cache ({e}); delete it to recompute") from None
    if {k: meta.get(k) for k in key} != key:
        return None
    return tensors["chosen_logps"], tensors["rejected_logps"]


def write_cache(path, key: dict[str, str], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Write the table atomically (temporary name, then rename): a killed run never leaves half a cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"chosen_logps": chosen.contiguous(), "rejected_logps": rejected.contiguous()}
    save_safetensors(tensors, path, metadata={**key, "rows": str(len(chosen))})


def cached_reference(path, key: dict[str, str], compute) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """The table from `path` if its key matches, else `compute()` written there. -> (table, was_cached)"""
    table = read_cache(path, key)
    if table is not None:
        return table, True
    table = compute()
    write_cache(path, key, *table)
    return table, False
