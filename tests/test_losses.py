"""The loss family: identities, gradients (paper Eq. 9), edge cases and input errors."""
import math
from argparse import Namespace

import pytest
import torch
import timm
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from deit.baselines import attach_dense_votes, LogitPenaltyLoss, OnlineLabelSmoothing, ZipfLabelSmoothing

from deit.cifar_models import resnet32_cifar
from deit.criterion import AlphaSchedule, create_criterion, DistillationLoss, LOSSES

from deit.losses import LabelSmoothingLoss, LabelSmoothingPartLoss, ls_decomposition, MaxSupLoss, MaxSupLossReference


def _batch(B=8, K=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, K, generator=g) * 3).to(dtype)
    y = torch.randint(0, K, (B,), generator=g)
    return z, y


def _soft(y, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    lam = torch.rand(y.shape[0], 1, generator=g)
    y2 = y.roll(1)
    return lam * F.one_hot(y, K) + (1 - lam) * F.one_hot(y2, K)


# ---------------------------------------------------------------- MaxSup
@pytest.mark.parametrize('soft', [False, True])
def test_maxsup_fused_equals_reference_value_and_grad(soft):
    z, y = _batch(B=16, K=7)
    t = _soft(y, 7) if soft else y
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    l1 = MaxSupLoss(0.15)(z1, t)
    l2 = MaxSupLossReference(0.15)(z2, t)
    l1.backward(), l2.backward()
    assert torch.allclose(l1, l2, atol=1e-6)
    assert torch.allclose(z1.grad, z2.grad, atol=1e-7)


def test_maxsup_definition_by_hand():
    z = torch.tensor([[1.0, 3.0, -2.0, 0.0]])
    y = torch.tensor([0])
    ce = math.log(sum(math.exp(v) for v in [1, 3, -2, 0])) - 1.0
    expected = ce + 0.1 * (3.0 - 0.5)
    assert MaxSupLoss(0.1)(z, y).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize('K', [2, 5, 1000])
def test_maxsup_penalty_gradient_is_eq9(K):
    """d/dz of alpha*(z_max - mean z): alpha(1-1/K) on the top-1 logit, -alpha/K elsewhere."""
    alpha, B = 0.2, 4
    z, y = _batch(B=B, K=K, seed=K)
    z = z.double().requires_grad_()
    # penalty alone = MaxSup - CE
    loss = MaxSupLoss(alpha)(z, y) - F.cross_entropy(z.float(), y)
    (g,) = torch.autograd.grad(loss, z)
    top = z.detach().argmax(1)
    expected = torch.full((B, K), -alpha / K, dtype=torch.float64)
    expected[torch.arange(B), top] = alpha * (1 - 1 / K)
    assert torch.allclose(g * B, expected, atol=1e-6)
    # descent lowers only the top logit: the only positive gradient entry is at argmax
    assert ((g > 0) == F.one_hot(top, K).bool()).all()


def test_maxsup_gradcheck_float64():
    z, y = _batch(B=3, K=5)
    z = z.double().requires_grad_()
    fn = MaxSupLoss(0.1)
    # the Function computes in float32; gradcheck needs float64 throughout: run it through the reference
    # of the closed-form backward instead (same math, double precision)
    from deit.losses import _MaxSupFunction

    class F64(_MaxSupFunction):
        @staticmethod
        def forward(ctx, logits, target, alpha):
            zz = logits
            B, K = zz.shape
            zmax, argmax = zz.max(dim=1)
            e = (zz - zmax[:, None]).exp()
            lse = torch.logsumexp(zz, 1)
            loss = (lse - zz.gather(1, target[:, None]).squeeze(1) + alpha * (zmax - zz.mean(1))).mean()
            ctx.save_for_backward(e, e.sum(1), argmax, target)
            ctx.alpha, ctx.in_dtype = alpha, logits.dtype
            return loss

    assert torch.autograd.gradcheck(lambda x: F64.apply(x, y, 0.1), (z,), eps=1e-6, atol=1e-6)
    # and the float32 production path agrees with autograd of the definition in float64
    zd = z.detach().clone().requires_grad_()
    ref = F.cross_entropy(zd, y) + 0.1 * (zd.max(1).values - zd.mean(1)).mean()
    (gref,) = torch.autograd.grad(ref, zd)
    zf = z.detach().clone().requires_grad_()
    (gf,) = torch.autograd.grad(fn(zf, y), zf)
    assert torch.allclose(gf, gref, atol=1e-6)


def test_maxsup_ties_k2_b1_and_huge_logits():
    loss = MaxSupLoss(0.1)
    # tie in the max: finite, gradient sums to zero per row (penalty and CE both shift-invariant)
    z = torch.tensor([[2.0, 2.0, -1.0]], requires_grad=True)
    l = loss(z, torch.tensor([2]))
    l.backward()
    assert torch.isfinite(l) and torch.isfinite(z.grad).all()
    assert z.grad.sum().abs() < 1e-6
    zr = z.detach().clone().requires_grad_()
    MaxSupLossReference(0.1)(zr, torch.tensor([2])).backward()
    assert torch.allclose(z.grad, zr.grad, atol=1e-7)
    # K=2, B=1
    z = torch.tensor([[0.3, -0.7]], requires_grad=True)
    l = loss(z, torch.tensor([1]))
    l.backward()
    assert l.item() == pytest.approx(math.log(math.exp(0.3) + math.exp(-0.7)) + 0.7 + 0.1 * 0.5, abs=1e-6)
    # +-1e4 logits: no overflow
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], requires_grad=True)
    l = loss(z, torch.tensor([1, 1]))
    l.backward()
    assert torch.isfinite(l) and torch.isfinite(z.grad).all()
    # sample 0 is wrong by 2e4: CE ~ 2e4; sample 1 right: CE ~ 0; penalties (1e4 - 0)/..., (1e4 - 5/3)
    expected = (2e4 + 0.1 * (1e4 - 0.0) + 0.0 + 0.1 * (1e4 - 5.0 / 3)) / 2
    assert l.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_maxsup_half_precision_inputs_compute_in_fp32(dtype):
    z, y = _batch(B=8, K=100, dtype=dtype)
    zh = z.clone().requires_grad_()
    l = MaxSupLoss(0.1)(zh, y)
    l.backward()
    assert l.dtype == torch.float32 and zh.grad.dtype == dtype
    ref = MaxSupLossReference(0.1)(z.float(), y)
    assert l.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.isfinite(zh.grad.float()).all()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        lin = torch.nn.Linear(100, 100)
        out = lin(z.float())
        assert out.dtype == torch.bfloat16
        assert MaxSupLoss(0.1)(out, y).dtype == torch.float32


