"""Behaviour users rely on, checked against hand-computed values: metrics on a known batch, the
evaluation loop, the effective lr per world size, the lr schedule across a resume, each loss's
hyper-parameters, and the timm -> mmseg converter block by block against mmseg's own forward."""
from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from deit.recipes import parse_args
from deit.build import build_optimization
from deit.config import resolve_config
from deit.distributed import DistInfo
from deit.engine import evaluate
from deit.baselines import LogitPenaltyLoss, OnlineLabelSmoothing, ZipfLabelSmoothing
from deit.losses import LabelSmoothingLoss, MaxSupLoss
from deit.metrics import (CalibrationBins, classification_summary, expected_calibration_error, feature_variation,
                          topk_correct)

# 4 samples, 6 classes; the label's rank in its row: 1st, 2nd, 6th, 5th -> top-1 1 of 4, top-5 3 of 4
LOGITS = torch.tensor([[5., 1., 0., 0., 0., 0.],     # label 0: 1st
                       [3., 4., 0., 0., 0., 0.],     # label 0: 2nd
                       [0., 1., 2., 3., 4., -1.],    # label 5: 6th
                       [1., 2., 3., 4., 0., 5.]])    # label 0: 5th
LABELS = torch.tensor([0, 0, 5, 0])


def test_topk_counts_on_a_known_batch():
    assert topk_correct(LOGITS, LABELS, (1, 5)) == [1, 3]  # rows 0 | 0, 1, 3
    assert topk_correct(LOGITS, LABELS, (1, 2, 6)) == [1, 2, 4]
    assert topk_correct(LOGITS[:, :3], torch.tensor([0, 0, 2, 1]), (1, 5)) == [2, 4]  # k capped at K = 3


def test_ece_by_hand():
    """ECE = sum_b n_b / N |acc_b - conf_b| with bins (b/n, (b+1)/n], batch by batch, from two ranks' sums and
    from the one-call function."""
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45], [0.5, 0.5]])
    target = torch.tensor([0, 1, 0, 0, 1])
    bins = CalibrationBins(n_bins=2)  # (0, .5] and (.5, 1]
    bins.update(probs, target)
    # bin 0: conf .5 (pred 0, wrong) ; bin 1: confs .9 .8 .6 .55, correct 1 0 1 1
    assert bins.count.tolist() == [1, 4]
    want = (1 / 5) * abs(0 - 0.5) + (4 / 5) * abs(3 / 4 - (0.9 + 0.8 + 0.6 + 0.55) / 4)
    assert bins.ece() == pytest.approx(want)
    rel = bins.reliability()
    assert rel['accuracy'] == pytest.approx([0.0, 0.75]) and rel['confidence'][0] == pytest.approx(0.5)
    empty = CalibrationBins(3)
    assert math.isnan(empty.ece()) and empty.reliability()['accuracy'] == [None] * 3
    again = CalibrationBins(2)
    again.load_tensor(bins.as_tensor() * 2)  # sums from two ranks
    assert again.ece() == pytest.approx(want)
    # 15 bins, 4 samples in two batches: confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right);
    # bin of 0.9: acc 0.5 conf 0.9 -> |0.4| * 2/4; bin of 0.6: acc 1.0 conf 0.6 -> |0.4| * 2/4; ECE = 0.4
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    target = torch.tensor([0, 1, 1, 0])
    assert expected_calibration_error(probs, target, 15) == pytest.approx(0.4)
    bins = CalibrationBins(15)
    bins.update(probs[:2], target[:2])
    bins.update(probs[2:], target[2:])
    assert bins.ece() == pytest.approx(0.4)
    rel = bins.reliability()
    assert rel['count'][13] == 2 and rel['accuracy'][13] == pytest.approx(0.5)  # 0.9 -> bin (13/15, 14/15]
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == pytest.approx(0.0)


