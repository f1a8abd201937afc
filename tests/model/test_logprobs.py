"""Tests for anita/model/logprobs.py: chunked per-token log-probs under the LM head.

The oracle is the module's plain version, `plain_token_logps`: log_softmax(hidden @ W.T) gathered at
the labels, which builds the whole [B, T, V] logits, and which is itself held equal to PyTorch's
`cross_entropy`; the chunked mean logits are also checked against TRL's chunked log-prob kernel
when trl is installed. Memory is proved, not timed: saved-tensor hooks record
what autograd keeps for backward, and a dispatch mode records every tensor any op creates in
the forward and backward passes; neither may reach B·T·V elements. Each detector is first shown
to catch the naive implementation.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from anita.errors import AnitaError
from anita.model import logprobs
from anita.model.logprobs import IGNORE_INDEX, next_token_labels, plain_token_logps, sequence_logps, token_logps

_naive = plain_token_logps  # the [B, T, V] way, the version a reader meets first


def _inputs(B=2, T=7, D=5, V=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = IGNORE_INDEX  # a prompt
    labels[1, -1] = IGNORE_INDEX  # the last position
    return hidden, weight, labels


def test_plain_version_is_cross_entropy():
    """plain_token_logps = −cross_entropy(logits, labels) per token, 0 where ignored (PyTorch's
    own ignore_index is the same −100)."""
    hidden, weight, labels = _inputs()
    logits = hidden @ weight.T  # [B, T, V]
    expected = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(plain_token_logps(hidden, weight, labels), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 14, 100])
def test_matches_naive_values_and_gradients(chunk_size):
    """Values and both gradients equal the naive computation within 1e-5, for chunks that divide
    B·T = 14, do not divide it, and exceed it."""
    hidden, weight, labels = _inputs()
    upstream = torch.randn(2, 7, generator=torch.Generator().manual_seed(1))
    ours = token_logps(hidden, weight, labels, chunk_size=chunk_size)
    ref = _naive(hidden, weight, labels)
    assert ours.dtype == torch.float32 and ours.shape == (2, 7)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    g_ours = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
    g_ref = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_gradcheck_float64():
    """Autograd through the custom Function equals finite differences (fp64, tiny sizes, two chunks)."""
    hidden, weight, labels = _inputs(B=2, T=3, D=3, V=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, w: token_logps(h, w, labels, chunk_size=4), (hidden, weight))


def test_bf16_inputs_use_fp32_math(monkeypatch):
    """bf16 hidden and bf16 weight (e.g. a tied bf16 embedding): fp32 output equal to the naive
    fp32 computation on the same bf16 values; gradients come back in bf16, equal to the fp32
    reference up to bf16 rounding. The vocabulary slicing that casts W piecewise is exercised by
    shrinking the slice to 4 rows."""
    monkeypatch.setattr(logprobs, "_VOCAB_SLICE", 4)
    hidden, weight, labels = _inputs(dtype=torch.bfloat16)
    ours = token_logps(hidden, weight, labels, chunk_size=5)
    ref = _naive(hidden, weight, labels)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    g_ours = torch.autograd.grad(ours.sum(), (hidden, weight))
    g_ref = torch.autograd.grad(ref.sum(), (hidden, weight))
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == torch.bfloat16
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)


def test_mixed_dtypes_fp32_hidden_bf16_weight(monkeypatch):
    """fp32 hidden with a bf16 head: the head is cast to fp32 slice by slice; results are exact fp32."""
    monkeypatch.setattr(logprobs, "_VOCAB_SLICE", 3)
    hidden, weight, labels = _inputs()
    weight = weight.detach().bfloat16().requires_grad_()
    ours = token_logps(hidden, weight, labels, chunk_size=4)
    ref = _naive(hidden, weight, labels)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    g_ours = torch.autograd.grad(ours.sum(), (hidden, weight))
    g_ref = torch.autograd.grad(ref.sum(), (hidden, weight))
    assert torch.allclose(g_ours[0], g_ref[0], atol=1e-5, rtol=0)
    assert g_ours[1].dtype == torch.bfloat16 and torch.allclose(g_ours[1].float(), g_ref[1].float(), atol=1e-2)


def test_ignore_index_positions_are_zero_and_get_no_gradient():
    """Ignored positions give log-prob 0 and mean logit 0, and contribute nothing to the gradient:
    a row that is all ignored has zero hidden gradient; changing its hidden changes nothing else."""
    hidden, weight, labels = _inputs()
    labels[1] = IGNORE_INDEX
    logps, mean_logits = token_logps(hidden, weight, labels, chunk_size=3, return_mean_logits=True)
    ignored = labels == IGNORE_INDEX
    assert torch.equal(logps[ignored], torch.zeros(int(ignored.sum())))
    assert torch.equal(mean_logits[ignored], torch.zeros(int(ignored.sum())))
    assert (logps[~ignored] < 0).all()
    grad_hidden = torch.autograd.grad(logps.sum(), hidden)[0]
    assert torch.equal(grad_hidden[1], torch.zeros_like(grad_hidden[1]))
    assert torch.equal(grad_hidden[0, :2], torch.zeros_like(grad_hidden[0, :2]))


def test_mean_logits_metric():
    """The optional second output is the mean over V of each position's logits, without gradient,
    equal to (hidden @ W.T).mean(-1)."""
    hidden, weight, labels = _inputs(T=5)
    _, mean_logits = token_logps(hidden, weight, labels, chunk_size=4, return_mean_logits=True)
    expected = (hidden @ weight.T).mean(-1).detach()  # [B, T]
    scored = labels != IGNORE_INDEX
    assert not mean_logits.requires_grad
    assert torch.allclose(mean_logits[scored], expected[scored], atol=1e-6)


def test_matches_trl_chunked_kernel():
    """Log-probs and mean logits equal TRL's chunked log-prob kernel (its torch path on CPU), whose
    mean logits feed TRL's `logits/chosen` metric."""
    chunked = pytest.importorskip("trl.kernels.chunked_logprob")
    hidden, weight, labels = _inputs(T=5)
    logps, mean_logits = token_logps(hidden, weight, labels, chunk_size=4, return_mean_logits=True)
    trl_out = chunked.ChunkedLogProbFunction.apply(
        hidden.detach().reshape(-1, 5), weight.detach(), None, labels.clamp(min=0).reshape(-1), 1.0, 4
    )
    scored = labels != IGNORE_INDEX
    assert torch.allclose(logps[scored], trl_out[0].view(2, 5)[scored], atol=1e-5)
    assert torch.allclose(mean_logits[scored], trl_out[3].view(2, 5)[scored], atol=1e-6)


