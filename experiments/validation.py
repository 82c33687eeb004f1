"""Validation score of a model on synthetic anomalies of held-out normal images.

``Validator(dataset)`` scores a model on a validation set (``self_sup_data.mvtec.
load_validation_set``: held-out normal training images, each as it is and with a defect of a kind
no training task draws) the way the evaluation scores a test set: image AUROC by the map's mean,
pixel AUROC and AU-PRO. The validation score is their mean (``SCORE_METRICS``); it chooses the
checkpoint (``--select best``) and the recipe (``--recipe search``) without a test image.
"""
import numpy as np

from experiments import metrics
from experiments.prediction import predict
from self_sup_data.layouts import names_sha256
from self_sup_data.validation import holdout_indices

SCORE_METRICS = ('image_auroc_mean', 'pixel_auroc', 'au_pro')


def validation_score(results):
    """Mean of the SCORE_METRICS of ``results`` (``metrics.evaluate_maps``)."""
    return float(np.mean([results[name] for name in SCORE_METRICS]))


def held_out_indices(files, meta, where):
    """Indices into ``files`` (a category's normal training files, in the order training reads
    them) of the images that the run of ``meta`` held out as its validation set ([] where it held
    out none). They are found again by index, so ``files`` must be the files the run read:
    ValueError naming the category and ``where`` (the data folder) when their number does not
    give the run's ``held_out`` images, or when the files it trained on have other names than the
    run's (``train_files_sha256``, where the meta has it)."""
    if not meta.get('held_out'):
        return []
    indices = holdout_indices(len(files), meta['validation_fraction'], meta['validation_seed'])
    if len(indices) != meta['held_out']:
        raise ValueError(f"the normal training images of {meta['category']!r} ({where}) are "
                         f"{len(files)}, which do not give the {meta['held_out']} images the model "
                         f"held out; are they the ones it was trained on?")
    held_out = set(indices)
    trained = [file for index, file in enumerate(files) if index not in held_out]
    if 'train_files_sha256' in meta and names_sha256(trained) != meta['train_files_sha256']:
        raise ValueError(f"the normal training images of {meta['category']!r} ({where}) are not the "
                         f"ones the model was trained on (other file names), so its held-out images "
                         f"cannot be told apart")
    return list(indices)


def describe_scores(scores):
    """One line for the log: the validation score and the metrics it averages."""
    return (f"validation score {scores['score']:.4f} (image AUROC {scores['image_auroc_mean']:.3f}, "
            f"pixel AUROC {scores['pixel_auroc']:.3f}, AU-PRO {scores['au_pro']:.3f})")


class Validator:
    """Scores a model on ``dataset`` every ``every`` epochs (and after the last one).

    ``validator(model) -> dict`` of floats: SCORE_METRICS and ``score`` (their mean); with
    ``per_kind``, also ``image_auroc_<kind>`` for each defect kind
    (``metrics.image_auroc_per_type``). ``flip_average``: score flip-averaged maps
    (``experiments.prediction.predict``; textures only). The model is left in eval mode; the caller
    switches it back to training.
    """

    def __init__(self, dataset, every=1, batch_size=32, flip_average=False):
        if int(every) < 1:
            raise ValueError(f"validation every must be a positive number of epochs, got {every!r}")
        self.dataset, self.every, self.batch_size = dataset, int(every), batch_size
        self.flip_average = flip_average

    def due(self, epoch, epochs):
        """Whether the validation runs after ``epoch`` (1-based) of ``epochs``."""
        return epoch % self.every == 0 or epoch == epochs

    def __call__(self, model, per_kind=False):
        device = next(model.parameters()).device
        maps, labels, masks = predict(model, self.dataset, self.batch_size, device,
                                      flip_average=self.flip_average)
        results = metrics.evaluate_maps(labels, maps, masks)
        scores = {name: float(results[name]) for name in SCORE_METRICS}
        scores['score'] = validation_score(results)
        if per_kind:
            kinds = metrics.image_auroc_per_type(self.dataset.defect_types, maps)
            scores.update({f'image_auroc_{kind}': value for kind, value in kinds.items()})
        return scores

    def __len__(self):
        return len(self.dataset)