def test_maxsup_alpha_update_per_epoch():
    z, y = _batch()
    loss = MaxSupLoss(0.1)
    a = loss(z, y)
    loss.alpha = 0.2
    b = loss(z, y)
    pen = (z.max(1).values - z.mean(1)).mean()
    assert (b - a).item() == pytest.approx(0.1 * pen.item(), rel=1e-5)


# ---------------------------------------------------------------- label smoothing
@pytest.mark.parametrize('alpha', [0.0, 0.1, 0.3])
def test_ls_logit_form_equals_torch_label_smoothing(alpha):
    z, y = _batch(B=32, K=20)
    got = LabelSmoothingLoss(alpha)(z, y)
    assert torch.allclose(got, F.cross_entropy(z, y, label_smoothing=alpha), atol=1e-5)


def test_ls_soft_equals_timm_mixup_smoothing_plus_soft_ce():
    K, alpha = 10, 0.1
    x = torch.randn(8, 3, 8, 8)
    y = torch.arange(8) % K
    mix_plain = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=K)
    mix_ls = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=alpha, num_classes=K)
    torch.manual_seed(0)
    import numpy as np
    np.random.seed(0)
    _, t = mix_plain(x.clone(), y.clone())
    np.random.seed(0)
    _, t_ls = mix_ls(x.clone(), y.clone())
    z = torch.randn(8, K)
    want = SoftTargetCrossEntropy()(z, t_ls)
    assert torch.allclose(LabelSmoothingLoss(alpha)(z, t), want, atol=1e-5)
    # and directly against the formula (1-alpha) t + alpha/K
    assert torch.allclose(LabelSmoothingLoss(alpha)(z, t),
                          SoftTargetCrossEntropy()(z, (1 - alpha) * t + alpha / K), atol=1e-5)


def test_ls_decomposition_sums_and_signs():
    z, y = _batch(B=64, K=10, seed=3)
    reg, err = ls_decomposition(z, y)
    ls_term = z.gather(1, y[:, None]).squeeze(1) - z.mean(1)
    assert torch.allclose(reg + err, ls_term, atol=1e-5)
    assert (reg >= 0).all() and (err <= 0).all()
    correct = z.argmax(1) == y
    assert correct.any() and (~correct).any()
    assert (err[correct] == 0).all()
    assert (err[~correct] < 0).all()


def test_ls_part_losses_add_up_to_ls():
    z, y = _batch(B=32, K=10, seed=4)
    ce = F.cross_entropy(z, y)
    r = LabelSmoothingPartLoss('regularization', 0.1)(z, y)
    e = LabelSmoothingPartLoss('error_enhancement', 0.1)(z, y)
    assert torch.allclose((r - ce) + (e - ce), LabelSmoothingLoss(0.1)(z, y) - ce, atol=1e-6)
    with pytest.raises(ValueError, match='hard labels'):
        LabelSmoothingPartLoss('regularization')(z, _soft(y, 10))


