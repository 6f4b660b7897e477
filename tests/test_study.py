"""The study grid: quick mode end to end, and resumption without retraining."""
from __future__ import annotations

import csv

import pytest

from tools import study


@pytest.mark.slow
def test_quick_grid_report_and_resume(tmp_path, monkeypatch, capsys):
    out, report = tmp_path / 'study', tmp_path / 'docs' / 'results.md'
    args = ['--quick', '--out', str(out), '--report', str(report)]
    assert study.main(args) == 0
    text = report.read_text()
    rows = list(csv.DictReader(open(report.with_suffix('.csv'))))
    assert {(r['loss'], r['seed']) for r in rows} == {('ce', '0'), ('maxsup', '0')}
    assert '| ce |' in text and '| maxsup |' in text and '## The paper' in text
    claims = text.split("## The paper's claims")[1].split('## Plots')[0]
    assert 'held' not in claims and 'no verdict' in claims  # one seed x one epoch supports none
    assert (report.with_suffix('') / 'acc1.png').stat().st_size > 0
    for r in rows:
        assert 0 <= float(r['acc1']) <= 100 and 0 <= float(r['ece']) <= 1
    # second invocation: every run is reused, nothing is trained again
    calls = []
    monkeypatch.setattr(study, 'run_training', lambda *a, **k: calls.append(a))
    capsys.readouterr()
    assert study.main(args) == 0
    assert calls == []
    assert 'study: 0 trained, 2 reused' in capsys.readouterr().out


def test_claims_verdicts_follow_the_numbers():
    rows = {'ls': [{'acc1': 90.0, 'train_d_within': 0.1, 'corrupt_ece': 0.2},
                   {'acc1': 91.0, 'train_d_within': 0.12, 'corrupt_ece': 0.22}],
            'maxsup': [{'acc1': 95.0, 'train_d_within': 0.3, 'corrupt_ece': 0.1},
                       {'acc1': 96.0, 'train_d_within': 0.32, 'corrupt_ece': 0.12}]}
    lines = study.claims(rows)
    assert all('held' in line and 'NOT held' not in line for line in lines), lines
    rows['maxsup'], rows['ls'] = rows['ls'], rows['maxsup']
    assert all('NOT held' in line for line in study.claims(rows))
    single = {k: v[:1] for k, v in rows.items()}  # one seed: no noise estimate, so no verdict at all
    assert all('single seed: no verdict' in line for line in study.claims(single)), study.claims(single)