def test_feature_variation_by_hand():
    x = torch.tensor([[1., 0.], [2., 0.], [0., 3.], [0., 1.]])  # two classes on orthogonal axes
    y = torch.tensor([0, 0, 1, 1])
    v = feature_variation(x, y)
    assert v['d_within'] == pytest.approx(0.0) and v['d_total'] == pytest.approx(0.5) and v['r2'] == pytest.approx(1.0)
    x2 = torch.tensor([[1., 0.], [0., 1.], [1., 0.], [0., 1.]])  # each class spread over both axes
    v2 = feature_variation(x2, y)
    assert v2['d_within'] == pytest.approx(0.5) and v2['r2'] == pytest.approx(0.0, abs=1e-9)
    e = torch.eye(3)
    # perfectly separated: every class one point (orthogonal), repeated -> d_within 0, R^2 = 1
    f = e.repeat_interleave(4, 0)
    y = torch.arange(3).repeat_interleave(4)
    r = feature_variation(f, y)
    assert r['d_within'] == pytest.approx(0.0, abs=1e-12) and r['r2'] == pytest.approx(1.0)
    # d_total by hand: mean over class pairs of (1 - cos): 3 same-class pairs 0, 6 cross pairs 1 -> 6/9
    assert r['d_total'] == pytest.approx(6 / 9)
    # identical features everywhere: nothing varies
    r = feature_variation(torch.ones(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert r['d_within'] == pytest.approx(0.0, abs=1e-12) and r['d_total'] == pytest.approx(0.0, abs=1e-12)
    # one class with two orthogonal points: pairs (0,0),(1,1) -> 0, (0,1),(1,0) -> 1 => d_within = 1/2
    r = feature_variation(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    assert r['d_within'] == pytest.approx(0.5)
    # brute force agreement on random data
    g = torch.Generator().manual_seed(1)
    f, y = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    x = torch.nn.functional.normalize(f.double(), dim=1)
    dist = 1 - x @ x.T
    cls = y.unique()
    dw = torch.stack([dist[y == c][:, y == c].mean() for c in cls]).mean()
    dt = torch.stack([dist[y == a][:, y == b].mean() for a in cls for b in cls]).mean()
    r = feature_variation(f, y)
    assert r['d_within'] == pytest.approx(float(dw)) and r['r2'] == pytest.approx(float(1 - dw / dt))


def test_classification_summary_and_evaluate_on_a_known_batch():
    s = classification_summary(LOGITS, LABELS, n_bins=15)
    assert (s['acc1'], s['acc5'], s['n']) == (25.0, 75.0, 4)
    assert s['loss'] == pytest.approx(float(F.cross_entropy(LOGITS, LABELS)))

    class Lookup(torch.nn.Module):  # "model" whose logits are the rows of LOGITS, indexed by the input
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(LOGITS.clone())

        def forward(self, idx):
            return self.table[idx.long().view(-1)]

    batches = [(torch.tensor([0, 1]), LABELS[:2]), (torch.empty(0), torch.empty(0, dtype=torch.long)),
               (torch.tensor([2, 3]), LABELS[2:])]
    stats = evaluate(batches, Lookup(), print_freq=0, reliability=True)
    assert (stats['acc1'], stats['acc5'], stats['n']) == (25.0, 75.0, 4)
    assert stats['loss'] == pytest.approx(s['loss']) and stats['ece'] == pytest.approx(s['ece'])
    assert sum(stats['reliability']['count']) == 4
    with pytest.raises(ValueError, match='empty'):
        evaluate([], Lookup(), print_freq=0)


@pytest.mark.parametrize('world', [1, 2, 8])
def test_effective_lr_follows_world_size(world, capsys):
    place = DistInfo(distributed=world > 1, world_size=world)
    args = parse_args(['--data-set', 'DEMO', '--batch-size', '64', '--lr', '5e-4', '--epochs', '10'])
    cfg = resolve_config(args, 10, place)
    build_optimization(cfg, torch.nn.Linear(2, 2))
    assert cfg.total_batch == 64 * world and cfg.lr == pytest.approx(5e-4 * 64 * world / 512)
    assert f'effective batch size 64 x {world} = {64 * world}; lr {cfg.lr:.3g}' in capsys.readouterr().out
    assert args.lr == 5e-4 and args.batch_size == 64  # the parsed flags are left as given
    args = parse_args(['--data-set', 'DEMO', '--total-batch-size', '1024', '--lr', '5e-4', '--epochs', '10'])
    cfg = resolve_config(args, 10, place)
    assert cfg.total_batch == 1024 and cfg.batch_size == 1024 // world  # one recipe, any world
    args = parse_args(['--data-set', 'DEMO', '--batch-size', '64', '--lr', '5e-4', '--unscale-lr', '--epochs', '10'])
    cfg = resolve_config(args, 10, place)
    build_optimization(cfg, torch.nn.Linear(2, 2))
    assert cfg.lr == 5e-4
    with pytest.raises(AttributeError, match="resolved once; 'lr' cannot change"):
        cfg.lr = 1.0


ACC = [10., 20., 30., 32., 32., 31., 31., 31., 31., 31., 31., 31.]  # an accuracy that plateaus


@pytest.mark.parametrize('sched', ['cosine', 'step', 'plateau'])
def test_resume_reproduces_the_whole_lr_schedule(sched):
    """Optimizer + schedule restored from the checkpoint dict give the stopped run's lr and every later
    epoch's lr exactly (the plateau schedule's patience counters included, which timm's state leaves out)."""
    from deit.engine import LossScaler
    from deit.train_state import TrainingState, resume, scheduler_state

    def fresh():
        args = parse_args(['--data-set', 'DEMO', '--epochs', '12', '--warmup-epochs', '2', '--lr', '1e-3',
                           '--unscale-lr', '--sched', sched, '--min-lr', '1e-5', '--decay-epochs', '3',
                           '--patience-epochs', '1', '--decay-rate', '0.5'])
        return build_optimization(resolve_config(args, 2), torch.nn.Linear(3, 2))

    def run_epochs(opt, sched_, start, stop):  # the trainer's call: step(epoch + 1, acc1)
        out = []
        for epoch in range(start, stop):
            out.append(opt.param_groups[0]['lr'])
            sched_.step(epoch + 1, ACC[epoch])
        return out

    opt, sch = fresh()
    full = run_epochs(opt, sch, 0, 12)
    assert full[0] < full[2] and full[-1] < full[2]  # warm-up, then lower
    opt, sch = fresh()
    run_epochs(opt, sch, 0, 7)  # a run stopped after epoch 6, one epoch into a plateau's patience
    ckpt = {'optimizer': opt.state_dict(), 'lr_scheduler': scheduler_state(sch), 'epoch': 6}
    opt2, sch2 = fresh()
    state = TrainingState(torch.nn.Linear(3, 2), opt2, sch2, LossScaler('cpu', enabled=False), torch.nn.Module())
    resume(state, ckpt, 'ckpt.pth', seed=0)
    assert state.start_epoch == 7
    assert run_epochs(opt2, sch2, state.start_epoch, 12) == full[7:]


# ---- each loss's hyper-parameters move its value as the paper's formula says --------------------------------

Z = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.3, 3.0, -2.0], [1.0, 1.0, 0.0, 4.0]])
Y = torch.tensor([1, 2, 0])
CE = F.cross_entropy(Z, Y)


