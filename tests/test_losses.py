"""Divergences against a float64 reference written from the definitions, plus the edge cases that
break training silently: endpoints, masking, low precision, padded vocabularies, label shift."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from kd_helpers import loss_spec

from easydistill.loss.divergence import KINDS, divergence, per_token_divergence
from easydistill.loss.rows import DenseRows
from easydistill.train.step import kd_step

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (0.5, 1.0, 2.0)


# ---- float64 reference: plain probabilities and explicit Python sums, no torch maths ----------


def _softmax64(row, temperature):
    scaled = [x / temperature for x in row]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = sum(weights)
    return [w / total for w in weights]


def _kl64(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _mix64(weight, a, b):
    return [weight * ai + (1 - weight) * bi for ai, bi in zip(a, b)]


def reference_divergence(student_row, teacher_row, kind, beta, temperature, skew_alpha):
    p_s = _softmax64(student_row, temperature)
    p_t = _softmax64(teacher_row, temperature)
    if kind == "forward_kld":
        return _kl64(p_t, p_s)
    if kind == "reverse_kld":
        return _kl64(p_s, p_t)
    if kind == "jsd":
        if beta == 0:
            return _kl64(p_t, p_s)
        if beta == 1:
            return _kl64(p_s, p_t)
        m = _mix64(beta, p_t, p_s)
        return beta * _kl64(p_t, m) + (1 - beta) * _kl64(p_s, m)
    if kind == "skew_forward_kld":
        return _kl64(p_t, _mix64(skew_alpha, p_t, p_s))
    if kind == "skew_reverse_kld":
        return _kl64(p_s, _mix64(skew_alpha, p_s, p_t))
    assert kind == "tvd"
    return 0.5 * sum(abs(a - b) for a, b in zip(p_t, p_s))


def _logits(*shape, seed, scale=2.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# ---- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64_reference(kind, beta, temperature):
    student, teacher = _logits(2, 3, 11, seed=0), _logits(2, 3, 11, seed=1)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    options = dict(beta=beta, temperature=temperature, skew_alpha=0.25)

    expected = torch.zeros(2, 3, dtype=torch.float64)
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                expected[b, t] = reference_divergence(
                    student[b, t].tolist(), teacher[b, t].tolist(), kind, beta, temperature, 0.25
                )

    per = divergence(student, teacher, kind, mask=mask, reduction="none", **options)
    assert per.dtype == torch.float32
    torch.testing.assert_close(per.double(), expected, rtol=1e-5, atol=1e-6)
    mean = divergence(student, teacher, kind, mask=mask, reduction="mean", **options)
    torch.testing.assert_close(mean.double(), expected.sum() / mask.sum(), rtol=1e-5, atol=1e-6)
    total = divergence(student, teacher, kind, mask=mask, reduction="sum", **options)
    torch.testing.assert_close(total.double(), expected.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("skew_alpha", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["skew_forward_kld", "skew_reverse_kld"])
def test_skew_matches_reference_for_several_alphas(kind, skew_alpha):
    student, teacher = _logits(4, 11, seed=2), _logits(4, 11, seed=3)
    got = per_token_divergence(student, teacher, kind, skew_alpha=skew_alpha)
    expected = [
        reference_divergence(s.tolist(), t.tolist(), kind, 0.5, 1.0, skew_alpha)
        for s, t in zip(student, teacher)
    ]
    torch.testing.assert_close(
        got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )


def test_jsd_endpoints_are_exactly_the_kls():
    student, teacher = _logits(3, 5, 11, seed=4), _logits(3, 5, 11, seed=5)
    forward = per_token_divergence(student, teacher, "forward_kld", temperature=0.7)
    reverse = per_token_divergence(student, teacher, "reverse_kld", temperature=0.7)
    assert torch.equal(per_token_divergence(student, teacher, "jsd", beta=0.0, temperature=0.7), forward)
    assert torch.equal(per_token_divergence(student, teacher, "jsd", beta=1.0, temperature=0.7), reverse)
    # The endpoints are not a degenerate 0: forward and reverse KL differ on random inputs.
    assert forward.min() > 0 and not torch.allclose(forward, reverse)


def test_skew_alpha_zero_is_exactly_the_plain_kls():
    student, teacher = _logits(4, 11, seed=6), _logits(4, 11, seed=7)
    assert torch.equal(
        per_token_divergence(student, teacher, "skew_forward_kld", skew_alpha=0.0),
        per_token_divergence(student, teacher, "forward_kld"),
    )
    assert torch.equal(
        per_token_divergence(student, teacher, "skew_reverse_kld", skew_alpha=0.0),
        per_token_divergence(student, teacher, "reverse_kld"),
    )


def test_jsd_half_is_symmetric():
    student, teacher = _logits(4, 11, seed=8), _logits(4, 11, seed=9)
    torch.testing.assert_close(
        per_token_divergence(student, teacher, "jsd", beta=0.5),
        per_token_divergence(teacher, student, "jsd", beta=0.5),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_identical_inputs_give_zero(kind):
    logits = _logits(2, 4, 11, seed=10, scale=5.0)
    got = per_token_divergence(logits, logits.clone(), kind, beta=0.3, temperature=0.5)
    torch.testing.assert_close(got, torch.zeros(2, 4), rtol=0, atol=1e-6)


# ---- masking and reductions --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_mean_is_zero_with_zero_gradients(kind):
    student = _logits(2, 3, 11, seed=11).requires_grad_()
    teacher = _logits(2, 3, 11, seed=12)
    loss = divergence(student, teacher, kind, mask=torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_masked_positions_do_not_leak_even_with_nan_logits():
    student = _logits(2, 3, 11, seed=13).requires_grad_()
    teacher = _logits(2, 3, 11, seed=14)
    teacher[0, 1] = float("nan")  # e.g. garbage in a padded row
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = False
    loss = divergence(student, teacher, "jsd", mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[0, 1], torch.zeros(11))


def test_no_mask_mean_averages_every_position():
    student, teacher = _logits(2, 3, 11, seed=15), _logits(2, 3, 11, seed=16)
    per = divergence(student, teacher, "tvd", reduction="none")
    assert per.shape == (2, 3)
    torch.testing.assert_close(divergence(student, teacher, "tvd"), per.mean())
    torch.testing.assert_close(divergence(student, teacher, "tvd", reduction="sum"), per.sum())


# ---- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_low_temperature_large_logits_stay_finite(kind):
    student = _logits(2, 4, 64, seed=17, scale=80.0, dtype=torch.bfloat16).requires_grad_()
    teacher = _logits(2, 4, 64, seed=18, scale=80.0, dtype=torch.bfloat16)
    loss = divergence(student, teacher, kind, beta=0.5, temperature=0.1)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_banned_tokens_at_minus_inf_stay_finite(kind):
    student, teacher = _logits(3, 11, seed=19), _logits(3, 11, seed=20)
    student[:, 4] = teacher[:, 4] = float("-inf")
    student.requires_grad_()
    loss = divergence(student, teacher, kind, beta=0.4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # A banned column is the same as a column that does not exist.
    keep = [v for v in range(11) if v != 4]
    expected = divergence(student.detach()[:, keep], teacher[:, keep], kind, beta=0.4)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_forward_kld_gradient_is_student_minus_teacher_over_t(temperature):
    student = _logits(3, 11, seed=21).double().requires_grad_()
    teacher = _logits(3, 11, seed=22).double()
    divergence(student, teacher, "forward_kld", temperature=temperature, reduction="sum").backward()
    p_s = torch.softmax(student.detach() / temperature, dim=-1)
    p_t = torch.softmax(teacher / temperature, dim=-1)
    torch.testing.assert_close(student.grad, (p_s - p_t) / temperature, rtol=1e-5, atol=1e-6)


def test_teacher_is_a_constant_target():
    student = _logits(2, 11, seed=23).requires_grad_()
    teacher = _logits(2, 11, seed=24).requires_grad_()
    divergence(student, teacher, "forward_kld").backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


# ---- padded vocabularies -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_padded_vocab_columns_are_ignored(kind):
    student, teacher = _logits(2, 3, 11, seed=25), _logits(2, 3, 11, seed=26)
    padded_teacher = torch.cat([teacher, torch.full((2, 3, 5), 40.0)], dim=-1)  # would dominate a softmax
    padded_student = torch.cat([student, _logits(2, 3, 2, seed=27, scale=30.0)], dim=-1)
    plain = per_token_divergence(student, teacher, kind)
    # Without vocab_size the shared width min(V_s, V_t) is used, whichever side is padded.
    assert torch.equal(per_token_divergence(student, padded_teacher, kind), plain)
    assert torch.equal(per_token_divergence(padded_student, teacher, kind), plain)
    assert torch.equal(per_token_divergence(padded_student, padded_teacher, kind, vocab_size=11), plain)
    # vocab_size cuts further than the shared width, before the softmax.
    torch.testing.assert_close(
        per_token_divergence(padded_student, padded_teacher, kind, vocab_size=7),
        per_token_divergence(student[..., :7], teacher[..., :7], kind),
        rtol=0,
        atol=0,
    )


# ---- kd_step on fixed logits: label shift, CE on the full vocab, accumulation ------------------


class FixedLogits(torch.nn.Module):
    """A causal LM stand-in whose forward returns given (B, T, V) logits (at the kept positions when asked)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask, logits_to_keep=None, use_cache=None):
        logits = self.logits[: len(input_ids)] if logits_to_keep is None else self.logits[logits_to_keep]
        return SimpleNamespace(logits=logits)


