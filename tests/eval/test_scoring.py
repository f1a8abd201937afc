"""anita/eval/scoring.py: the shared-context scores against a plain full forward, a LoRA output
head, and a bf16 model."""

import copy

import torch

from anita.eval.scoring import pad_right, score_continuations, scores
from anita.lora import LoraConfig, apply_lora, lora_layers, merge_lora
from anita.model.logprobs import plain_token_logps
from tests.eval.tiny import VOCAB_SIZE, tiny_mc_model

CONTEXT = [5, 17, 99, 3, 250, 42]
CONTINUATIONS = [[7], [8, 9, 10], [11, 12]]


def plain_scores(model, context, continuations) -> list[float]:
    """One full forward of context + continuation[:-1] per continuation, the head and log-softmax
    in fp32 (`plain_token_logps`): the harness's recipe with anita's dtype policy."""
    scores = []
    for cont in continuations:
        ids = torch.tensor([context + cont[:-1]])
        labels = torch.full_like(ids, -100)
        labels[0, len(context) - 1:] = torch.tensor(cont)
        with torch.no_grad():
            hidden = model.hidden_states(ids)
            scores.append(plain_token_logps(hidden, model.lm_head.weight, labels).sum().item())
    return scores


def test_shared_context_equals_one_forward_per_continuation():
    model = tiny_mc_model()
    ours = [s.logprob for s in score_continuations(model, CONTEXT, CONTINUATIONS, batch_size=2)]
    for a, b in zip(ours, plain_scores(model, CONTEXT, CONTINUATIONS)):
        assert abs(a - b) < 1e-5


def test_lora_on_the_output_head_is_scored_through_its_merged_weight():
    """An adapter may target lm_head (untied): scoring it equals scoring the merged model."""
    model = tiny_mc_model()
    apply_lora(model, LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "lm_head")))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.3)
    model.eval()
    merged = merge_lora(copy.deepcopy(model))
    ours = [s.logprob for s in score_continuations(model, CONTEXT, CONTINUATIONS)]
    want = plain_scores(merged, CONTEXT, CONTINUATIONS)
    assert max(abs(a - b) for a, b in zip(ours, want)) < 1e-4
    assert max(abs(a - b) for a, b in zip(ours, plain_scores(tiny_mc_model(), CONTEXT, CONTINUATIONS))) > 1e-2


def test_bf16_model_head_and_log_softmax_run_in_fp32():
    """For a bf16 model the hidden states are bf16 but the head and log-softmax are fp32: on the same
    hidden states the scores equal the plain fp32 computation (a bf16 head is 1e-4 to 4e-4 nats off
    here), and the scores stay within 0.005 nats per token of the fp32 model's (measured: 6e-4 per
    token on this model). The same hidden states: the shared-context path's KV-cache call shape
    rounds its bf16 states differently from one full forward (up to 1e-3 nats apart on an AVX2 CPU)."""
    fp32 = tiny_mc_model()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    targets = pad_right(CONTINUATIONS, "cpu")  # (C, T)
    ids = torch.cat([torch.tensor([CONTEXT]).expand(len(CONTINUATIONS), -1), targets[:, :-1].clamp(min=0)], 1)
    with torch.no_grad():
        hidden = bf16.hidden_states(ids)[:, len(CONTEXT) - 1:]  # (C, T, D) in bf16, predicting each target
    labels = torch.cat([torch.full((len(CONTINUATIONS), len(CONTEXT) - 1), -100), targets], 1)[:, len(CONTEXT) - 1:]
    want = plain_token_logps(hidden, bf16.lm_head.weight, labels).sum(-1)  # fp32 head
    for got, expected in zip(scores(bf16, hidden, targets, greedy=False), want.tolist()):
        assert abs(got.logprob - expected) < 1e-5
    ours = [s.logprob for s in score_continuations(bf16, CONTEXT, CONTINUATIONS)]
    for a, b, cont in zip(ours, plain_scores(fp32, CONTEXT, CONTINUATIONS), CONTINUATIONS):
        assert abs(a - b) < 0.005 * len(cont)
    assert VOCAB_SIZE > max(max(c) for c in CONTINUATIONS)