@pytest.mark.parametrize('alpha', [0.05, 0.1, 0.3])
def test_maxsup_and_ls_weights(alpha):
    """MaxSup: CE + a (z_max - mean z); LS in the paper's logit form: CE + a (z_gt - mean z)."""
    maxsup = MaxSupLoss(alpha)(Z, Y)
    assert float(maxsup) == pytest.approx(float(CE + alpha * (Z.max(1).values - Z.mean(1)).mean()), rel=1e-6)
    ls = LabelSmoothingLoss(alpha)(Z, Y)
    z_gt = Z.gather(1, Y[:, None]).squeeze(1)
    assert float(ls) == pytest.approx(float(CE + alpha * (z_gt - Z.mean(1)).mean()), rel=1e-6)


def test_logit_penalty_beta_and_zipf_weight_and_power_move_their_terms():
    for beta in (1e-3, 4e-3):
        want = CE + beta / 2 * Z.pow(2).sum(1).mean()
        assert float(LogitPenaltyLoss(beta)(Z, Y)) == pytest.approx(float(want), rel=1e-6)
    z1, z3 = ZipfLabelSmoothing(weight=1.0)(Z, Y), ZipfLabelSmoothing(weight=3.0)(Z, Y)
    assert float(z1 - CE) > 0 and float(z3 - CE) == pytest.approx(3 * float(z1 - CE), rel=1e-5)  # CE + w KL
    # a steeper rank law puts less mass on the lower ranks: the KL to it changes
    assert float(ZipfLabelSmoothing(power=2.0)(Z, Y)) != pytest.approx(float(z1), rel=1e-3)