def test_llama_hidden_states_and_lm_head_give_the_models_log_probs():
    """On a tiny Llama (tied and untied head), token_logps(model.hidden_states(ids), lm_head.weight)
    equals log_softmax(model(ids)) gathered at the next tokens."""
    from tests.conftest import tiny_model

    for variant in ("llama3", "llama3.2"):
        model = tiny_model(variant)
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        labels = next_token_labels(ids, torch.ones_like(ids))
        with torch.no_grad():
            ours = token_logps(model.hidden_states(ids), model.lm_head.weight, labels, chunk_size=5)
            full = torch.log_softmax(model(ids).float(), dim=-1)  # [B, T, V]
        expected = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
        assert torch.allclose(ours[:, :-1], expected, atol=1e-5) and torch.equal(ours[:, -1], torch.zeros(2))


def test_tied_weight_and_frozen_weight():
    """A head tied to the embedding gets gradient from both uses, as with the naive computation;
    a frozen head (QLoRA) gets none and the hidden gradient is still right. Non-contiguous hidden
    (a slice) is accepted."""
    g = torch.Generator().manual_seed(3)
    embedding = torch.randn(9, 4, generator=g, requires_grad=True)  # [V, D], also the LM head
    ids = torch.randint(0, 9, (2, 6), generator=g)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    grads = []
    for fn in (lambda h, w, y: token_logps(h, w, y, chunk_size=3), _naive):
        hidden = torch.tanh(embedding[ids])[:, :-1]  # [B, T, D], non-contiguous slice
        grads.append(torch.autograd.grad(fn(hidden, embedding, labels).sum(), embedding)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    frozen = embedding.detach()
    hidden = torch.randn(2, 5, 4, generator=g, requires_grad=True)
    out = token_logps(hidden, frozen, labels, chunk_size=2)
    out.sum().backward()
    ref = torch.autograd.grad(_naive(hidden, frozen, labels).sum(), hidden)[0]
    assert torch.allclose(hidden.grad, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Memory: no [B, T, V] tensor, saved or transient
# ---------------------------------------------------------------------------------------------

B, T, D, V, CHUNK = 2, 16, 8, 128, 8  # B·T·V = 4096; the largest allowed tensor is CHUNK·V = V·D = 1024


def _saved_sizes(fn):
    """Numbers of elements of every tensor autograd saves for backward while fn runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


class _RecordSizes(TorchDispatchMode):
    """Records the number of elements of every tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append(t.numel())
        return out


def test_nothing_of_size_btv_is_saved_for_backward():
    """Only the M scored rows of hidden [M, D], W [V, D], and [M]-sized tensors (labels, logsumexp,
    and the row index, saved by its three uses) are saved; the naive computation saves [B, T, V]
    tensors (so the hook would catch one)."""
    hidden, weight, labels = _inputs(B, T, D, V)
    naive = _saved_sizes(lambda: _naive(hidden, weight, labels))
    assert max(naive) >= B * T * V
    ours = _saved_sizes(lambda: token_logps(hidden, weight, labels, chunk_size=CHUNK))
    M = int((labels != IGNORE_INDEX).sum())  # only scored positions reach the LM head
    assert M < B * T
    assert sorted(ours) == sorted([M * D, V * D] + [M] * 5)


def test_no_tensor_of_size_btv_exists_in_forward_or_backward():
    """Every tensor created during forward and backward has at most max(CHUNK·V, V·D) elements,
    a quarter of B·T·V; the naive computation creates B·T·V ones (so the recorder would catch one)."""
    hidden, weight, labels = _inputs(B, T, D, V)
    with _RecordSizes() as naive:
        _naive(hidden, weight, labels).sum().backward()
    assert max(naive.sizes) >= B * T * V
    hidden.grad = weight.grad = None
    with _RecordSizes() as ours:
        logps, _ = token_logps(hidden, weight, labels, chunk_size=CHUNK, return_mean_logits=True)
        logps.sum().backward()
    assert max(ours.sizes) <= max(CHUNK * V, V * D) < B * T * V
    assert hidden.grad is not None and weight.grad is not None


# ---------------------------------------------------------------------------------------------
# Labels and sequence sums
# ---------------------------------------------------------------------------------------------


def test_next_token_labels_hand_example():
    """ids [5, 6, 7, 8] with the completion = the last two tokens: position 1 predicts 7, position 2
    predicts 8, everything else (prompt targets and the last position) is ignored."""
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1]])
    assert next_token_labels(ids, mask).tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX]]