# ---------------------------------------------------------------- other baselines
def test_focal_loss_against_hand_computed_values():
    """Lin et al. Eq. 4 on hard labels, the target-weighted form on soft ones; gamma 0 is cross-entropy."""
    from deit.baselines import FocalLoss
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y = torch.tensor([0, 1])
    p = torch.softmax(z, 1)
    want = -((1 - p[0, 0]) ** 2 * p[0, 0].log() + (1 - p[1, 1]) ** 2 * p[1, 1].log()) / 2
    assert FocalLoss()(z, y) == pytest.approx(float(want))
    assert FocalLoss(gamma=0)(z, y) == pytest.approx(float(F.cross_entropy(z, y)))
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5]])
    per_class = -(1 - p) ** 2 * p.log()
    assert FocalLoss()(z, soft) == pytest.approx(float((soft * per_class).sum(1).mean()))
    assert FocalLoss()(z, F.one_hot(y, 3).float()) == pytest.approx(float(want))
    with pytest.raises(ValueError, match='gamma must be >= 0'):
        FocalLoss(gamma=-1)


def test_logit_penalty_formula():
    z, y = _batch()
    want = F.cross_entropy(z, y) + 1e-3 * (z ** 2).sum(1).mean()
    assert torch.allclose(LogitPenaltyLoss(2e-3)(z, y), want, atol=1e-6)


def test_ols_accumulates_correct_samples_and_swaps_at_epoch_end():
    K = 3
    ols = OnlineLabelSmoothing(K, a=0.5, smoothing=0.1)
    init = ols.supervise.clone()
    assert torch.allclose(init.sum(0), torch.ones(K))
    z = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1])  # third sample is wrong: must not count
    loss = ols(z, y)
    p = z.softmax(1)
    soft = init[:, y].t()
    want = 0.5 * F.cross_entropy(z, y) + 0.5 * (-(soft * p.log()).sum(1)).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    ols.next_epoch()
    assert torch.allclose(ols.supervise[:, 0], p[0], atol=1e-6)
    assert torch.allclose(ols.supervise[:, 1], p[1], atol=1e-6)
    assert torch.allclose(ols.supervise[:, 2], init[:, 2])  # no correct sample: kept
    # eval mode does not accumulate
    ols.eval()
    ols(z, y)
    assert ols.count.sum() == 0
    # soft targets: one-hot soft target behaves like the hard label
    ols.train()
    assert torch.allclose(ols(z, F.one_hot(y, K).float()), ols(z, y), atol=1e-6)


def _official_zipf_term(logits, labels, power=1.0, loss_mask=False, dense_argmax=None):
    """Transcription of megvii-research/zipfls pytorch_zipfls/losses.py: gen_pdf (hard rank, 'rank_zipf',
    with_target=False; with ``dense_argmax`` its dense branch, which ranks vote counts) + kl_loss, on CPU."""
    from scipy.stats import rankdata
    n, c = logits.shape
    mask = torch.ones_like(logits).scatter_(1, labels.unsqueeze(1), 0.)
    ranked = logits.detach()
    if dense_argmax is not None:
        scores = torch.zeros([n, max(c, dense_argmax.shape[1])])
        ranked = scores.scatter_add(1, dense_argmax, torch.ones_like(scores))[:, :c]
    rank = rankdata(-ranked.numpy(), axis=1, method='min')
    dist = (1 / rank) ** power
    dist = dist[mask.bool().numpy()].reshape((n, c - 1))
    pdf = torch.Tensor(dist / dist.sum(axis=1, keepdims=True))
    res = F.log_softmax(logits[mask.bool()].view((n, c - 1)), dim=1)
    loss = F.kl_div(res, pdf, reduction='none').sum(axis=1)
    if loss_mask:
        m = (torch.argmax(logits, 1) == labels)
        return (loss * m).sum() / m.sum() if m.any() else loss.mean() * 0
    return loss.mean()