def test_ols_a_weights_the_hard_label_term_and_next_epoch_normalises():
    """L = a CE(z, y) + (1 - a) CE_soft(z, S[:, y]); S starts as label smoothing of ``smoothing``."""
    ls_targets = torch.full((3, 4), 0.1 / 3).scatter_(1, Y[:, None], 0.9)
    soft_ce = float(-(ls_targets * Z.log_softmax(1)).sum(1).mean())
    for a in (0.0, 0.3, 1.0):
        got = OnlineLabelSmoothing(num_classes=4, a=a, smoothing=0.1).eval()(Z, Y)
        assert float(got) == pytest.approx(a * float(CE) + (1 - a) * soft_ce, rel=1e-6)
    # an epoch of two correct class-2 samples: the new column 2 is their MEAN softmax (normalised by the count)
    o = OnlineLabelSmoothing(num_classes=4, a=0.5).train()
    zz = torch.tensor([[0., 0., 3., 0.], [0., 1., 2., 0.], [3., 0., 0., 0.]])
    o(zz, torch.tensor([2, 2, 1]))  # the third is wrong: not accumulated
    before = o.supervise.clone()
    o.next_epoch()
    assert torch.allclose(o.supervise[:, 2], zz[:2].softmax(1).mean(0), atol=1e-6)
    assert torch.equal(o.supervise[:, [0, 1, 3]], before[:, [0, 1, 3]])  # no correct sample: column kept
    assert o.count.sum() == 0 and o.update.abs().sum() == 0


# ---- the converter, block by block against mmseg's VisionTransformer ---------------------------------------

@pytest.mark.segmentation
def test_converted_deit_gives_timms_block_outputs_in_mmseg():
    pytest.importorskip('mmseg')
    import timm
    from mmseg.models.backbones import VisionTransformer

    from segmentation.deit_to_mmseg import timm_to_mmseg
    torch.manual_seed(0)
    vit = timm.create_model('deit_tiny_patch16_224', pretrained=False, num_classes=0, img_size=64, depth=3).eval()
    for p in vit.parameters():  # non-trivial LayerNorm affine params: a swapped norm1/norm2 must show
        p.data.add_(torch.randn_like(p) * 0.05)
    mm = VisionTransformer(img_size=64, patch_size=16, embed_dims=192, num_layers=3, num_heads=3, mlp_ratio=4,
                           qkv_bias=True, out_indices=(0, 1, 2), final_norm=False, with_cls_token=True,
                           output_cls_token=False, interpolate_mode='bicubic', patch_bias=True,
                           norm_cfg=dict(type='LN', eps=1e-6), act_cfg=dict(type='GELU'), drop_path_rate=0.0)
    mm.eval()
    missing = mm.load_state_dict(timm_to_mmseg(vit.state_dict(), 192, 3, img_size=64), strict=False)
    assert not missing.unexpected_keys and not missing.missing_keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vit._pos_embed(vit.patch_embed(x))
        emb, hw = mm.patch_embed(x)
        cls = mm.cls_token.expand(2, -1, -1)
        mm_tokens = mm._pos_embeding(torch.cat([cls, emb], 1), hw, mm.pos_embed)
        assert torch.allclose(tokens, mm_tokens, atol=1e-5)
        for i, (tb, mb) in enumerate(zip(vit.blocks, mm.layers)):
            tokens, mm_tokens = tb(tokens), mb(mm_tokens)
            assert torch.allclose(tokens, mm_tokens, atol=1e-4), f'block {i} differs'
        feats = mm(x)
        grid = tokens[:, 1:].reshape(2, 4, 4, 192).permute(0, 3, 1, 2)
        assert torch.allclose(feats[-1], grid, atol=1e-4)


# ---- samplers: the exact index lists ---------------------------------------------------------------------

