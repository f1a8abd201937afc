"""The DPO step for the shared training loop: one forward of the concatenated [chosen; rejected]
batch, chunked sequence log-probs, the reference's log-probs, a loss of `anita.dpo.loss`, and
TRL's metrics.

    step(model, batch) -> (Σ_pairs loss, B, metrics)          (the contract of anita.train.loop)
      ref_chosen, ref_rejected = reference.logps(model, batch)  first: reference (b) swaps weights
      hidden = model.hidden_states([prompt+chosen; prompt+rejected])           [2B, T, D]
      log π(y|x) = Σ over answer tokens of log_softmax(hidden · Wᵀ)[label]      chunked, fp32
      losses, r_w, r_l = dpo_loss(policy, reference, β, loss_type, ...)        per pair
      + α · NLL(chosen) (RPO, Pang et al. 2024, arXiv 2404.19733), if --rpo-alpha

ORPO and SimPO (`anita.dpo.beyond_dpo`) use the same forward with no reference pass at all, on
mean per-token log-probs (Σ / |y|); ORPO adds its NLL term L_SFT (weight --rpo-alpha, 1 by default).
KTO (`kto_step`) reads unpaired batches (`anita.dpo.unpaired`): B examples and their B mismatched
pairs; the reference scores both, the policy the examples with gradients and the mismatched pairs
without (they only estimate the reference point z₀).

The log-probs come from `anita.dpo.logps` (Mitchell's `concatenated_forward`); the metric
definitions are TRL 1.16's `DPOTrainer._compute_loss`:
  rewards/chosen, rewards/rejected   mean of β (log πθ − log π_ref) over the pairs
  rewards/accuracies                 fraction of pairs with r_w > r_l
  rewards/margins                    mean of r_w − r_l
  logps/chosen, logps/rejected       mean summed log-prob of the answers
  logits/chosen, logits/rejected     mean over the batch's answer tokens of the mean (over V) logit
and, as TRL's ORPOTrainer, CPOTrainer and KTOTrainer log them:
  ORPO, SimPO                        the same names, rewards β·l and logps/* the mean per-token log-probs l
  ORPO                               nll_loss, log_odds_ratio (mean log σ(log OR)), log_odds_chosen (mean log OR)
  KTO                                kl (z₀); rewards/chosen, logps/chosen, logits/chosen over the desirable
                                     examples, */rejected over the undesirable ones, rewards/margins their
                                     gap in batches that hold both; no accuracies (nothing is paired)

Shapes: B batch (pairs), T time, D model dim, V vocab.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

import torch.nn.functional as F

from anita.dpo.beyond_dpo import REFERENCE_FREE, kto_kl, kto_loss, orpo_log_odds_ratio, orpo_loss, simpo_loss
from anita.dpo.config import DPOSettings
from anita.dpo.logps import PairLogps, RowLogps, completion_logps, concatenated_logps
from anita.dpo.loss import dpo_loss, rpo_nll
from anita.errors import AnitaError

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")


def preference_metrics(out: PairLogps, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       chosen_logps: torch.Tensor | None = None, rejected_logps: torch.Tensor | None = None) -> dict:
    """TRL's DPO metrics of one batch (means over its B pairs; see the module docstring). The logged
    log-probs are the summed ones, or those given (ORPO and SimPO log the mean per-token ones)."""
    chosen_logps = out.chosen if chosen_logps is None else chosen_logps
    rejected_logps = out.rejected if rejected_logps is None else rejected_logps
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": chosen_logps.detach().mean().item(),
        "logps/rejected": rejected_logps.detach().mean().item(),
        "logits/chosen": out.chosen_mean_logit,
        "logits/rejected": out.rejected_mean_logit,
    }


def dpo_step(model, batch: dict, settings: DPOSettings, reference) -> tuple[torch.Tensor, int, dict]:
    """The DPO loss of one batch, summed over its B pairs, B, and the batch's metrics. `settings` were
    checked once, when built; the losses are called without checking them again (`validate=False`).

    `reference` is one of `anita.dpo.reference`'s (it gives the reference log-probs, or None, None
    for the reference-free mode). It runs before the policy forward: the frozen-adapter reference
    swaps adapter weights in and out, which must not happen while autograd holds them.
    """
    if settings.loss_type == "kto":
        return kto_step(model, batch, settings, reference)
    if settings.loss_type in REFERENCE_FREE:  # ORPO, SimPO: no reference pass at all
        out = concatenated_logps(model, batch, settings.chunk_size)
        losses, chosen_rewards, rejected_rewards, metrics = reference_free_loss(out, settings)  # [B] each
    else:
        ref_chosen, ref_rejected = reference.logps(model, batch, settings.chunk_size)  # [B] each, or None
        out = concatenated_logps(model, batch, settings.chunk_size)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            out.chosen, out.rejected, ref_chosen, ref_rejected, beta=settings.beta, loss_type=settings.loss_type,
            label_smoothing=settings.label_smoothing, chosen_lengths=out.chosen_lengths,
            rejected_lengths=out.rejected_lengths, discopop_tau=settings.discopop_tau, validate=False)  # [B] each
        metrics = preference_metrics(out, chosen_rewards, rejected_rewards)
    B = losses.shape[0]
    loss_sum = losses.sum()
    if settings.nll_weight is not None:
        # TRL's "sft" term is a batch mean over chosen tokens; × B so the loop's division by B keeps it a mean
        nll = rpo_nll(out.chosen_token_logps, out.chosen_scored)
        loss_sum = loss_sum + settings.nll_weight * B * nll
        metrics["nll_loss"] = nll.item()
    return loss_sum, B, metrics


def reference_free_loss(out: PairLogps, settings: DPOSettings):
    """ORPO or SimPO on the mean per-token log-probs l = Σ/|y| of a forward. -> (losses, r_w, r_l [B], metrics)"""
    chosen = out.chosen / out.chosen_lengths.clamp(min=1)  # [B] l_w
    rejected = out.rejected / out.rejected_lengths.clamp(min=1)  # [B] l_l
    if settings.loss_type == "orpo":
        losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, settings.beta, validate=False)
        log_odds = orpo_log_odds_ratio(chosen.detach().float(), rejected.detach().float())  # [B]
        extra = {"log_odds_ratio": F.logsigmoid(log_odds).mean().item(), "log_odds_chosen": log_odds.mean().item()}
    else:
        losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, settings.beta, settings.simpo_gamma,
                                                              settings.label_smoothing, validate=False)
        extra = {}
    metrics = preference_metrics(out, chosen_rewards, rejected_rewards, chosen, rejected)
    return losses, chosen_rewards, rejected_rewards, {**metrics, **extra}


def kto_step(model, batch: dict, settings: DPOSettings, reference) -> tuple[torch.Tensor, int, dict]:
    """The KTO loss of one unpaired batch (`anita.dpo.unpaired.collate_unpaired`), summed over its B
    examples, B, and TRL's KTO metrics. Rows 0..B-1 are the examples, rows B..2B-1 their mismatched pairs."""
    ref_matched, ref_mismatched = reference.logps(model, batch, settings.chunk_size)  # [B] each
    if ref_matched is None:
        raise AnitaError("KTO needs a reference model (its rewards are log-ratios): use --reference auto")
    B, desirable = batch["label"].shape[0], batch["label"].bool()  # [B]
    ids, mask = batch["input_ids"], batch["completion_mask"]  # [2B, T]
    matched = completion_logps(model, ids[:B], mask[:B], settings.chunk_size)  # [B], with gradients
    with torch.no_grad():  # the mismatched pairs only estimate z₀, which is detached
        mismatched = completion_logps(model, ids[B:], mask[B:], settings.chunk_size)  # [B]
    kl = kto_kl(mismatched.sums, ref_mismatched)  # z₀, scalar
    losses, chosen_rewards, rejected_rewards = kto_loss(
        matched.sums[desirable], matched.sums[~desirable], ref_matched[desirable], ref_matched[~desirable], kl,
        settings.beta, settings.desirable_weight, settings.undesirable_weight,
        validate=False)  # [B] (desirable first), [Bc], [Br]
    return losses.sum(), B, kto_metrics(matched, desirable, chosen_rewards, rejected_rewards, kl)