@pytest.mark.parametrize('power, loss_mask', [(1.0, False), (1.5, False), (1.0, True)])
def test_zipf_matches_the_authors_formula_values_and_gradients(power, loss_mask):
    torch.manual_seed(0)
    z = torch.randn(16, 10) * 2
    z[:3, 4] = z[:3, 7]  # ties: method='min' gives them the same rank
    y = torch.randint(0, 10, (16,))
    y[:5] = z[:5].argmax(1)  # some correct predictions: their non-target ranks start at 2
    weight = 0.7
    a = z.clone().requires_grad_()
    ours = ZipfLabelSmoothing(weight=weight, power=power, loss_mask=loss_mask)(a, y)
    b = z.clone().requires_grad_()
    ref = F.cross_entropy(b, y) + weight * _official_zipf_term(b, y, power, loss_mask)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    ours.backward()
    ref.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_zipf_dense_votes_match_the_authors_dense_branch():
    """--zipf-dense: the classes are ranked by the votes of the classifier at each location of the last feature
    map, computed as the authors' train forward does (their fc on every location, argmax per location)."""
    torch.manual_seed(0)
    model = resnet32_cifar(num_classes=10).train()
    zipf = ZipfLabelSmoothing(weight=0.5, dense=True)
    handle = attach_dense_votes(model, zipf)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    logits = model(x)
    fmap = model.forward_features(x)  # train-mode BatchNorm: the same batch statistics, the same map
    n, c, h, w = fmap.shape
    dense_argmax = model.fc(fmap.permute(0, 2, 3, 1).reshape(n * h * w, c)).reshape(n, h * w, -1).argmax(axis=2)
    assert torch.equal(zipf.votes.sum(1), torch.full((6,), 64.0))  # 8 x 8 locations
    ours = zipf(logits, y)
    ref = F.cross_entropy(logits, y) + 0.5 * _official_zipf_term(logits, y, dense_argmax=dense_argmax)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert ours.item() != pytest.approx(ZipfLabelSmoothing(weight=0.5)(logits, y).item(), abs=1e-4)  # not logits
    assert zipf.votes is None  # each loss call consumes its batch's votes
    with pytest.raises(RuntimeError, match='no votes of this batch'):
        zipf(logits, y)
    model.eval()
    model(x)
    assert zipf.votes is None  # evaluation forwards do not vote
    handle.remove()
    with pytest.raises(ValueError, match='VisionTransformer has no global_pool module'):
        attach_dense_votes(timm.create_model('deit_tiny_patch16_224', num_classes=10), zipf)


def test_zipf_ranks_include_the_target_class():
    """A right prediction: the best non-target class has rank 2, so q differs from ranking 1..K-1."""
    z = torch.tensor([[5.0, 3.0, 2.0, 1.0]])
    y = torch.tensor([0])
    q = torch.tensor([1 / 2, 1 / 3, 1 / 4])
    q = q / q.sum()
    logp = F.log_softmax(z[0, 1:], 0)
    kl = (q * (q.log() - logp)).sum()
    loss = ZipfLabelSmoothing(weight=1.0)(z, y)
    assert loss.item() == pytest.approx((F.cross_entropy(z, y) + kl).item(), abs=1e-6)
    # all ranks tie: q is uniform over the non-target classes, matched by a flat non-target softmax
    flat = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    assert ZipfLabelSmoothing()(flat, y).item() == pytest.approx(F.cross_entropy(flat, y).item(), abs=1e-6)
    # loss_mask: no correct sample in the batch, no Zipf term
    wrong = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    assert ZipfLabelSmoothing(loss_mask=True)(wrong, y).item() == pytest.approx(
        F.cross_entropy(wrong, y).item(), abs=1e-6)


def test_every_loss_handles_hard_and_soft_targets():
    z, y = _batch(B=8, K=10)
    t = _soft(y, 10)
    for name in LOSSES:
        crit = create_criterion(loss=name, nb_classes=10)
        zz = z.clone().requires_grad_()
        out = crit(zz, y)
        out.backward()
        assert out.dim() == 0 and torch.isfinite(out) and torch.isfinite(zz.grad).all(), name
        if name not in ('ls_reg_only', 'ls_err_only'):
            assert torch.isfinite(crit(z, t)), name