def test_rasampler_pads_deals_and_orders_exactly():
    from deit.samplers import DistributedEvalSampler, RASampler
    ordered = RASampler(list(range(10)), 1, 0, shuffle=False, num_repeats=2, selected_round=0)
    assert list(ordered) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and len(ordered) == 10  # ceil(10 / 1) kept
    # 10 x 3 = 30 copies for 4 ranks: padded to 32 with the list's first 2, dealt round-robin, 3 kept each
    rep = [i for i in range(10) for _ in range(3)]
    rep += rep[:2]
    for r in range(4):
        s = RASampler(list(range(10)), 4, r, shuffle=False, num_repeats=3)
        assert (s.num_samples, s.total_size, len(s)) == (8, 32, 3)
        assert list(s) == rep[r::4][:3]
    big = RASampler(list(range(600)), 4, 0, num_repeats=3)  # DeiT: floor(600 / 256) * 256 / 4 = 128 per rank
    assert len(big) == len(list(big)) == 128
    with pytest.raises(ValueError, match=r'rank 4 outside \[0, 4\)'):
        RASampler(list(range(8)), 4, 4)
    with pytest.raises(ValueError, match='num_repeats must be >= 1, got 0'):
        RASampler(list(range(8)), 1, 0, num_repeats=0)
    assert list(DistributedEvalSampler(list(range(7)), 3, 2)) == [2, 5] and len(DistributedEvalSampler([0], 3, 1)) == 0
    alone = RASampler(list(range(10)), num_repeats=1, shuffle=False)  # defaults: one process, all samples
    assert list(alone) == list(range(10))
    short = RASampler(list(range(10)), 4, 3, shuffle=False, num_repeats=1)  # 10 = 4 + 4 + 2: padded from the front
    assert list(short) == [3, 7, 1]
    assert list(RASampler(list(range(4)), shuffle=False, selected_round=0)) == [0, 0, 0, 1]  # 3 repeats by default
    assert list(RASampler(list(range(8)), num_repeats=1)) == torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    assert len(RASampler(list(range(256)), 3, 0)) == 85  # N = 256 already rounds: 256 // 3
    a, b = RASampler(list(range(64)), 2, 1, seed=7), RASampler(list(range(64)), 2, 1, seed=10)
    a.set_epoch(3)  # the permutation is drawn from seed + epoch (DeiT's convention)
    assert list(a) == list(b)


# ---- one training epoch: what the engine reports and does ------------------------------------------------

def _epoch(batches, model=None, print_freq=0, **kw):
    from deit.engine import LossScaler, train_one_epoch
    torch.manual_seed(0)
    model = model or torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = lambda x, out, y: F.cross_entropy(out, y)  # noqa: E731
    return model, opt, train_one_epoch(model, crit, batches, opt, torch.device('cpu'), 7, LossScaler('cpu', False),
                                       print_freq=print_freq, **kw)


def test_train_epoch_stats_steps_mode_and_ema():
    from timm.utils import ModelEmaV3
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (2, 6, 4)]
    losses = []
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for x, y in batches:  # plain SGD steps: the engine must do exactly these
        loss = F.cross_entropy(ref(x), y)
        losses.append((loss.item(), len(y)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model, opt2, stats = _epoch(batches)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert stats['loss'] == pytest.approx(sum(v * n for v, n in losses) / 12)  # weighted by batch size
    assert stats['lr'] == 0.05 and 'skipped_steps' not in stats
    model, _, _ = _epoch(batches, max_steps=1)  # stops after one step
    torch.manual_seed(0)
    one = torch.nn.Linear(4, 3)
    grad = torch.autograd.grad(F.cross_entropy(one(batches[0][0]), batches[0][1]), one.weight)[0]
    with torch.no_grad():
        one.weight -= 0.05 * grad
    assert torch.allclose(model.weight, one.weight)
    net = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(4, 3))
    seen = []
    net.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    _epoch(batches, model=net, set_training_mode=False)  # DeiT's --no-train-mode
    _epoch(batches, model=net)
    assert seen == [False] * 3 + [True] * 3
    base = torch.nn.Linear(4, 3)
    ema = ModelEmaV3(base, decay=0.5)
    before = ema.module.weight.clone()
    _epoch(batches, model=base, model_ema=ema, accum_iter=3)  # one optimizer step -> one EMA update
    assert torch.allclose(ema.module.weight, 0.5 * before + 0.5 * base.weight.detach(), atol=1e-6)


def test_non_finite_loss_names_epoch_and_step_and_autocast_dtypes():
    from deit.engine import NonFiniteLossError, autocast
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])), (torch.full((2, 4), float('nan')), torch.tensor([0, 1]))]
    with pytest.raises(NonFiniteLossError, match=r'loss is nan at epoch 7, step 1'):
        _epoch(batches)
    with autocast(torch.device('cpu'), True):
        assert torch.get_autocast_dtype('cpu') == torch.bfloat16 and torch.is_autocast_enabled('cpu')
    with autocast(torch.device('cpu'), False):
        assert not torch.is_autocast_enabled('cpu')
    assert autocast(torch.device('cuda'), True).fast_dtype == torch.float16  # fp16 + GradScaler on CUDA


