"""Tests for the shared-prompt DPO layout (anita/dpo/data.py `collate_shared`, anita/dpo/logps.py
`shared_prompt_logps`) and DPO's token-budget batches, against the plain two-row layout as oracle.

One row [prompt; chosen; rejected] per pair (or several pairs packed in one row) must give the
log-probs of the two right-padded rows [prompt; chosen], [prompt; rejected]: within 1e-5 in fp32
for the sequence sums, the per-token values RPO reads and TRL's logit metrics, with the chunked
head at a chunk size that splits answers, for every paired loss type, with each reference mode
(adapters off, frozen adapter, precomputed tables, none), and for the gradients of the adapter.
The layout itself is checked against a hand-written expected row.
"""

import json

import pytest
import torch

from anita.dpo.beyond_dpo import ALL_LOSS_TYPES
from anita.dpo.data import (CHOSEN, PROMPT, REJECTED, PreferenceBatches, PreferenceData, PreferencePair,
                            collate_pairs, collate_shared, pair_lengths, read_preferences)
from anita.dpo.config import DPOConfig
from anita.dpo.logps import concatenated_logps, shared_prompt_logps, two_row_logps
from anita.dpo.reference import AdaptersOff, FrozenAdapter, Precomputed, ReferenceFree, precompute_reference
from anita.dpo.trainer import DPOSettings, dpo_step
from anita.errors import AnitaError
from anita.model.masks import Spans, segment_mask
from anita.lora import LoraConfig, apply_lora, lora_parameters
from tests.conftest import tiny_model
from tests.train.conftest import byte_tokenizer, tiny_run_model, write_jsonl  # noqa: F401 (fixtures)

V = 300
ATOL = 1e-5
# prompt, chosen, rejected lengths: answers of unequal lengths (padding in the two-row form), a
# one-token prompt, one-token answers
SHAPES = [(5, 3, 7), (9, 4, 2), (1, 6, 6), (4, 1, 1), (7, 5, 3)]
LAYOUTS = {"one pair per row": [[0], [1], [2], [3], [4]], "packed in two rows": [[0, 1], [2, 3, 4]],
           "one packed row": [[0, 1, 2, 3, 4]]}


def make_pairs(shapes=SHAPES, seed: int = 0) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(0, V, (n,), generator=g).tolist())

    return [PreferencePair(i + 1, ids(p), ids(c), ids(r)) for i, (p, c, r) in enumerate(shapes)]


def policy(checkpointing: bool = False, seed: int = 1):
    """A tiny fp32 Llama (GQA, RoPE) with a random, non-zero LoRA adapter: policy != base."""
    model = tiny_model("llama3", vocab_size=V).train()
    model.checkpointing = "full" if checkpointing else "off"
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def close(a, b, atol=ATOL):
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=atol, rtol=0)


GRAD_TOL = 1e-4  # fp32 gradients, relative to their largest entry (see grads_close)


def grads_close(a, b, tol=GRAD_TOL):
    """Gradients within `tol` of their scale. The shared prompt gets both answers' gradient in one
    backward instead of two, so fp32 accumulates in another order: measured up to 3e-5 of the largest
    entry on this random adapter; in fp64 (test_in_fp64_...) the same comparison gives 4e-8."""
    return torch.allclose(a, b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))


def test_collate_shared_lays_out_a_pair_as_written_by_hand():
    """Pairs (p=[11, 12], c=[21, 22], r=[31]) and (p=[13], c=[23], r=[32, 33]) packed in one row, plus a
    row with the first pair alone (padded with 0). source = the row index of the predicting token."""
    a, b = PreferencePair(1, (11, 12), (21, 22), (31,)), PreferencePair(2, (13,), (23,), (32, 33))
    batch = collate_shared([[0, 1], [0]], [a, b], pad_id=0)
    P, C, R = PROMPT, CHOSEN, REJECTED
    assert batch["input_ids"].tolist() == [[11, 12, 21, 22, 31, 13, 23, 32, 33], [11, 12, 21, 22, 31, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2], [0, 1, 2, 3, 2, 0, 0, 0, 0]]
    assert batch["segment"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 2, -1, -1, -1, -1]]
    assert batch["branch"].tolist() == [[P, P, C, C, R, P, C, R, R], [P, P, C, C, R, -1, -1, -1, -1]]
    assert batch["source"].tolist() == [[-1, -1, 1, 2, 1, -1, 5, 5, 7], [-1, -1, 1, 2, 1, -1, -1, -1, -1]]
    assert batch["spans"] == Spans((((0, 2, 4, 5), (5, 6, 7, 9)), ((0, 2, 4, 5),)))  # prompt, chosen, rejected ends
    assert torch.equal(batch["spans"].mask(9), segment_mask(batch["segment"], batch["branch"]))
    assert batch["index"].tolist() == [0, 1, 0] and batch["num_tokens"].item() == 14
    assert pair_lengths([a, b], shared_prompt=True) == [5, 4] and pair_lengths([a, b], shared_prompt=False) == [8, 6]