# ---------------------------------------------------------------- schedule, factory, errors
def test_alpha_schedule_matches_official_formula():
    s = AlphaSchedule(0.1, 0.2, 300)
    for e in (0, 1, 150, 299):
        assert s(e) == pytest.approx(0.1 + e * 0.1 / 299)
    assert s(0) == pytest.approx(0.1) and s(299) == pytest.approx(0.2)
    assert AlphaSchedule(0.1, 0.2, 1)(0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        AlphaSchedule(0.1, 1.2, 10)


@pytest.mark.parametrize('logits,target,msg', [
    (torch.randn(4), torch.tensor([0, 1, 2, 3]), r'\(B, K\)'),
    (torch.randn(4, 3), torch.tensor([0, 1, 2]), '3 labels for a batch of 4'),
    (torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), r'labels must be in \[0, 2\]'),
    (torch.randn(4, 3), torch.tensor([0, -1, 2, 1]), r'labels must be in \[0, 2\]'),
    (torch.randn(2, 3), torch.tensor([[0.5, 0.4, 0.0], [1.0, 0.0, 0.0]]), 'summing to 1'),
    (torch.randn(2, 3), torch.tensor([[0.5, 0.5], [1.0, 0.0]]), 'do not match'),
    (torch.randn(2, 3), torch.tensor([0.0, 1.0]), 'must be integers'),
    (torch.randn(4, 1), torch.tensor([0, 0, 0, 0]), 'at least 2 classes'),
])
def test_bad_input_raises_clear_value_error(logits, target, msg):
    K = logits.shape[-1]
    for name in LOSSES:
        if (name == 'ols' and K < 2) or (target.dim() == 2 and name in ('ls_reg_only', 'ls_err_only')):
            continue  # OLS cannot be built for K < 2; hard-label-only losses reject soft targets earlier
        crit = create_criterion(loss=name, nb_classes=K)
        # the message starts with the loss's name, so a user can tell which criterion refused the batch
        with pytest.raises(ValueError, match=f'^{type(crit).__name__}.*{msg}'):
            crit(logits, target)


@pytest.mark.parametrize('alpha', [-0.1, 1.0, 2.0])
def test_alpha_outside_unit_interval_rejected(alpha):
    for cls in (MaxSupLoss, LabelSmoothingLoss):
        with pytest.raises(ValueError, match=r'\[0, 1\)'):
            cls(alpha)


def test_distillation_loss_soft_and_hard():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 5)
    x = torch.randn(6, 4)
    cls, dist = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    base = MaxSupLoss(0.1)
    hard = DistillationLoss(base, teacher, 'hard', alpha=0.5)
    want = 0.5 * base(cls, y) + 0.5 * F.cross_entropy(dist, teacher(x).argmax(1))
    assert torch.allclose(hard(x, (cls, dist), y), want, atol=1e-6)
    soft = DistillationLoss(base, teacher, 'soft', alpha=0.5, tau=2.0)
    kl = F.kl_div(F.log_softmax(dist / 2, 1), F.log_softmax(teacher(x) / 2, 1), reduction='sum',
                  log_target=True) * 4 / dist.numel()
    assert torch.allclose(soft(x, (cls, dist), y), 0.5 * base(cls, y) + 0.5 * kl, atol=1e-6)
    assert torch.allclose(DistillationLoss(base)(x, cls, y), base(cls, y))
    with pytest.raises(ValueError, match='teacher'):
        DistillationLoss(base, None, 'soft')


# ---------------------------------------------------------------- defaults, bounds and messages users rely on
def test_check_inputs_defaults_accept_soft_targets_check_values_and_name_the_loss():
    from deit.losses import check_inputs
    z = torch.randn(2, 3)
    check_inputs(z, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))  # soft targets allowed by default
    with pytest.raises(ValueError, match=r'^loss: labels must be in \[0, 2\], got values in \[0, 7\]'):
        check_inputs(z, torch.tensor([0, 7]))  # values are checked by default
    with pytest.raises(ValueError, match='^loss: soft targets must be floating point, got torch.int64'):
        check_inputs(z, torch.tensor([[1, 0, 0], [0, 1, 0]]))
    with pytest.raises(ValueError, match=r'^loss: targets must be \(B,\) labels or \(B, K\) soft targets, '
                                         r'got \(2, 3, 1\)'):
        check_inputs(z, torch.zeros(2, 3, 1))
    # rows summing to 1 with a negative entry are not probabilities either
    with pytest.raises(ValueError, match=r'largest \|row sum - 1\| is 0, smallest entry -0.5'):
        check_inputs(z, torch.tensor([[1.5, -0.5, 0.0], [0.0, 0.0, 1.0]]))


def test_value_checks_every_call_on_cpu_and_every_1000th_on_an_accelerator(monkeypatch):
    """Value checks sync with the host, so off the CPU they run on call 1, 1001, ... (shape checks always).
    Meta tensors stand in for an accelerator's: their device is not the CPU."""
    import deit.losses as losses
    seen = []
    monkeypatch.setattr(losses, 'check_inputs',
                        lambda logits, target, hard_only, who, values: seen.append((who, values)))
    crit = MaxSupLoss()
    for device in ('cpu', 'meta'):
        seen.clear()
        z, y = torch.zeros(4, 3, device=device), torch.zeros(4, dtype=torch.long, device=device)
        for _ in range(2 * losses.VALUE_CHECK_EVERY + 1):
            losses.validate_inputs(crit, z, y, 'MaxSupLoss')
        due = [i for i, (who, values) in enumerate(seen) if values]
        assert {who for who, _ in seen} == {'MaxSupLoss'} and len(seen) == 2 * losses.VALUE_CHECK_EVERY + 1
        assert due == (list(range(len(seen))) if device == 'cpu' else [0, 1000, 2000]), device
    crit.validate = False
    seen.clear()
    losses.validate_inputs(crit, z, y, 'MaxSupLoss')
    assert seen == []