def test_metric_defaults_keys_and_per_bin_confidence():
    from deit.metrics import expected_calibration_error
    from deit.samplers import DistributedEvalSampler
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(64, 5, generator=g) * 3, torch.randint(0, 5, (64,), generator=g)
    probs = logits.softmax(1)
    fifteen = CalibrationBins(15)
    fifteen.update(probs, labels)
    assert expected_calibration_error(probs, labels) == pytest.approx(fifteen.ece())  # 15 bins by default
    assert expected_calibration_error(probs, labels, 16) != pytest.approx(fifteen.ece())
    s = classification_summary(logits, labels)
    assert s['ece'] == pytest.approx(fifteen.ece())
    assert classification_summary(logits, labels, n_bins=4)['ece'] == pytest.approx(
        expected_calibration_error(probs, labels, 4))
    c1, c5 = topk_correct(logits, labels)
    assert c1 >= 2 and (s['acc1'], s['acc5']) == (pytest.approx(100 * c1 / 64), pytest.approx(100 * c5 / 64))
    v = feature_variation(torch.randn(10, 3, generator=g), torch.tensor([0, 1] * 5))
    assert (v['num_classes'], v['n']) == (2, 10)
    bins = CalibrationBins(4)
    bins.update(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]), torch.tensor([0, 1, 1]))
    rel = bins.reliability()
    assert rel['confidence'] == [None, None, pytest.approx(0.7), pytest.approx(0.85)]
    assert rel['accuracy'] == [None, None, 0.0, 0.5] and rel['n_bins'] == 4 and rel['count'] == [0, 0, 1, 2]
    default = CalibrationBins()  # 15 bins, float64 sums (exact when ranks add them up)
    default.update(probs, labels)
    assert default.n_bins == 15 and default.ece() == pytest.approx(fifteen.ece())
    assert default.as_tensor().dtype == torch.float64 and all(t.dtype == torch.float64 for t in
                                                               (default.count, default.conf_sum, default.correct_sum))
    one = CalibrationBins(10)
    one.update(torch.tensor([[0.8, 0.2]]), torch.tensor([1]))
    assert one.ece() == pytest.approx(0.8)  # a single sample: |0 - 0.8|
    assert list(DistributedEvalSampler(list(range(5)))) == [0, 1, 2, 3, 4]  # defaults: one process


def test_train_epoch_progress_lines_and_second_order_optimizers(capsys):
    from deit.engine import LossScaler, train_one_epoch
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(101)]
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    crit = lambda x, out, y: F.cross_entropy(out, y)  # noqa: E731
    train_one_epoch(model, crit, batches, opt, torch.device('cpu'), 3, LossScaler('cpu', False))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('Epoch: [3] [')]
    assert [ln[12:19] for ln in lines] == ['  0/101', ' 50/101', '100/101']  # every 50 steps and the last
    assert all('lr: 0.250000' in ln for ln in lines)

    class SecondOrder(torch.optim.SGD):  # timm's AdaHessian & co. need the graph kept for the Hessian
        is_second_order = True

    seen = []

    class Spy(LossScaler):
        def __call__(self, loss, optimizer, **kw):
            seen.append(kw['create_graph'])
            return super().__call__(loss, optimizer, **kw)

    for make in (torch.optim.SGD, SecondOrder):
        train_one_epoch(model, crit, batches[:1], make(model.parameters(), lr=0.1), torch.device('cpu'), 0,
                        Spy('cpu', False), print_freq=0)
    assert seen == [False, True]


