"""The evaluation notebooks run end to end (nbclient) on tiny generated data and checkpoints.

The parameters cell (tagged 'parameters') is replaced by one that points at the generated
data; everything else runs as a user would run it, from the repository root.
"""
import ast
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import make_chest_test_set, make_mvtec_category, save_checkpoint
from experiments import metrics, mvtec_tasks

REPO = Path(__file__).resolve().parents[1]


def parameter_names(source):
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets}


def run_notebook(name, parameters, monkeypatch):
    """Execute notebook ``name`` with its parameters cell replaced -> the executed notebook."""
    notebook = nbformat.read(REPO / name, as_version=4)
    cells = [cell for cell in notebook.cells if 'parameters' in cell.metadata.get('tags', [])]
    assert len(cells) == 1, f'{name} needs exactly one cell tagged "parameters"'
    assert parameter_names(cells[0].source) == set(parameters), 'the test sets every parameter'
    cells[0].source = '\n'.join(f'{key} = {value!r}' for key, value in parameters.items())
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # tiny models; a shared machine
    NotebookClient(notebook, timeout=120, kernel_name='python3',
                   resources={'metadata': {'path': str(REPO)}}).execute()
    return notebook


def outputs(notebook, mime):
    """The outputs of type ``mime`` ('text/markdown', 'image/png', ...), or the streams' text ('stream')."""
    found = []
    for cell in notebook.cells:
        for output in cell.get('outputs', []):
            if mime == 'stream' and output.output_type == 'stream':
                found.append(output.text)
            elif mime in output.get('data', {}):
                found.append(output.data[mime])
    return found


def assert_clean_run(notebook):
    """No errors and no missing-checkpoint warnings printed by any cell."""
    streams = ''.join(outputs(notebook, 'stream'))
    assert not any(word in streams for word in ('Error', 'Traceback', 'no checkpoint')), streams


@pytest.mark.slow  # runs the notebook in a kernel
def test_mvtec_notebook(tmp_path, monkeypatch):
    data_dir, model_dir, out_dir = tmp_path / 'data', tmp_path / 'models', tmp_path / 'out'
    make_mvtec_category(data_dir, 'tiles', size=64)
    save_checkpoint(model_dir, 'Shift-Intensity-M-3', 'tiles', 'texture', seed=3)
    notebook = run_notebook('mvtec_evaluation.ipynb', dict(
        MODEL_DIR=str(model_dir), DATA_DIR=str(data_dir), SETTINGS=None, CATEGORIES=['tiles'],
        PAPER_LAYOUT=False, FLIP_AVERAGE=True, ONE_CLASS=None, ALLOW_MISSING_MASKS=False,
        OUT_DIR=str(out_dir), DEVICE='cpu'), monkeypatch)
    assert_clean_run(notebook)
    results = pd.read_csv(out_dir / 'results.csv')
    averaged, plain = (mvtec_tasks.evaluate_checkpoints(model_dir, data_dir, flip_average=flip)[0]
                       for flip in (True, False))  # threads differ: float sums differ slightly
    assert results.loc[0, 'au_pro'] == pytest.approx(averaged['au_pro'], rel=1e-4)
    assert results.loc[0, 'au_pro'] != pytest.approx(plain['au_pro'], rel=1e-4)
    headings = outputs(notebook, 'text/markdown')
    assert '### image_auroc_mean' in headings and '### au_pro' in headings
    tables = [html for html in outputs(notebook, 'text/html') if 'Shift-Intensity-M' in html]
    expected = mvtec_tasks.METRICS + metrics.THRESHOLD_METRICS  # the model's own maps get both
    assert len(tables) == len(expected) and all('tiles' in html for html in tables)
    assert all(f'### {metric}' in headings for metric in expected)
    assert (out_dir / 'tables' / 'au_pro.md').is_file()
    assert [p.name for p in (out_dir / 'figures').iterdir()] == ['tiles_Shift-Intensity-M.png']
    assert len(outputs(notebook, 'image/png')) == 1


@pytest.mark.slow  # runs the notebook in a kernel
def test_chestxray_notebook(tmp_path, monkeypatch):
    model_dir, data_dir, normal, anomalous, boxes = make_chest_test_set(tmp_path, seeds=(1,))
    out_dir = tmp_path / 'out'
    notebook = run_notebook('chestxray_evaluation.ipynb', dict(
        MODEL_DIR=str(model_dir), DATA_DIR=str(data_dir), NORMAL_LIST=str(normal),
        ANOMALOUS_LIST=str(anomalous), BBOX_CSV=str(boxes), SETTINGS=['Shift'], TEST_NAME=None,
        OUT_DIR=str(out_dir), DEVICE='cpu'), monkeypatch)
    assert_clean_run(notebook)
    headings = outputs(notebook, 'text/markdown')
    assert '### image_auroc_mean' in headings and '### pixel_auroc' in headings  # boxes given
    row = Path(anomalous).stem  # the default row name, as on the command line
    assert sum(row in html for html in outputs(notebook, 'text/html')) == 5
    assert (out_dir / 'results.csv').is_file() and len(outputs(notebook, 'image/png')) == 1
    assert [p.name for p in (out_dir / 'figures').iterdir()] == [f'{row}_Shift.png']