def test_alpha_schedule_defaults_bounds_and_messages():
    s = AlphaSchedule()  # the paper's default: 0.1 -> 0.2 over DeiT's 300 epochs
    assert (s(0), s(299)) == (pytest.approx(0.1), pytest.approx(0.2))
    assert s(150) == pytest.approx(0.1 + 150 * 0.1 / 299)
    assert s(-3) == pytest.approx(0.1) and s(10_000) == pytest.approx(0.2)  # clamped outside the run
    assert AlphaSchedule(0.1, 0.3, 11)(12) == pytest.approx(0.3)
    constant = AlphaSchedule(0.15, None, 10)
    assert [constant(e) for e in (0, 5, 9)] == [0.15, 0.15, 0.15]
    with pytest.raises(ValueError, match=r'^alpha start must be in \[0, 1\), got 1.5'):
        AlphaSchedule(1.5, 0.2, 10)
    with pytest.raises(ValueError, match=r'^alpha end must be in \[0, 1\), got 1.2'):
        AlphaSchedule(0.1, 1.2, 10)
    with pytest.raises(ValueError, match='^epochs must be >= 1, got 0'):
        AlphaSchedule(0.1, 0.2, 0)


def test_logit_penalty_default_beta_zero_allowed_negative_refused():
    z, y = _batch()
    ce = F.cross_entropy(z, y)
    assert torch.allclose(LogitPenaltyLoss()(z, y), ce + 1e-3 * z.pow(2).sum(1).mean())  # beta 2e-3 default
    assert torch.allclose(LogitPenaltyLoss(0.0)(z, y), ce)
    with pytest.raises(ValueError, match='^beta must be >= 0, got -0.1'):
        LogitPenaltyLoss(-0.1)


def test_ols_defaults_bounds_and_messages():
    z, y = _batch(K=4)
    ols = OnlineLabelSmoothing(4)  # a = 0.5, smoothing 0.1, validating
    S = torch.full((4, 4), 0.1 / 3).fill_diagonal_(0.9)
    logp = F.log_softmax(z, 1)
    want = 0.5 * F.nll_loss(logp, y) + 0.5 * -(S[:, y].t() * logp).sum(1).mean()
    assert torch.allclose(ols(z, y), want, atol=1e-6)
    with pytest.raises(ValueError, match=r'^OnlineLabelSmoothing: labels must be in \[0, 3\]'):
        ols(z, y + 4)
    with pytest.raises(ValueError, match='^OnlineLabelSmoothing built for 4 classes, got logits with 5'):
        ols(torch.randn(2, 5), torch.tensor([0, 1]))
    OnlineLabelSmoothing(2, a=1.0)  # both bounds are allowed
    OnlineLabelSmoothing(2, a=0.0)
    with pytest.raises(ValueError, match=r'^OLS weight a must be in \[0, 1\], got 1.5'):
        OnlineLabelSmoothing(4, a=1.5)
    with pytest.raises(ValueError, match='^OLS needs num_classes >= 2, got 1'):
        OnlineLabelSmoothing(1)
    with pytest.raises(ValueError, match=r'^smoothing must be in \[0, 1\), got 1.0'):
        OnlineLabelSmoothing(4, smoothing=1.0)


def test_zipf_defaults_bounds_and_messages():
    z, y = _batch(K=6)
    assert torch.equal(ZipfLabelSmoothing()(z, y), ZipfLabelSmoothing(1.0, 1.0, loss_mask=False)(z, y))
    assert not torch.allclose(ZipfLabelSmoothing(loss_mask=True)(z, y), ZipfLabelSmoothing()(z, y))
    assert torch.allclose(ZipfLabelSmoothing(weight=0.0)(z, y), F.cross_entropy(z, y))  # weight 0 = CE
    for weight, power in ((-1.0, 1.0), (1.0, 0.0), (1.0, -1.0)):
        with pytest.raises(ValueError, match=f'^Zipf LS needs weight >= 0 and power > 0, '
                                             f'got weight={weight}, power={power}'):
            ZipfLabelSmoothing(weight, power)


def test_distillation_without_distillation_logits_names_the_fix():
    teacher = torch.nn.Linear(4, 5)
    crit = DistillationLoss(MaxSupLoss(), teacher, 'soft')
    with pytest.raises(ValueError, match=r'^distillation needs a model returning \(class, dist\) logits in '
                                         r'training mode \(a \*_distilled_\* model with '
                                         r'set_distilled_training\(True\)\)$'):
        crit(torch.randn(2, 4), torch.randn(2, 5), torch.tensor([0, 1]))