def test_empty_batches_are_skipped_and_counted_in_one_process(capsys):
    g = torch.Generator().manual_seed(1)
    full = [(torch.randn(2, 4, generator=g), torch.tensor([0, 1])) for _ in range(3)]
    empty = (torch.empty(0), torch.empty(0, dtype=torch.long))
    ref, _, ref_stats = _epoch([full[0], full[2]], batches_may_be_empty=True)
    model, _, stats = _epoch([full[0], empty, full[2]], batches_may_be_empty=True)
    assert stats['skipped_steps'] == 1 and ref_stats['skipped_steps'] == 0
    assert torch.equal(model.weight, ref.weight)  # the step after the empty batch still trains
    model, _, stats = _epoch([empty, empty, full[0]], batches_may_be_empty=True)
    assert stats['skipped_steps'] == 2
    assert 'epoch 7: 2 step(s) skipped on all ranks (a rank had no readable image)' in capsys.readouterr().out


def test_batches_go_to_the_device_and_accumulation_steps_at_max_steps():
    moved = []

    class Recorded:  # a batch whose .to() records the device it is sent to
        def __init__(self, t):
            self.t = t

        def to(self, device, non_blocking=False):
            moved.append(device)
            return self.t

        def __len__(self):
            return len(self.t)

    model, _, _ = _epoch([(Recorded(torch.randn(2, 4)), Recorded(torch.tensor([0, 1])))])
    assert moved == [torch.device('cpu')] * 2  # images and targets
    assert all(p.grad is None for p in model.parameters())  # freed after the update (set_to_none)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(6)]
    torch.manual_seed(0)
    start = torch.nn.Linear(4, 3).weight.detach().clone()
    model, _, _ = _epoch(batches, accum_iter=4, max_steps=2)  # stopped before the 4th micro-batch: still steps
    assert not torch.equal(model.weight, start)


def test_amp_autocast_and_gradient_clipping_reach_the_step(capsys):
    from deit.engine import LossScaler, train_one_epoch
    seen = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled('cpu'))
            return super().forward(x)

    batches = [(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)) * 100, torch.tensor([0, 1]))]
    crit = lambda x, out, y: F.cross_entropy(out.float(), y)  # noqa: E731
    for amp in (True, False):
        m = Probe(4, 3)
        train_one_epoch(m, crit, batches, torch.optim.SGD(m.parameters(), lr=0.1), torch.device('cpu'), 0,
                        LossScaler('cpu', False), amp=amp, print_freq=0)
    assert seen == [True, False]  # bf16 autocast on the CPU when asked for
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    x = batches[0][0]
    wrong = [(x, m(x).argmin(1).detach())]  # the least likely class: a large gradient, whatever the draw
    start = [p.detach().clone() for p in m.parameters()]
    train_one_epoch(m, crit, wrong, torch.optim.SGD(m.parameters(), lr=1.0), torch.device('cpu'), 0,
                    LossScaler('cpu', False), max_norm=0.01, print_freq=0)
    step = torch.cat([(p.detach() - s).flatten() for p, s in zip(m.parameters(), start)])
    assert step.norm() == pytest.approx(0.01, rel=1e-4)  # lr 1 x gradient clipped to norm 0.01
    assert 'Averaged stats: lr: 1.000000  loss: ' in capsys.readouterr().out


def test_loss_scaler_is_on_only_where_fp16_needs_it():
    from deit.engine import LossScaler
    assert LossScaler().is_enabled() == torch.cuda.is_available()  # CUDA by default: off without a GPU
    assert LossScaler('cpu').is_enabled() and not LossScaler('cpu', enabled=False).is_enabled()


