"""Checkpoint formats, metrics against hand-computed values, and every analysis subcommand end to end."""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from data.io import CheckpointError
from deit.releases import load_model, read_state_dict
from deit.main import cli
from deit.models import create_model
from tests.conftest import TINY

class Foreign:
    """An arbitrary pickled object: loading it would execute code, so it must be refused."""


X224 = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def deit_release(tmp_path_factory):
    """A DeiT-S checkpoint in the release format: DeiT main.py's dict with an argparse.Namespace."""
    torch.manual_seed(0)
    model = create_model('deit_small_patch16_224', 1000).eval()
    sd = model.state_dict()
    path = tmp_path_factory.mktemp('rel') / 'deit_s_maxsup.pth'
    args = argparse.Namespace(model='deit_small_patch16_224', input_size=224, nb_classes=1000, lr=5e-4,
                              batch_size=128, loss='maxsup', data_path='/datasets/imagenet')
    torch.save({'model': sd, 'optimizer': {'state': {}, 'param_groups': []}, 'lr_scheduler': {'base_values': [1e-3]},
                'epoch': 299, 'args': args, 'model_ema': {k: v.clone() for k, v in sd.items()},
                'scaler': {'scale': 65536.0}}, path)
    return path, model


def test_deit_release_loads_and_matches(deit_release):
    path, src = deit_release
    model, info = load_model(path)
    assert info['model'] == 'deit_small_patch16_224' and info['format'] == 'deit' and info['num_classes'] == 1000
    assert info['missing'] == [] and info['unexpected'] == [] and info['args']['loss'] == 'maxsup'
    with torch.no_grad():
        assert torch.allclose(model(X224), src(X224), atol=1e-5)
    ema, _ = load_model(path, use_ema=True)
    assert torch.equal(ema.cls_token, src.cls_token)


def test_resnet50_ddp_prefixed_torchvision_state_dict(tmp_path):
    tv = torchvision.models.resnet50().eval()  # torchvision key names, as the HF ResNet-50 release
    nested = {'state_dict': {f'module.{k}': v for k, v in tv.state_dict().items()}}
    torch.save(nested, tmp_path / 'resnet50_maxsup.pth')
    model, info = load_model(tmp_path / 'resnet50_maxsup.pth')
    assert info['model'] == 'resnet50' and info['format'] == 'nested'
    with torch.no_grad():
        assert torch.allclose(model(X224), tv(X224), atol=1e-4)
    # wrong class count: clear error, or a fresh head when asked
    with pytest.raises(CheckpointError, match='1000 classes, 10 were asked for'):
        load_model(tmp_path / 'resnet50_maxsup.pth', num_classes=10)
    m10, info10 = load_model(tmp_path / 'resnet50_maxsup.pth', num_classes=10, reset_head=True)
    assert info10['head_reset'] and m10.fc.out_features == 10
    assert torch.equal(m10.layer4[2].conv3.weight, tv.layer4[2].conv3.weight)


def test_own_checkpoint_safetensors_export_and_cli(tmp_path, capsys):
    assert cli(TINY + ['--data-set', 'DEMO', '--epochs', '1', '--max-steps-per-epoch', '1',
                       '--output_dir', str(tmp_path / 'run')]) == 0
    ck = tmp_path / 'run' / 'checkpoint.pth'
    model, info = load_model(ck)
    assert info['model'] == 'deit_demo_patch4_32' and info['input_size'] == 32 and info['num_classes'] == 10
    from tools.load_checkpoint import main
    assert main([str(ck), '--export', str(tmp_path / 'w.safetensors')]) == 0
    meta = json.loads((tmp_path / 'w.json').read_text())
    assert meta['model'] == 'deit_demo_patch4_32' and meta['args']['loss'] == 'maxsup'
    m2, info2 = load_model(tmp_path / 'w.safetensors', model_name='deit_demo_patch4_32')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m2(x), model(x))
    assert info2['format'] == 'safetensors'
    assert main([str(ck), '--num-classes', '3']) == 2
    assert '10 classes, 3 were asked for; pass --reset-head to start a new head' in capsys.readouterr().err
    from tools.analyze import main as analyze_main
    from tools.evaluate import main as evaluate_main
    for tool in (evaluate_main, analyze_main):  # they only evaluate: no reset offered, and none they lack
        argv = ['--num-classes', '3', '--data-set', 'DEMO']
        assert tool([str(ck), *argv] if tool is evaluate_main else ['logits', '--ckpt', str(ck), *argv]) == 2
        err = capsys.readouterr().err
        assert '10 classes, 3 were asked for; its head cannot score other classes: drop --num-classes' in err
        assert '--reset-head' not in err