def test_ls_parts_are_corollary_3_4_terms_by_hand():
    z, y = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([1])  # z_gt - z_k = [-2, 0, 1]
    ce = F.cross_entropy(z, y)
    reg = LabelSmoothingPartLoss('regularization', alpha=0.3)(z, y)
    err = LabelSmoothingPartLoss('error_enhancement', alpha=0.3)(z, y)
    assert torch.allclose(reg, ce + 0.3 * (1 / 3)) and torch.allclose(err, ce + 0.3 * (-2 / 3))
    with pytest.raises(ValueError, match="^part must be one of \\('regularization', 'error_enhancement'\\), "
                                         "got 'both'"):
        LabelSmoothingPartLoss('both')


@pytest.mark.parametrize('make', [MaxSupLoss, MaxSupLossReference, LabelSmoothingLoss, LogitPenaltyLoss,
                                  ZipfLabelSmoothing, lambda validate: OnlineLabelSmoothing(3, validate=validate),
                                  lambda validate: LabelSmoothingPartLoss('regularization', validate=validate)])
def test_validate_false_skips_the_checks_and_true_names_the_loss(make, monkeypatch):
    import deit.losses as losses
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    want = make(validate=True)(z, y)
    with pytest.raises(ValueError, match=f'^{"MaxSupLoss" if make is MaxSupLossReference else ""}'):
        make(validate=True)(torch.randn(4), y)

    def refuse(*args, **kwargs):
        raise AssertionError('validate=False must skip the input checks')
    monkeypatch.setattr(losses, 'check_inputs', refuse)
    assert torch.equal(make(validate=False)(z, y), want)


def _trainer_args(*argv):
    """The trainer's own argument defaults, with these flags."""
    from deit.args import get_args_parser
    return get_args_parser().parse_args(list(argv))


def test_build_criterion_picks_the_base_loss_the_flags_ask_for():
    from deit.baselines import BCEOnMixedLabels, CrossEntropyLoss
    from deit.criterion import build_criterion
    from deit.losses import check_alpha
    with pytest.raises(ValueError, match=r'^alpha must be in \[0, 1\), got 1.5$'):
        check_alpha(1.5)

    def args(*flags):
        return _trainer_args('--loss', 'ce', *flags)
    _, base, schedule = build_criterion(args('--smoothing', '0.1'), 7)  # DeiT's LS when Mixup does not smooth
    assert type(base) is LabelSmoothingLoss and base.alpha == 0.1 and schedule is None
    assert type(build_criterion(args('--smoothing', '0.1'), 7, mixup=True)[1]) is CrossEntropyLoss
    assert type(build_criterion(args(), 7)[1]) is CrossEntropyLoss  # no smoothing asked: plain CE
    assert type(build_criterion(args('--loss', 'maxsup', '--smoothing', '0.1'), 7)[1]) is MaxSupLoss
    assert type(build_criterion(args('--bce-loss'), 7)[1]) is BCEOnMixedLabels
    ols = build_criterion(args('--loss', 'ols'), 7)[1]
    assert ols.num_classes == 7


def test_create_criterion_defaults_every_option_and_the_inputs_it_takes():
    """Each loss by name with the project's defaults, each option reaching its loss, the trainer's Namespace
    (the official flag name maxsup_alpha too) and a dict as inputs, and one-line refusals."""
    assert type(create_criterion()) is MaxSupLoss and create_criterion().alpha == 0.1  # the project's default
    assert create_criterion(loss='maxsup', maxsup_alpha=0.15).alpha == 0.15  # the official code's flag name
    assert create_criterion(loss='ls_err_only', alpha=0.3).alpha == 0.3
    zipf = create_criterion(loss='zipf')
    assert (zipf.weight, zipf.power, zipf.loss_mask) == (1.0, 1.0, False)
    assert create_criterion(loss='zipf', zipf_loss_mask=True).loss_mask is True
    assert create_criterion(loss='logit_penalty').beta == 2e-3
    with pytest.raises(ValueError, match='^loss "ols" needs nb_classes$'):
        create_criterion(loss='ols')
    with pytest.raises(ValueError, match="^unknown loss 'poly'; choose one of ce, ls, maxsup, ls_reg_only, "
                                         "ls_err_only, ols, zipf, logit_penalty, focal$"):
        create_criterion(loss='poly')
    assert create_criterion(loss='focal').gamma == 2.0 and create_criterion(loss='focal', focal_gamma=0.5).gamma == 0.5
    opts = dict(nb_classes=4, alpha=0.25, ols_a=0.7, zipf_weight=2.0, zipf_power=1.5, logit_penalty_beta=0.01)
    assert create_criterion(loss='maxsup', **opts).alpha == 0.25
    assert create_criterion(loss='ls', **opts).alpha == 0.25
    assert create_criterion(loss='ls_reg_only', **opts).alpha == 0.25
    ols = create_criterion(loss='ols', **opts)
    assert (ols.a, ols.num_classes) == (0.7, 4) and ols.supervise[0, 0] == pytest.approx(0.75)
    zipf = create_criterion(loss='zipf', **opts)
    assert (zipf.weight, zipf.power) == (2.0, 1.5)
    assert create_criterion(loss='logit_penalty', **opts).beta == 0.01
    assert isinstance(create_criterion(Namespace(loss='maxsup', maxsup_alpha=0.1)), MaxSupLoss)
    assert isinstance(create_criterion({'loss': 'ols', 'nb_classes': 5}), OnlineLabelSmoothing)