def test_pair_lengths_read_off_the_token_store_equal_those_of_the_pairs(tmp_path, byte_tokenizer):
    rows = [{"prompt": "ciao" * (i + 1), "chosen": "si" * (i + 1), "rejected": "no" * (3 - i)} for i in range(3)]
    view = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows), byte_tokenizer, max_length=64).pairs
    pairs = list(view)
    for shared in (True, False):
        want = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) if shared else
                2 * (len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))) for p in pairs]
        assert pair_lengths(view, shared) == pair_lengths(pairs, shared) == want


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk_size", [512, 3])
def test_shared_prompt_logps_equal_the_two_row_form(layout, chunk_size):
    """Sums, lengths, the chosen per-token table (RPO), the logit metrics and the adapter's
    gradients of one backward through both, fp32, with the head chunked at 512 and at 3 tokens."""
    pairs, rows = make_pairs(), LAYOUTS[layout]
    model = policy()
    results = []
    for batch in (collate_pairs(pairs, pad_id=0), collate_shared(rows, pairs, pad_id=0)):
        model.zero_grad()
        out = concatenated_logps(model, batch, chunk_size)
        (out.chosen.sum() * 0.7 - out.rejected.sum() * 0.3).backward()
        results.append((out, [p.grad.clone() for p in lora_parameters(model)]))
    (plain, plain_grads), (shared, shared_grads) = results
    assert close(plain.chosen, shared.chosen) and close(plain.rejected, shared.rejected)
    assert torch.equal(plain.chosen_lengths, shared.chosen_lengths)
    assert torch.equal(plain.rejected_lengths, shared.rejected_lengths)
    # the two-row table holds each chosen answer at its place in the row; the shared one from 0
    for b, (p, c, _) in enumerate(SHAPES):
        want = plain.chosen_token_logps[b][plain.chosen_scored[b]]
        assert close(want, shared.chosen_token_logps[b, :c]) and shared.chosen_scored[b].sum() == c
    assert close(plain.chosen_mean_logit, shared.chosen_mean_logit)
    assert close(plain.rejected_mean_logit, shared.rejected_mean_logit)
    assert all(grads_close(g1, g2) for g1, g2 in zip(plain_grads, shared_grads))


def test_the_bf16_head_reaches_both_layouts():
    """`model.head_dtype` (--head-dtype bf16) rounds the head's matmuls in the shared-prompt layout as in
    the two-row one: both agree with each other, and differ from the fp32 head."""
    pairs, model = make_pairs(), policy()
    with torch.no_grad():
        fp32 = concatenated_logps(model, collate_shared(LAYOUTS["one packed row"], pairs, pad_id=0))
        model.head_dtype = torch.bfloat16
        two_row = concatenated_logps(model, collate_pairs(pairs, pad_id=0))
        shared = concatenated_logps(model, collate_shared(LAYOUTS["one packed row"], pairs, pad_id=0))
    assert close(two_row.chosen, shared.chosen, atol=1e-4) and close(two_row.rejected, shared.rejected, atol=1e-4)
    assert not close(fp32.chosen, shared.chosen, atol=1e-4)


def test_in_fp64_the_two_layouts_are_the_same_math():
    """In fp64 the layouts agree to ~1e-16 in log-probs and ~1e-8 of scale in gradients (what is left
    is RMSNorm, which computes in fp32 whatever the input dtype): the same function, not an approximation."""
    pairs = make_pairs()
    model = policy().double()
    grads = []
    for batch in (collate_pairs(pairs, pad_id=0), collate_shared(LAYOUTS["one packed row"], pairs, pad_id=0)):
        model.zero_grad()
        out = concatenated_logps(model, batch, 4)
        (out.chosen.sum() - 0.5 * out.rejected.sum()).backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)] + [out.chosen.detach(), out.rejected.detach()])
    assert all(grads_close(a, b, tol=1e-6) for a, b in zip(grads[0][:-2], grads[1][:-2]))
    assert all(close(a, b, atol=1e-12) for a, b in zip(grads[0][-2:], grads[1][-2:]))