class FixedTeacher:
    """A teacher whose rows are slices of given (B, T, V_t) logits."""

    spec = SimpleNamespace(name="t", weight=1.0, temperature=1.0, kind="online")
    projects = False

    def __init__(self, logits):
        self.logits = logits

    def rows(self, batch, mask):
        return DenseRows(self.logits[batch["row"]][:, :-1][mask])


def _batch(seed, batch=2, length=6, student_vocab=9, teacher_vocab=7):
    student = _logits(batch, length, student_vocab, seed=seed)
    teacher = _logits(batch, length, teacher_vocab, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    labels = torch.randint(0, teacher_vocab, (batch, length), generator=gen)
    labels[:, :2] = -100  # the prompt
    labels[-1, -1] = -100  # padding
    return student, teacher, labels


def _inputs(labels, rows=None):
    rows = torch.arange(len(labels)) if rows is None else rows
    return {
        "input_ids": labels.clamp(min=0),
        "attention_mask": torch.ones_like(labels),
        "labels": labels,
        "row": rows,
    }


def test_kd_step_uses_the_causal_shift():
    student, teacher, labels = _batch(seed=30)
    labels[0, 3] = 8  # an id past the teacher's vocab: CE must still use the student's full logits
    sums = kd_step(FixedLogits(student), _inputs(labels), [FixedTeacher(teacher)], loss_spec())

    manual_ce, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = labels[b, t + 1].item()
            if target != -100:
                manual_ce -= torch.log_softmax(student[b, t].double(), dim=-1)[target].item()
                count += 1
    assert sums.n_tokens == count == 7
    assert sums.ce_sum.dtype == torch.float32
    assert sums.ce_sum.item() == pytest.approx(manual_ce, rel=1e-5)
    shifted_mask = labels[:, 1:] != -100
    expected_kd = divergence(
        student[:, :-1], teacher[:, :-1], "forward_kld", mask=shifted_mask, reduction="sum"
    )
    torch.testing.assert_close(sums.kd_sum, expected_kd)
    torch.testing.assert_close(sums.objective, 0.5 * sums.ce_sum + 0.5 * sums.kd_sum)


def test_kd_step_shift_matters():
    # Logits at t put all mass on token t+1: the shifted CE is ~0, an unshifted one would be huge.
    labels = torch.tensor([[-100, -100, 3, 1, 4, 0]])
    student = torch.full((1, 6, 5), -20.0)
    for t in range(5):
        student[0, t, labels[0, t + 1].clamp(min=0)] = 20.0
    sums = kd_step(FixedLogits(student), _inputs(labels), [], loss_spec(kd_ratio=0.0))
    assert sums.n_tokens == 4
    assert sums.ce_sum.item() < 1e-6
    assert sums.kd_sum.item() == 0.0 and sums.kd_sum.dtype == torch.float32


def test_kd_step_all_masked_gives_zero_sums_and_zero_gradients():
    student, teacher, labels = _batch(seed=40)
    labels[:] = -100
    model = FixedLogits(student)
    sums = kd_step(model, _inputs(labels), [FixedTeacher(teacher)], loss_spec(kind="jsd", temperature=2.0))
    sums.objective.backward()
    assert sums.n_tokens == 0 and sums.ce_sum.item() == 0.0 and sums.kd_sum.item() == 0.0
    assert model.logits.grad is None or torch.equal(model.logits.grad, torch.zeros_like(student))


def test_step_normalisation_is_independent_of_micro_batching():
    # Batch 4 × accumulation 1 equals batch 1 × accumulation 4 when both sums are divided by the
    # token count of the whole step. Rows have different numbers of valid tokens on purpose.
    student, teacher, labels = _batch(seed=50, batch=4)
    labels[1, :4] = -100
    loss = loss_spec(kd_ratio=0.3, kind="skew_forward_kld", temperature=1.5)

    def step_loss(micro_batches):
        sums = [
            kd_step(FixedLogits(student[rows]), _inputs(labels[rows], rows), [FixedTeacher(teacher)], loss)
            for rows in micro_batches
        ]
        return sum(s.objective for s in sums) / sum(s.n_tokens for s in sums)

    whole = step_loss([torch.arange(4)])
    micro = step_loss([torch.tensor([i]) for i in range(4)])
    torch.testing.assert_close(whole, micro)


# ---- argument errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(kind="kl"), "forward_kld, reverse_kld, jsd"),
        (dict(kind="jsd", beta=-0.1), "beta"),
        (dict(kind="jsd", beta=1.5), "beta"),
        (dict(kind="jsd", temperature=0.0), "temperature"),
        (dict(kind="jsd", temperature=-1.0), "temperature"),
        (dict(kind="skew_forward_kld", skew_alpha=1.0), "skew_alpha"),
        (dict(kind="jsd", vocab_size=12), "vocab_size"),
        (dict(kind="jsd", reduction="avg"), "reduction"),
        (dict(kind="jsd", mask=torch.ones(2, 3)), "bool"),
        (dict(kind="jsd", mask=torch.ones(3, 2, dtype=torch.bool)), "mask shape"),
    ],
)
def test_invalid_arguments_raise(options, message):
    student, teacher = _logits(2, 3, 11, seed=60), _logits(2, 3, 11, seed=61)
    with pytest.raises(ValueError, match=message):
        divergence(student, teacher, **options)


def test_mismatched_leading_shapes_raise():
    with pytest.raises(ValueError, match="every dim but the vocabulary"):
        per_token_divergence(_logits(2, 3, 11, seed=62), _logits(2, 4, 11, seed=63), "jsd")


def test_reference_itself_detects_a_wrong_convention():
    # Guard against a reference that agrees with anything: swapping teacher and student changes KL.
    p_s, p_t = [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]
    assert abs(_kl64(p_t, p_s) - _kl64(p_s, p_t)) > 1e-3
    assert F.kl_div(torch.tensor(p_s).log(), torch.tensor(p_t), reduction="sum").item() == pytest.approx(
        _kl64(p_t, p_s), rel=1e-5
    )