def test_sequence_logps_hand_example():
    """Row 0 sums −1 − 2 = −3 over 2 tokens (mean −1.5); row 1 has no scored token: sum 0, mean 0."""
    token = torch.tensor([[-1.0, -2.0, -5.0], [-4.0, -4.0, -4.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    total, mean = sequence_logps(token, mask)
    assert total.tolist() == [-3.0, 0.0] and mean.tolist() == [-1.5, 0.0]


def test_chunked_sequence_logps_equal_naive_sums():
    """The pipeline next_token_labels -> token_logps -> sequence_logps gives the naive summed
    completion log-probs of a [chosen; rejected] batch."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 11, (4, 6), generator=g)
    completion = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    hidden = torch.randn(4, 6, 5, generator=g)
    weight = torch.randn(11, 5, generator=g)
    labels = next_token_labels(ids, completion)
    total, mean = sequence_logps(token_logps(hidden, weight, labels, chunk_size=5), labels != IGNORE_INDEX)
    logp_all = torch.log_softmax(hidden @ weight.T, dim=-1)  # [B, T, V]
    for b in range(4):
        expected = sum(logp_all[b, t - 1, ids[b, t]] for t in range(1, 6) if completion[b, t])
        assert total[b].item() == pytest.approx(expected.item(), abs=1e-5)
        assert mean[b].item() == pytest.approx(expected.item() / int(completion[b, 1:].sum()), abs=1e-5)


def test_bad_inputs_raise_anita_error():
    hidden, weight, labels = _inputs()
    with pytest.raises(AnitaError, match=r"`hidden` must be \[B, T, D\]"):
        token_logps(hidden[0], weight, labels)
    with pytest.raises(AnitaError, match=r"`weight` must be \[V, D\] with D = 5"):
        token_logps(hidden, weight[:, :4], labels)
    with pytest.raises(AnitaError, match="`labels` must be an integer"):
        token_logps(hidden, weight, labels.float())
    with pytest.raises(AnitaError, match="holds 11, outside"):
        token_logps(hidden, weight, labels.masked_fill(labels == labels[1, 0], 11))
    with pytest.raises(AnitaError, match="dtype torch.int64"):
        token_logps(hidden.detach().long(), weight, labels)
    with pytest.raises(AnitaError, match="`chunk_size` must be a positive int"):
        token_logps(hidden, weight, labels, chunk_size=0)
    with pytest.raises(AnitaError, match="must both be"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(AnitaError, match="must both be"):
        next_token_labels(torch.zeros(2, 3, dtype=torch.long), torch.ones(3, 2))


@pytest.mark.parametrize("head_dtype", [None, "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_size_does_not_change_log_probs_or_hidden_gradients(head_dtype, dtype):
    """Why `chunk_size` may change on --resume (anita.train.config.RESUMABLE_CHANGES): each token's
    log-prob and hidden gradient come out bit for bit the same whatever the chunks (the head's weight
    is frozen in training, so its gradient, summed per chunk, is not needed)."""
    hidden, weight, labels = _inputs(B=3, T=400, D=64, V=1000, seed=4, dtype=dtype)
    results = []
    for chunk_size in (100, 256, 512):
        logps = token_logps(hidden, weight, labels, chunk_size=chunk_size, head_dtype=head_dtype)
        results.append((logps, *torch.autograd.grad(logps.sum(), hidden)))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@pytest.mark.parametrize("chunk_size", [3, 512])
def test_low_precision_head_matches_its_plain_version(chunk_size):
    """head_dtype=bf16: the chunked head equals the plain definition with a bf16 matmul and an fp32
    log-softmax (values and gradients), and both stay close to the fp32 head (bf16 logits carry
    ~3 significant digits). The chunked matmul sees other row blocks than the [B, T, V] one; oneDNN's
    bf16 GEMM accumulates in fp32 either way, so they agree to fp32 rounding of the logits."""
    hidden, weight, labels = _inputs(B=3, T=9, D=16, V=40, seed=3)
    expected = plain_token_logps(hidden, weight, labels, head_dtype=torch.bfloat16)
    got = token_logps(hidden, weight, labels, chunk_size=chunk_size, head_dtype="bf16")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    g_exp = torch.autograd.grad(expected.sum(), (hidden, weight))
    g_got = torch.autograd.grad(got.sum(), (hidden, weight))
    torch.testing.assert_close(g_got[0], g_exp[0], atol=1e-6, rtol=0)  # grad_hidden: the same bf16 matmul
    # grad_W: the plain version rounds Σ_tokens to bf16 once; the chunked one rounds each chunk's sum and
    # adds them in fp32, so they differ by bf16 rounding (|grad| ~ 5 here, bf16 step 0.03).
    torch.testing.assert_close(g_got[1], g_exp[1], atol=3e-2, rtol=0)
    fp32 = plain_token_logps(hidden, weight, labels)
    assert 0 < (got - fp32).abs().max() < 0.2  # really rounded, and only by bf16's rounding
    assert torch.equal(token_logps(hidden, weight, labels, head_dtype=torch.float32), token_logps(hidden, weight, labels))
    with pytest.raises(AnitaError, match="head_dtype"):
        token_logps(hidden, weight, labels, head_dtype="int8")