def test_shared_prompt_with_gradient_checkpointing():
    """Checkpointing recomputes each block with the same mask and positions: same values and gradients."""
    pairs, rows = make_pairs(), LAYOUTS["packed in two rows"]
    grads = []
    for checkpointing in (False, True):
        model = policy(checkpointing)
        out = shared_prompt_logps(model, collate_shared(rows, pairs, pad_id=0))
        (out.chosen - out.rejected).sum().backward()
        grads.append([p.grad for p in lora_parameters(model)])
    assert all(grads_close(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("loss_type", [t for t in ALL_LOSS_TYPES if t != "kto"])
def test_every_paired_loss_gives_the_same_loss_metrics_and_gradients(loss_type):
    """dpo_step on both layouts (adapters-off reference; none for ORPO and SimPO; RPO's NLL on for
    sigmoid, ORPO's own L_SFT): loss sum, count, every metric and the adapter's gradients."""
    pairs = make_pairs()
    rpo = 0.5 if loss_type == "sigmoid" else None
    smoothing = 0.1 if loss_type == "exo_pair" else 0.0  # exo_pair needs ε in (0, 1)
    settings = DPOSettings(beta=0.5, loss_type=loss_type, rpo_alpha=rpo, chunk_size=4, label_smoothing=smoothing)
    reference = ReferenceFree() if loss_type in ("orpo", "simpo") else AdaptersOff()
    model = policy()
    results = []
    for batch in (collate_pairs(pairs, pad_id=0), collate_shared(LAYOUTS["packed in two rows"], pairs, pad_id=0)):
        model.zero_grad()
        loss_sum, count, metrics = dpo_step(model, batch, settings, reference)
        loss_sum.backward()
        results.append((loss_sum.detach(), count, metrics, [p.grad.clone() for p in lora_parameters(model)]))
    (l1, n1, m1, g1), (l2, n2, m2, g2) = results
    # the loss sum in fp32, relative to its size (sppo_hard's squared terms sum to ~9: rounding ~1e-5 there)
    assert n1 == n2 == len(pairs) and close(l1, l2, atol=ATOL * max(1.0, abs(l2.item())))
    assert m1.keys() == m2.keys() and all(close(m1[k], m2[k]) for k in m1), (m1, m2)
    assert all(grads_close(a, b) for a, b in zip(g1, g2))


def test_every_reference_mode_gives_the_same_reference_logps():
    """Adapters off, the frozen adapter and tables precomputed over token-budget batches of either
    layout (pairs in another grouping than the two-row batches) all agree, keyed by pair index."""
    pairs = make_pairs()
    data = PreferenceData("toy.jsonl", pairs)
    model = policy()
    plain = PreferenceBatches(data, batch_size=2, pad_id=0, shuffle=False)
    packed = PreferenceBatches(data, batch_size=2, pad_id=0, shuffle=False, shared_prompt=True, packing=True,
                               max_tokens=30)
    for reference in (AdaptersOff(), FrozenAdapter(model)):
        want = precompute_reference(model, plain, reference, chunk_size=8)
        got = precompute_reference(model, packed, reference, chunk_size=8)
        assert close(want[0], got[0]) and close(want[1], got[1])
        batch = collate_shared([[0, 1], [2, 3, 4]], pairs, pad_id=0)
        live = reference.logps(model, batch, 8)
        assert close(live[0], want[0]) and close(live[1], want[1])
    with_table = PreferenceBatches(data, batch_size=2, pad_id=0, shuffle=False, shared_prompt=True, packing=True,
                                   max_tokens=30, ref_logps=want)
    for batch in with_table:
        chosen, rejected = Precomputed().logps(model, batch, 8)
        assert torch.equal(chosen, want[0][batch["index"]]) and torch.equal(rejected, want[1][batch["index"]])
    assert ReferenceFree().logps(model, batch, 8) == (None, None)


def test_two_row_logps_is_what_concatenated_logps_runs_on_plain_batches():
    pairs = make_pairs()
    model = policy().eval()
    with torch.no_grad():
        a = concatenated_logps(model, collate_pairs(pairs, pad_id=0))
        b = two_row_logps(model, collate_pairs(pairs, pad_id=0))
    assert torch.equal(a.chosen, b.chosen) and torch.equal(a.rejected, b.rejected)


# ------------------------------------------------------------------------ token-budget batches
def budget_stream(pairs, max_tokens: int, packing: bool, seed: int = 3, shared: bool = True):
    return PreferenceBatches(PreferenceData("toy.jsonl", pairs), batch_size=1, pad_id=0, seed=seed,
                             shared_prompt=shared, packing=packing, max_tokens=max_tokens)


@pytest.mark.parametrize("packing,shared", [(True, True), (False, True), (False, False)])
def test_budget_batches_respect_the_budget_and_cover_every_pair_once_per_epoch(packing, shared):
    pairs = make_pairs([(int(p), int(c), int(r)) for p, c, r in torch.randint(1, 12, (40, 3)).tolist()], seed=5)
    stream = budget_stream(pairs, max_tokens=64, packing=packing, shared=shared)
    for epoch in range(2):
        seen = []
        for i in range(epoch * stream.per_epoch, (epoch + 1) * stream.per_epoch):
            batch = stream[i]
            assert batch["input_ids"].numel() <= 64
            if packing:  # one padding-free row
                assert batch["input_ids"].shape[0] == 1 and batch["num_tokens"] == batch["input_ids"].numel()
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(len(pairs)))
    assert stream.per_epoch < len(pairs)  # several pairs per micro-batch


def test_budget_batches_are_deterministic_and_resumable():
    """The same seed gives the same stream; a fresh object (a resumed run) finds micro-batch i of a
    later epoch by its index alone; epochs order the batches differently; another seed differs."""
    pairs = make_pairs([(int(p), int(c), int(r)) for p, c, r in torch.randint(1, 12, (30, 3)).tolist()], seed=6)
    a, b = budget_stream(pairs, 60, packing=True), budget_stream(pairs, 60, packing=True)
    n = a.per_epoch
    for i in (0, 1, n - 1, n, n + 2, 3 * n + 1):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["index"], b[i]["index"])
    assert [a[i]["index"].tolist() for i in range(n)] != [a[n + i]["index"].tolist() for i in range(n)]
    other = budget_stream(pairs, 60, packing=True, seed=4)
    assert [a[i]["index"].tolist() for i in range(n)] != [other[i]["index"].tolist() for i in range(n)]