def test_converter_position_embeddings_errors_and_checkpoint_file(tmp_path):
    """Distilled DeiT (cls + dist tokens) keeps the class token's position; resampling is timm's; unknown keys
    are named; the saved file holds mmseg's state_dict and where it came from."""
    import timm
    from timm.layers import resample_abs_pos_embed

    from data.io import CheckpointError
    from segmentation.deit_to_mmseg import convert_checkpoint, mmseg_to_timm, timm_to_mmseg
    torch.manual_seed(0)
    dist = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, img_size=64, depth=2).state_dict()
    pos = dist['pos_embed']  # (1, 2 + 16, 192): cls, dist, 4x4 grid
    conv = timm_to_mmseg(dist)
    assert torch.equal(conv['pos_embed'], torch.cat([pos[:, :1], pos[:, 2:]], 1))
    big = timm_to_mmseg(dist, img_size=128)['pos_embed']
    want = resample_abs_pos_embed(torch.cat([pos[:, :1], pos[:, 2:]], 1), new_size=[8, 8], old_size=[4, 4],
                                  num_prefix_tokens=1)
    assert big.shape == (1, 65, 192) and torch.allclose(big, want)
    head_first = {'head.weight': dist['head.weight'], **dist}  # dropped keys anywhere: the others all convert
    assert set(timm_to_mmseg(head_first)) == set(conv)
    with pytest.raises(CheckpointError, match=r"unexpected ViT key 'blocks\.0\.extra\.weight'"):
        timm_to_mmseg({**dist, 'blocks.0.extra.weight': torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected mmseg ViT key 'decode_head\.conv\.weight'"):
        mmseg_to_timm({**conv, 'decode_head.conv.weight': torch.zeros(1)})
    small = timm.create_model('deit_small_patch16_224', pretrained=False).state_dict()  # the configs' backbone
    ema = {k: v + 1 for k, v in small.items()}
    torch.save({'model': small, 'model_ema': ema}, tmp_path / 'ckpt.pth')
    state = convert_checkpoint(tmp_path / 'ckpt.pth', tmp_path / 'out.pth')  # defaults: DeiT-S, 512 crops
    saved = torch.load(tmp_path / 'out.pth', weights_only=True)
    assert saved['meta'] == {'source': str(tmp_path / 'ckpt.pth'), 'img_size': 512}
    assert saved['state_dict']['pos_embed'].shape == (1, 1 + 32 * 32, 384) and set(saved['state_dict']) == set(state)
    assert torch.equal(state['layers.0.ln1.weight'], small['blocks.0.norm1.weight'])
    assert 'ln1.weight' not in state and 'ln1.weight' in convert_checkpoint(tmp_path / 'ckpt.pth', tmp_path / 'n.pth',
                                                                            final_norm=True)
    ema_state = convert_checkpoint(tmp_path / 'ckpt.pth', tmp_path / 'ema.pth', use_ema=True)
    assert torch.equal(ema_state['layers.0.ln1.weight'], ema['blocks.0.norm1.weight'])
    torch.save(dist, tmp_path / 'tiny.pth')
    with pytest.raises(CheckpointError, match='width 192, the backbone expects 384'):
        convert_checkpoint(tmp_path / 'tiny.pth', tmp_path / 'o.pth')
    with pytest.raises(CheckpointError, match='depth 12, the backbone expects 13'):
        convert_checkpoint(tmp_path / 'ckpt.pth', tmp_path / 'o.pth', expected_depth=13)


def test_progress_line_counts_images_not_batches(monkeypatch, capsys):
    import deit.logger
    clock = iter([0.0])
    monkeypatch.setattr(deit.logger, 'time', SimpleNamespace(time=lambda: next(clock, 1.0)))  # 1 s per step
    _epoch([(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))], print_freq=1)
    assert '  4.0 img/s' in capsys.readouterr().out  # one batch of 4 images in one second


def test_progress_line_counts_the_steps_that_run(capsys):
    batches = [(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))] * 8
    _epoch(batches, print_freq=1, max_steps=3)  # --max-steps-per-epoch 3 of 8 batches
    steps = re.findall(r'Epoch: \[7\] \[(\d+)/(\d+)\]', capsys.readouterr().out)
    assert steps == [('0', '3'), ('1', '3'), ('2', '3')]
    _epoch(batches[:5], print_freq=1, start_step=3)  # a resumed epoch: steps 3..7 of 8
    out = capsys.readouterr().out
    assert re.findall(r'\[(\d+)/(\d+)\]', out) == [(str(i), '8') for i in range(3, 8)] and 'Total time' in out