@pytest.mark.slow  # runs the notebook in a kernel
def test_chestxray_notebook_warns_of_seeds_merged_from_another_model_folder(tmp_path, monkeypatch):
    """Two model folders evaluated one after the other into one OUT_DIR: the second run's tables merge
    its seed with the first folder's, and the notebook says so as the command line does."""
    model_dir, data_dir, normal, anomalous, _ = make_chest_test_set(tmp_path, seeds=(1, 2))
    other = tmp_path / 'other_models' / 'shift' / 'chest_xray'
    other.mkdir(parents=True)
    (model_dir / 'shift' / 'chest_xray' / 'final_chest_xray_shift_2.pt').rename(other / 'final_chest_xray_shift_2.pt')
    streams = []
    for models in (model_dir, tmp_path / 'other_models'):
        notebook = run_notebook('chestxray_evaluation.ipynb', dict(
            MODEL_DIR=str(models), DATA_DIR=str(data_dir), NORMAL_LIST=str(normal), ANOMALOUS_LIST=str(anomalous),
            BBOX_CSV=None, SETTINGS=None, TEST_NAME=None, OUT_DIR=str(tmp_path / 'out'), DEVICE='cpu'), monkeypatch)
        streams.append(''.join(outputs(notebook, 'stream')))
    assert 'outside' not in streams[0]
    assert ("the tables merge this evaluation's seeds with earlier results of models outside "
            f"{tmp_path / 'other_models'}: seed 1") in streams[1]


@pytest.mark.slow  # runs the notebook in a kernel
@pytest.mark.parametrize('name', ['mvtec_evaluation.ipynb', 'chestxray_evaluation.ipynb'])
def test_a_notebook_whose_every_evaluation_failed_keeps_the_earlier_files(name, tmp_path, monkeypatch):
    out_dir = tmp_path / 'out'
    if name == 'mvtec_evaluation.ipynb':
        data_dir, model_dir = tmp_path / 'data', tmp_path / 'models'
        make_mvtec_category(data_dir, 'tiles', size=64)
        save_checkpoint(model_dir, 'Shift-Intensity-M-3', 'tiles', 'texture', seed=3)
        parameters = dict(MODEL_DIR=str(model_dir), DATA_DIR=str(data_dir), SETTINGS=None, CATEGORIES=None,
                          PAPER_LAYOUT=False, FLIP_AVERAGE=False, ONE_CLASS=None, ALLOW_MISSING_MASKS=False,
                          OUT_DIR=str(out_dir), DEVICE='cpu')
    else:
        model_dir, data_dir, normal, anomalous, boxes = make_chest_test_set(tmp_path, seeds=(1,))
        parameters = dict(MODEL_DIR=str(model_dir), DATA_DIR=str(data_dir), NORMAL_LIST=str(normal),
                          ANOMALOUS_LIST=str(anomalous), BBOX_CSV=None, SETTINGS=None, TEST_NAME='tiny',
                          OUT_DIR=str(out_dir), DEVICE='cpu')
    (tmp_path / 'a_file').write_text('not a folder')  # an OUT_DIR that cannot be one: refused before any work
    with pytest.raises(CellExecutionError, match='cannot write to output folder .*a_file is a file'):
        run_notebook(name, parameters | dict(OUT_DIR=str(tmp_path / 'a_file')), monkeypatch)
    [checkpoint] = Path(model_dir).rglob('final_*.pt')
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # every evaluation fails
    earlier = {out_dir / 'results.csv': b'earlier results', out_dir / 'tables' / 'au_pro.md': b'earlier table',
               out_dir / 'figures' / 'tiles_Shift-Intensity-M.png': b'earlier figure'}
    for path, content in earlier.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    with pytest.raises(CellExecutionError, match='nothing was evaluated: every evaluation failed') as stop:
        run_notebook(name, parameters, monkeypatch)
    assert f'cannot read checkpoint {checkpoint}' in str(stop.value)  # report_problems named it
    assert all(path.read_bytes() == content for path, content in earlier.items())


@pytest.mark.parametrize('name', ['mvtec_evaluation.ipynb', 'chestxray_evaluation.ipynb'])
def test_notebooks_are_stored_without_outputs(name):
    notebook = nbformat.read(REPO / name, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get('outputs') and cell.get('execution_count') is None
               for cell in notebook.cells if cell.cell_type == 'code')
