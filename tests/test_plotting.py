import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from experiments.plotting import plot_examples, plot_loss_curve, plot_map_comparison, plot_sample_grid

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
SIZE = 32


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert('L'))
    assert pixels.min() < pixels.max()  # something was drawn
    assert not list(path.parent.glob('.*.tmp'))


def make_images(rng, n, channels):
    return [rng.integers(0, 256, (SIZE, SIZE, channels), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize('channels', [1, pytest.param(3, marks=pytest.mark.slow)])
def test_plot_examples_writes_png(tmp_path, channels):
    rng = np.random.default_rng(0)
    masks = [np.zeros((SIZE, SIZE)), np.zeros((SIZE, SIZE, 1)), None]
    masks[1][8:16, 10:20] = 1
    maps = [rng.random((SIZE, SIZE)).astype(np.float32) for _ in range(3)]
    path = plot_examples(make_images(rng, 3, channels), masks, maps, ['good', 'crack', 'no mask'],
                         tmp_path / 'figs' / 'examples.png')
    assert path == tmp_path / 'figs' / 'examples.png'
    assert_png(path)


@pytest.mark.slow
def test_plot_map_comparison_writes_png_with_a_row_per_model(tmp_path):
    rng = np.random.default_rng(3)
    masks = [None, np.zeros((SIZE, SIZE))]
    masks[1][4:12, 4:12] = 1
    rows = {'model a': [rng.random((SIZE, SIZE)) for _ in range(2)],
            'model b': [np.full((SIZE, SIZE), 0.5), np.zeros((SIZE, SIZE, 1))]}
    path = plot_map_comparison(make_images(rng, 2, 1), masks, rows, ['good', 'crack'],
                               tmp_path / 'compare.png')
    assert_png(path)
    one_row = plot_map_comparison(make_images(rng, 2, 1), masks, {'a': rows['model a']},
                                  ['good', 'crack'], tmp_path / 'one.png')
    with Image.open(path) as two_models, Image.open(one_row) as one_model:
        assert two_models.height > one_model.height  # a row of heatmaps per model
    with pytest.raises(ValueError, match='equal length'):
        plot_map_comparison(make_images(rng, 2, 1), masks, {'a': rows['model a'][:1]},
                            ['good', 'crack'], tmp_path / 'bad.png')


@pytest.mark.slow
def test_plot_sample_grid_and_loss_curve_write_png(tmp_path):
    rng = np.random.default_rng(1)
    labels = [rng.random((SIZE, SIZE, 1)) for _ in range(2)]
    preds = [rng.random((1, SIZE, SIZE)) for _ in range(2)]
    assert_png(plot_sample_grid(make_images(rng, 2, 3), labels, preds, tmp_path / 'grid.png'))
    assert_png(plot_loss_curve([0.7, 0.3, 0.2, 0.15], tmp_path / 'loss.png'))
    assert_png(plot_loss_curve([0.5], tmp_path / 'one_epoch.png'))


def test_plotting_rejects_bad_input(tmp_path):
    rng = np.random.default_rng(2)
    images = make_images(rng, 2, 3)
    with pytest.raises(ValueError, match='equal length'):
        plot_examples(images, [None], [np.zeros((SIZE, SIZE))] * 2, ['a', 'b'], tmp_path / 'x.png')
    with pytest.raises(ValueError, match='uint8'):
        plot_sample_grid([image.astype(float) for image in images], [np.zeros((SIZE, SIZE))] * 2,
                         [np.zeros((SIZE, SIZE))] * 2, tmp_path / 'x.png')
    with pytest.raises(ValueError, match='losses'):
        plot_loss_curve([], tmp_path / 'x.png')
    assert not (tmp_path / 'x.png').exists()


@pytest.mark.slow
def test_plot_examples_without_any_mask_has_no_ground_truth_row(tmp_path):
    rng = np.random.default_rng(1)
    maps = [rng.random((SIZE, SIZE)).astype(np.float32) for _ in range(2)]
    images = make_images(rng, 2, 1)
    with_masks = plot_examples(images, [None, np.zeros((SIZE, SIZE))], maps, ['a', 'b'], tmp_path / 'with.png')
    without = plot_examples(images, [None, None], maps, ['a', 'b'], tmp_path / 'without.png')
    assert_png(without)
    heights = [Image.open(path).size[1] for path in (with_masks, without)]
    assert heights[1] == pytest.approx(heights[0] * 2 / 3, abs=2)  # two rows of panels instead of three


@pytest.mark.slow
def test_evaluation_figure_of_a_category_without_masks_has_no_ground_truth_row(tmp_path):
    from conftest import make_mvtec_category
    from experiments.plotting import plot_test_examples
    from self_sup_data.mvtec import SelfSupMVTecDataset
    heights = []
    for with_masks in (True, False):
        make_mvtec_category(tmp_path / str(with_masks), 'tiny', size=SIZE, with_masks=with_masks)
        dataset = SelfSupMVTecDataset(tmp_path / str(with_masks), 'tiny', is_train=False, low_res=SIZE,
                                      allow_missing_masks=True)
        maps = np.random.default_rng(0).random((len(dataset), SIZE, SIZE)).astype(np.float32)
        path = plot_test_examples(dataset, maps, tmp_path / f'{with_masks}.png')
        heights.append(Image.open(path).size[1])
    assert heights[1] == pytest.approx(heights[0] * 2 / 3, abs=2)


def test_figures_show_full_masks_raw_labels_and_dollar_names_as_they_are(tmp_path, monkeypatch):
    from experiments import plotting
    figures = []
    monkeypatch.setattr(plotting, '_save', lambda fig, path: figures.append(fig))
    rng = np.random.default_rng(4)
    full, border = np.ones((SIZE, SIZE)), np.zeros((SIZE, SIZE))
    border[:, :8] = 1  # a defect along the left edge
    plot_examples(make_images(rng, 2, 1), [full, border], [rng.random((SIZE, SIZE))] * 2,
                  ['scratch_$_$', 'price$tag$'], tmp_path / 'x.png')
    FigureCanvasAgg(figures[-1]).draw()  # a '$' of a defect type's folder name is text, not TeX
    axes = figures[-1].axes
    assert [axes[i].get_title() for i in (0, 1)] == ['scratch_$_$', 'price$tag$']
    outlines = [np.concatenate([path.vertices for path in collection.get_paths()])
                for collection in axes[2].collections]  # the ground truth of the fully defective image
    assert len(outlines) == 1 and outlines[0][:, 0].min() < 0 and outlines[0][:, 0].max() > SIZE - 1
    assert axes[2].get_xlim() == (-0.5, SIZE - 0.5) and axes[2].get_ylim() == (SIZE - 0.5, -0.5)
    left = np.concatenate([path.vertices for path in axes[3].collections[0].get_paths()])
    assert left[:, 0].min() < 0  # the image's edge is part of the defect's outline
    # Shift-Raw-Intensity's labels are grey-level changes: shown on their own scale, not cut at 1
    raw = [np.zeros((SIZE, SIZE)), np.full((SIZE, SIZE), 12.0)]
    plot_sample_grid(make_images(rng, 2, 1), raw, [np.zeros((SIZE, SIZE))] * 2, tmp_path / 'y.png')
    assert {image.get_clim() for ax in figures[-1].axes[2:] for image in ax.get_images()} == {(0.0, 12.0)}
    plot_sample_grid(make_images(rng, 2, 1), [np.zeros((SIZE, SIZE))] * 2, [np.full((SIZE, SIZE), 0.3)] * 2,
                     tmp_path / 'z.png')
    assert {image.get_clim() for ax in figures[-1].axes[2:] for image in ax.get_images()} == {(0.0, 1.0)}