def test_distillation_defaults_and_flags_reach_the_wrapper():
    from deit.criterion import build_criterion
    d = DistillationLoss(MaxSupLoss())
    assert (d.distillation_type, d.alpha, d.tau) == ('none', 0.5, 1.0)  # DeiT's defaults
    with pytest.raises(ValueError, match=r"^distillation_type must be none\|soft\|hard, got 'kd'$"):
        DistillationLoss(MaxSupLoss(), torch.nn.Identity(), 'kd')
    args = _trainer_args('--distillation-type', 'soft', '--distillation-alpha', '0.3', '--distillation-tau', '2.5')
    crit = build_criterion(args, 7, teacher=torch.nn.Identity())[0]
    assert (crit.distillation_type, crit.alpha, crit.tau) == ('soft', 0.3, 2.5)


@pytest.mark.parametrize('tau', [1.0, 2.0])
def test_distillation_weighting_and_temperature_against_hand_computed_values(tau):
    """DeiT Eq. 2 (soft) and Eq. 3 (hard): (1 - alpha) * base + alpha * distillation; the soft term is
    tau^2 * KL(teacher_tau || student_tau) divided by batch x classes, as DeiT's code (``/ numel``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    teacher = torch.nn.Linear(5, 4)
    cls, dist = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    base = torch.nn.CrossEntropyLoss()
    alpha = 0.3
    with torch.no_grad():
        t = teacher(x)
    p_t, log_p_s = torch.softmax(t / tau, 1), torch.log_softmax(dist / tau, 1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(1).mean()
    want_soft = (1 - alpha) * F.cross_entropy(cls, y) + alpha * tau ** 2 * kl / 4  # mean over the batch, / 4 classes
    got = DistillationLoss(base, teacher, 'soft', alpha, tau)(x, (cls, dist), y)
    assert torch.allclose(got, want_soft, atol=1e-6), (got, want_soft)
    hard_nll = -torch.log_softmax(dist, 1)[torch.arange(6), t.argmax(1)].mean()
    want_hard = (1 - alpha) * F.cross_entropy(cls, y) + alpha * hard_nll
    got = DistillationLoss(base, teacher, 'hard', alpha, tau)(x, (cls, dist), y)
    assert torch.allclose(got, want_hard, atol=1e-6), (got, want_hard)


def test_the_loss_registry_drives_the_parser_and_matches_each_loss():
    """One list of losses: the parser's choices and flags come from it, a flag's default is its loss
    constructor's, and the registry's hard-label and schedule marks agree with what each loss does."""
    import inspect

    from deit.recipes import parse_args
    from deit.criterion import create_criterion, LOSS_REGISTRY, SCHEDULED_LOSSES
    args = parse_args([])
    for name, spec in LOSS_REGISTRY.items():
        params = inspect.signature(spec.cls).parameters
        for option in spec.options:
            assert getattr(args, option.dest) == params[option.param].default, (name, option.flag)
            flagged = parse_args([option.flag] if isinstance(params[option.param].default, bool)
                                 else [option.flag, '0.25'])
            built = create_criterion(flagged, loss=name, nb_classes=4)
            assert getattr(built, option.param) in (True, 0.25), (name, option.flag)  # the flag reaches the loss
        crit = create_criterion(loss=name, nb_classes=4, alpha=0.15)
        z, soft = torch.randn(6, 4), torch.softmax(torch.randn(6, 4), 1)
        if spec.hard_only:
            with pytest.raises(ValueError, match='hard labels'):
                crit(z, soft)
        else:
            assert torch.isfinite(crit(z, soft))
        assert (getattr(crit, 'alpha', None) == 0.15) == (name in SCHEDULED_LOSSES), name