def kto_metrics(matched: RowLogps, desirable: torch.Tensor, chosen_rewards: torch.Tensor,
                rejected_rewards: torch.Tensor, kl: torch.Tensor) -> dict:
    """TRL's KTO metrics; each class mean weighted by the examples (or tokens) of that class in the batch."""
    def mean(x: torch.Tensor) -> float:
        return x.mean().item() if x.numel() else 0.0

    n_chosen, n_rejected = len(chosen_rewards), len(rejected_rewards)
    tokens = matched.lengths.float()  # [B]
    return {
        "kl": kl.item(),
        "rewards/chosen": (mean(chosen_rewards), n_chosen),
        "rewards/rejected": (mean(rejected_rewards), n_rejected),
        "rewards/margins": (mean(chosen_rewards) - mean(rejected_rewards), len(desirable) if n_chosen and n_rejected else 0),
        "logps/chosen": (mean(matched.sums[desirable].detach()), n_chosen),
        "logps/rejected": (mean(matched.sums[~desirable].detach()), n_rejected),
        "logits/chosen": (matched.logit_sums[desirable].sum().item() / max(tokens[desirable].sum().item(), 1.0),
                          tokens[desirable].sum().item()),
        "logits/rejected": (matched.logit_sums[~desirable].sum().item() / max(tokens[~desirable].sum().item(), 1.0),
                            tokens[~desirable].sum().item()),
    }


class DPOObjective:
    """`loss_fn(model, batch)` for `anita.train.loop.train`: `dpo_step` with fixed settings and reference."""

    def __init__(self, settings: DPOSettings, reference):
        self.settings, self.reference = settings, reference

    def __call__(self, model, batch: dict):
        return dpo_step(model, batch, self.settings, self.reference)


# ------------------------------------------------------------------------------- plotting
def plot_preference_metrics(records: list[dict], path) -> None:
    """A PNG of the DPO curves beside the loop's: rewards, margins, accuracies, log-probs, train and held-out."""
    train = [r for r in records if "rewards/chosen" in r]
    evals = [r for r in records if "eval_rewards/chosen" in r]
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    panels = [(("rewards/chosen", "rewards/rejected"), "rewards (β · log-ratio)"),
              (("rewards/margins",), "reward margin"), (("rewards/accuracies",), "reward accuracy"),
              (("logps/chosen", "logps/rejected"), "answer log-prob")]
    for ax, (keys, title) in zip(axes, panels):
        for j, key in enumerate(keys):  # one colour per quantity: train solid, held-out dashed with dots
            points = [(r["step"], r[key]) for r in train if key in r]  # KTO logs no accuracies
            if points:
                ax.plot(*zip(*points), f"C{j}-", label=f"train {key.split('/')[1]}")
            points = [(r["step"], r[f"eval_{key}"]) for r in evals if f"eval_{key}" in r]
            if points:
                ax.plot(*zip(*points), f"C{j}o--", label=f"held-out {key.split('/')[1]}")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle("train: each point is one step's batch (noisy); held-out: the whole held-out set", fontsize="small")
    fig.savefig(path, dpi=100)