def test_a_pair_longer_than_the_budget_is_an_error_naming_its_line():
    with pytest.raises(AnitaError, match=r"toy.jsonl:2: this pair takes 15 tokens, more than --max-tokens 14"):
        budget_stream(make_pairs([(1, 1, 1), (9, 4, 2)]), max_tokens=14, packing=True)
    with pytest.raises(AnitaError, match="packing needs the shared-prompt layout and a token budget"):
        PreferenceBatches(PreferenceData("toy.jsonl", make_pairs()), batch_size=2, pad_id=0, packing=True)


# ------------------------------------------------------------------------------- anita dpo
def test_cli_layouts_agree_and_packing_runs(tmp_path, tiny_run_model, capsys):
    """`anita dpo` two steps with the shared-prompt default and with --no-shared-prompt: the same
    losses and gradient norms (same batches); a packed token-budget run starts at exactly ln 2 and
    counts only real tokens; settings that do not combine are refused with one line."""
    from anita.cli import main
    from tests.dpo.test_trainer import toy_rows

    write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    base = ["dpo", "--model", str(tiny_run_model), "--data", str(tmp_path / "train.jsonl"), "--lora-r", "4",
            "--max-length", "64", "--max-steps", "2", "--lr", "0.02", "--no-progress", "--beta", "1"]

    def run(name, *extra):
        assert main(base + ["--output", str(tmp_path / name), *extra]) == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "loss" in r]

    shared, plain = run("shared", "--batch-size", "4"), run("plain", "--batch-size", "4", "--no-shared-prompt")
    assert "shared-prompt batches" in capsys.readouterr().out
    for a, b in zip(shared, plain):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"]
        assert a["tokens"] < b["tokens"]  # each prompt once
    packed = run("packed", "--max-tokens", "160", "--packing")
    assert "shared-prompt packed batches" in capsys.readouterr().out
    assert packed[0]["loss"] == torch.tensor(0.5).log().neg().item()
    for extra, message in [(["--packing"], "set --max-tokens and keep --shared-prompt"),
                           (["--max-tokens", "99", "--batch-size", "2"], "not both"),
                           (["--loss", "kto", "--max-tokens", "99"], "max_tokens: --loss kto batches unpaired rows")]:
        assert main(base + ["--output", str(tmp_path / "x"), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    with pytest.raises(AnitaError, match="max_tokens: --loss kto"):  # from Python too, where nothing is "given"
        DPOConfig(model="m", data="d", output="o", loss="kto", max_tokens=99).validate()