def test_bad_checkpoint_files(tmp_path, deit_release):
    path, _ = deit_release
    (tmp_path / 'trunc.pth').write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match='trunc.pth: cannot read checkpoint'):
        read_state_dict(tmp_path / 'trunc.pth')
    (tmp_path / 'foreign.pth').write_bytes(pickle.dumps({'model': Foreign()}))
    with pytest.raises(CheckpointError, match='foreign.pth: not a plain checkpoint'):
        read_state_dict(tmp_path / 'foreign.pth')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='expected a dict of weights, got list'):
        read_state_dict(tmp_path / 'list.pth')
    torch.save({'epoch': 3}, tmp_path / 'noweights.pth')
    with pytest.raises(CheckpointError, match='no weights found'):
        read_state_dict(tmp_path / 'noweights.pth')
    (tmp_path / 'x.safetensors').write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match='cannot read safetensors'):
        read_state_dict(tmp_path / 'x.safetensors')
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / 'missing.pth')


# ---------------------------------------------------------------- analysis subcommands
@pytest.fixture(scope='module')
def two_runs(tiny_imagefolder, tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    paths = {}
    for loss in ('ls', 'maxsup'):
        assert cli(TINY + ['--data-set', 'FOLDER', '--data-path', str(tiny_imagefolder), '--epochs', '1',
                           '--loss', loss, '--max-steps-per-epoch', '2', '--output_dir', str(root / loss)]) == 0
        paths[loss] = root / loss / 'checkpoint.pth'
    return paths


@pytest.mark.parametrize('command,files', [
    ('logits', {'logits.png', 'logits.json', 'logits_per_sample.json'}),
    ('features', {'features.json', 'features.md', 'features.png'}),
    ('transfer', {'transfer.json', 'transfer.png'}),
    ('gradcam', {'gradcam.png', 'gradcam.json', 'gradcam_maps.npz'}),
    ('projection', {'projection.png', 'projection.json'}),
])
def test_analyze_subcommands_end_to_end(command, files, two_runs, tiny_imagefolder, tmp_path):
    from tools.analyze import main
    args = [command, '--ckpt', f'ls={two_runs["ls"]}', '--ckpt', f'maxsup={two_runs["maxsup"]}',
            '--data-path', str(tiny_imagefolder), '--out', str(tmp_path), '--num-workers', '0', '--num-images', '3',
            '--transfer-data', str(tiny_imagefolder)]
    assert main(args) == 0
    out = tmp_path / command
    assert files <= {p.name for p in out.iterdir()}
    assert all((out / f).stat().st_size > 0 for f in files)
    res = json.loads((out / f'{command}.json').read_text())
    runs = res['mean_activation'] if command == 'gradcam' else res  # gradcam: per-image lists + per-model maps
    assert set(runs) == {'ls', 'maxsup'}
    if command == 'features':
        assert 0 <= res['maxsup']['val']['d_within'] <= 2 and res['maxsup']['train']['n'] == 64
    if command == 'transfer':
        assert 0 <= res['ls']['test_accuracy'] <= 1
    assert all((out / f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' for f in files if f.endswith('.png'))


def test_gradcam_explains_the_label_or_the_prediction(two_runs, tiny_imagefolder, tmp_path):
    """--cam-target prediction: the maps of the predicted classes (the official Deit/evaluate.py, targets=None);
    label (default): the image's own class. Equal where the model is right; another class's map otherwise."""
    import numpy as np

    from deit.analysis import gradcam_maps
    from deit.models import create_model
    from tools.analyze import main
    maps, res = {}, {}
    for target in ('label', 'prediction'):
        assert main(['gradcam', '--ckpt', f'ls={two_runs["ls"]}', '--data-path', str(tiny_imagefolder), '--out',
                     str(tmp_path / target), '--num-workers', '0', '--num-images', '8', '--cam-target', target]) == 0
        maps[target] = np.load(tmp_path / target / 'gradcam' / 'gradcam_maps.npz')['ls']
        res[target] = json.loads((tmp_path / target / 'gradcam' / 'gradcam.json').read_text())
    right = [i for i, (y, (p, _)) in enumerate(zip(res['label']['labels'], res['label']['predictions']['ls']))
             if y == p]
    assert right and np.allclose(maps['label'][right], maps['prediction'][right], atol=1e-6)
    torch.manual_seed(0)  # an untrained model: targets=None is its argmax, and another class maps elsewhere
    model, x = create_model('deit_demo_patch4_32', 4, input_size=32).eval(), torch.randn(4, 3, 32, 32)
    predicted = model(x).argmax(1).tolist()
    none = gradcam_maps(model, x.clone(), None)
    assert np.allclose(none, gradcam_maps(model, x.clone(), predicted), atol=1e-6)
    assert not np.allclose(none, gradcam_maps(model, x.clone(), [(p + 1) % 4 for p in predicted]), atol=1e-3)


def test_evaluate_cli_writes_metrics_and_reliability(two_runs, tiny_imagefolder, tmp_path):
    from tools.evaluate import main
    assert main([str(two_runs['maxsup']), '--data-path', str(tiny_imagefolder), '--out', str(tmp_path),
                 '--num-workers', '0']) == 0
    m = json.loads((tmp_path / 'metrics.json').read_text())
    assert {'acc1', 'acc5', 'nll', 'ece', 'reliability'} <= set(m) and m['n'] == 24
    ck = torch.load(two_runs['maxsup'], weights_only=False)
    logged = json.loads((two_runs['maxsup'].parent / 'log.txt').read_text().splitlines()[-1])
    assert m['acc1'] == pytest.approx(logged['test_acc1']) and ck['epoch'] == 0
    assert (tmp_path / 'reliability.png').read_bytes()[:4] == b'\x89PNG'


def test_figures_show_their_numbers_from_zero(monkeypatch, tmp_path):
    """Bars start at 0 with their values printed (no offset axis for tied values), calibration bins carry
    their counts, the projection says what its markers are, feature metrics of other scales get own panels."""
    from tools import plots
    figs = []
    monkeypatch.setattr(plots, '_save', lambda fig, path: figs.append(fig) or Path(path))
    plots.bar_table({'a': [50.0], 'b': [50.0]}, 'tied', tmp_path / 'x.png')
    ax = figs[-1].axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert ax.get_ylim()[0] == 0 and labels == ['50', '50'] and ax.yaxis.get_offset_text().get_text() == ''
    plots.bar_table({'ce': [97.0, 98.0], 'maxsup': [98.0, 98.5]}, 'top-1', tmp_path / 'x.png')
    assert [t.get_text() for t in figs[-1].axes[0].texts] == ['97.5 ± 0.5', '98.25 ± 0.25']
    plots.reliability_diagram({'n_bins': 3, 'accuracy': [None, 0.5, 1.0], 'confidence': [None, 0.5, 0.9],
                               'count': [0.0, 4.0, 12.0]}, tmp_path / 'r.png')
    assert [t.get_text() for t in figs[-1].axes[0].texts] == ['', '4', '12']
    pts = np.array([[1.0, 1.0], [1.2, 0.9], [5.0, 5.0], [0.0, 6.0]])
    plots.projection_figure({'m': {'points': pts, 'labels': np.array([0, 0, 1, 2]), 'classes': [0, 1, 2],
                                   'templates': np.array([[0.0, 0.0], [0.01, 0.0], [0.0, 0.01]])}}, tmp_path / 'p.png')
    legend = [t.get_text() for t in figs[-1].axes[0].get_legend().get_texts()]
    assert 'class mean' in legend and any(t.startswith('template (x') for t in legend)
    table = {'m': {'train': {'d_within': 1e-4, 'r2': 0.9}, 'val': {'d_within': 2e-4, 'r2': 0.8}}}
    plots.feature_figure(table, tmp_path / 'f.png')
    assert [a.get_ylabel().split()[0] for a in figs[-1].axes] == ['d_within', 'R²']


def test_wilson_interval():
    from tools.mutation_report import wilson
    assert wilson(0, 10)[0] == pytest.approx(0, abs=1e-12) and wilson(0, 10)[1] == pytest.approx(100 * 3.8416 / 13.8416)
    assert wilson(10, 10)[0] == pytest.approx(100 * 10 / 13.8416) and wilson(10, 10)[1] == pytest.approx(100)
    low, high = wilson(57, 60)
    assert 86 < low < 87 and 98 < high < 99  # 95 % of 60 mutants: about 86.3 to 98.3 %


@pytest.mark.static  # mutates the project's source, which a mutation run has already rewritten
def test_mutation_sample_is_seeded_uniform_and_leaves_equivalents_out(tmp_path):
    from tools import mutation_sample
    every = mutation_sample.mutant_names('data/skip.py')
    assert every and all(n.startswith('data.skip.x') and '__mutmut_' in n for n in every)
    eq = {every[0]: 'why'}
    a = mutation_sample.sample(['data/skip.py'], 10, 0, eq)
    assert len(a) == 10 == len(set(a)) and set(a) <= set(every) - {every[0]}
    assert a == mutation_sample.sample(['data/skip.py'], 10, 0, eq)  # seeded
    assert a != mutation_sample.sample(['data/skip.py'], 10, 1, eq)
    assert sorted(mutation_sample.sample(['data/skip.py'], 10 ** 6, 0, eq)) == sorted(set(every) - {every[0]})
    both = mutation_sample.sample(['data/map_file.py', 'data/skip.py'], 10, 0, eq)
    assert both == mutation_sample.sample(['data/map_file.py'], 10, 0, eq) + a  # one module at a time: the same draw
    with pytest.raises(SystemExit):
        mutation_sample.main(['deit/not_mutated.py', '--per-module', '3'])


def test_mutation_report_scores_the_run_and_keeps_earlier_measurements_of_modules_not_run_in_full(tmp_path,
                                                                                           monkeypatch):
    from tools import mutation_report
    monkeypatch.setattr(mutation_report, 'MODULES', ('deit/a.py', 'data/b.py'))
    (tmp_path / 'mutants' / 'deit').mkdir(parents=True)
    (tmp_path / 'mutants' / 'data').mkdir()
    codes = {'deit.a.x_f__mutmut_1': 1, 'deit.a.x_f__mutmut_2': 0, 'deit.a.x_f__mutmut_3': 1,
             'deit.a.x_f__mutmut_4': -24, 'deit.a.x_f__mutmut_5': 0, 'deit.a.x_f__mutmut_6': None}
    (tmp_path / 'mutants' / 'deit' / 'a.py.meta').write_text(json.dumps({'exit_code_by_key': codes}))
    (tmp_path / 'mutants' / 'data' / 'b.py.meta').write_text(json.dumps({'exit_code_by_key': {'data.b.x_g__mutmut_1':
                                                                                               None}}))
    (tmp_path / 'eq.txt').write_text('deit.a.x_f__mutmut_5  the same bytes either way\n')
    header = ('| module | mutants | killed | survived | no tests | not run | equivalent | score |\n'
              '|---|---|---|---|---|---|---|---|\n')
    (tmp_path / 'old.md').write_text(  # a report of a partial run, which kept the measurements before it
        f'# Mutation testing\n\n{header}| `deit/a.py` | 5 | 1 | 3 | 0 | 0 | 1 | 25.0 % |\n'
        '| `data/b.py` | 1 | 0 | 0 | 0 | 1 | 0 | not run yet |\n\nScore = ...\n\n## Earlier measurements\n\n'
        f'{header}| `data/b.py` | 9 | 8 | 0 | 0 | 0 | 1 | 100.0 % |\n'
        '| `deit/old.py` | 4 | 4 | 0 | 0 | 0 | 0 | 100.0 % |\n')
    out = tmp_path / 'report.md'
    assert mutation_report.main(['--mutants', str(tmp_path / 'mutants'), '--equivalent', str(tmp_path / 'eq.txt'),
                                 '--out', str(out), '--previous', str(tmp_path / 'old.md')]) == 0
    text = out.read_text()
    # 3 killed (a timeout too) of 4; one not run, so the interval of 3/4
    assert '| `deit/a.py` | 6 | 3 | 1 | 0 | 1 | 1 | 75.0 % (95 %: 30–95 %) |' in text
    assert '| `data/b.py` | 1 | 0 | 0 | 0 | 1 | 0 | not run yet |' in text
    assert '- `deit.a.x_f__mutmut_2 (survived)`' in text and '`deit.a.x_f__mutmut_5`: the same bytes' in text
    earlier = [line for line in text.split('## Earlier measurements')[1].split('\n## ')[0].splitlines()
               if line.startswith('| `')]
    assert earlier == ['| `deit/a.py` | 5 | 1 | 3 | 0 | 0 | 1 | 25.0 % |',  # a.py ran in part this time
                       '| `data/b.py` | 9 | 8 | 0 | 0 | 0 | 1 | 100.0 % |',  # from two reports back
                       '| `deit/old.py` | 4 | 4 | 0 | 0 | 0 | 0 | 100.0 % |']  # a module of its time
