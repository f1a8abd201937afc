"""The DPO step for the shared training loop: one forward of the concatenated [chosen; rejected]
batch, chunked sequence log-probs, the reference's log-probs, a loss of `anita.dpo.loss`, and
TRL's metrics.

    step(model, batch) -> (Σ_pairs loss, B, metrics)          (the contract of anita.train.loop)
      ref_chosen, ref_rejected = reference.logps(model, batch)  first: reference (b) swaps weights
      hidden = model.hidden_states([prompt+chosen; prompt+rejected])           [2B, T, D]
      log π(y|x) = Σ over answer tokens of log_softmax(hidden · Wᵀ)[label]      chunked, fp32
      losses, r_w, r_l = dpo_loss(policy, reference, β, loss_type, ...)        per pair
      + α · NLL(chosen) (RPO, Pang et al. 2024, arXiv 2404.19733), if --rpo-alpha

The log-probs come from `anita.dpo.logps` (Mitchell's `concatenated_forward`); the metric
definitions are TRL 1.16's `DPOTrainer._compute_loss`:
  rewards/chosen, rewards/rejected   mean of β (log πθ − log π_ref) over the pairs
  rewards/accuracies                 fraction of pairs with r_w > r_l
  rewards/margins                    mean of r_w − r_l
  logps/chosen, logps/rejected       mean summed log-prob of the answers
  logits/chosen, logits/rejected     mean over the batch's answer tokens of the mean (over V) logit

Shapes: B batch (pairs), T time, D model dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

from anita.dpo.logps import PairLogps, concatenated_logps
from anita.dpo.loss import DISCOPOP_TAU, check_loss_args, dpo_loss, rpo_nll
from anita.errors import AnitaError
from anita.model.logprobs import DEFAULT_CHUNK_SIZE

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")


@dataclass(frozen=True)
class DPOSettings:
    """The knobs of the DPO objective (the rest of a run is `anita.train.config.TrainConfig`)."""

    beta: float = 0.1  # β: strength of the KL tie to the reference (Rafailov et al. Eq. 3); the recipe's 0.1
    loss_type: str = "sigmoid"  # one of anita.dpo.loss.LOSS_TYPES; DPO itself is "sigmoid"
    label_smoothing: float = 0.0  # ε for cDPO / robust / exo_pair / aot
    discopop_tau: float = DISCOPOP_TAU  # τ of discopop
    rpo_alpha: float | None = None  # weight of the chosen answers' NLL (RPO); None = no NLL term
    chunk_size: int = DEFAULT_CHUNK_SIZE  # tokens per chunk of the output head

    def __post_init__(self):
        try:
            check_loss_args(self.loss_type, self.beta, self.label_smoothing, self.discopop_tau)
        except AnitaError as e:
            raise AnitaError(f"DPOSettings: {str(e).removeprefix('dpo_loss: ')}") from None
        if self.rpo_alpha is not None and not self.rpo_alpha >= 0:
            raise AnitaError(f"DPO: rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise AnitaError(f"DPO: chunk_size must be a positive integer, got {self.chunk_size!r}")


def preference_metrics(out: PairLogps, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """TRL's DPO metrics of one batch (means over its B pairs; see the module docstring)."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": out.chosen.detach().mean().item(),
        "logps/rejected": out.rejected.detach().mean().item(),
        "logits/chosen": out.chosen_mean_logit,
        "logits/rejected": out.rejected_mean_logit,
    }


def dpo_step(model, batch: dict, settings: DPOSettings, reference) -> tuple[torch.Tensor, int, dict]:
    """The DPO loss of one batch, summed over its B pairs, B, and the batch's metrics.

    `reference` is one of `anita.dpo.reference`'s (it gives the reference log-probs, or None, None
    for the reference-free mode). It runs before the policy forward: the frozen-adapter reference
    swaps adapter weights in and out, which must not happen while autograd holds them.
    """
    ref_chosen, ref_rejected = reference.logps(model, batch, settings.chunk_size)  # [B] each, or None
    out = concatenated_logps(model, batch, settings.chunk_size)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        out.chosen, out.rejected, ref_chosen, ref_rejected, beta=settings.beta, loss_type=settings.loss_type,
        label_smoothing=settings.label_smoothing, chosen_lengths=out.chosen_lengths,
        rejected_lengths=out.rejected_lengths, discopop_tau=settings.discopop_tau)  # [B] each
    B = losses.shape[0]
    loss_sum = losses.sum()
    metrics = preference_metrics(out, chosen_rewards, rejected_rewards)
    if settings.rpo_alpha is not None:
        # TRL's "sft" term is a batch mean over chosen tokens; × B so the loop's division by B keeps it a mean
        nll = rpo_nll(out.chosen_token_logps, out.chosen_scored)
        loss_sum = loss_sum + settings.rpo_alpha * B * nll
        metrics["nll_loss"] = nll.item()
    return loss_sum, B, metrics


class DPOObjective:
    """`loss_fn(model, batch)` for `anita.train.loop.train`: `dpo_step` with fixed settings and reference."""

    def __init__(self, settings: DPOSettings, reference):
        self.settings, self.reference = settings, reference

    def __call__(self, model, batch: dict):
        return dpo_step(model, batch, self.settings, self.reference)


# ------------------------------------------------------------------------------- plotting
def plot_preference_metrics(records: list[dict], path) -> None:
    """A PNG of the DPO curves beside the loop's: rewards, margins, accuracies, log-probs, train and held-out."""
    train = [r for r in records if "rewards/margins" in r]
    evals = [r for r in records if "eval_rewards/margins" in r]
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    panels = [(("rewards/chosen", "rewards/rejected"), "rewards (β · log-ratio)"),
              (("rewards/margins",), "reward margin"), (("rewards/accuracies",), "reward accuracy"),
              (("logps/chosen", "logps/rejected"), "answer log-prob")]
    for ax, (keys, title) in zip(axes, panels):
        for j, key in enumerate(keys):  # one colour per quantity: train solid, held-out dashed with dots
            ax.plot([r["step"] for r in train], [r[key] for r in train], f"C{j}-", label=f"train {key.split('/')[1]}")
            if evals and f"eval_{key}" in evals[0]:
                ax.plot([r["step"] for r in evals], [r[f"eval_{key}"] for r in evals], f"C{j}o--",
                        label=f"held-out {key.split('/')[1]}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    fig.suptitle("train: each point is one step's batch of pairs (noisy); held-out: the whole held-out set",
                 fontsize="small")
    fig.savefig(path, dpi=100)
