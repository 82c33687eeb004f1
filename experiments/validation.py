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

SCORE_METRICS = ('image_auroc_mean', 'pixel_auroc', 'au_pro')


def validation_score(results):
    """Mean of the SCORE_METRICS of ``results`` (``metrics.evaluate_maps``)."""
    return float(np.mean([results[name] for name in SCORE_METRICS]))


def describe_scores(scores):
    """One line for the log: the validation score and the metrics it averages."""
    return (f"validation score {scores['score']:.4f} (image AUROC {scores['image_auroc_mean']:.3f}, "
            f"pixel AUROC {scores['pixel_auroc']:.3f}, AU-PRO {scores['au_pro']:.3f})")


class Validator:
    """Scores a model on ``dataset`` every ``every`` epochs (and after the last one).

    ``validator(model) -> dict`` of floats: SCORE_METRICS and ``score`` (their mean); with
    ``per_kind``, also ``image_auroc_<kind>`` for each defect kind
    (``metrics.image_auroc_per_type``). The model is left in eval mode; the caller switches it
    back to training.
    """

    def __init__(self, dataset, every=1, batch_size=32):
        if int(every) < 1:
            raise ValueError(f"validation every must be a positive number of epochs, got {every!r}")
        self.dataset, self.every, self.batch_size = dataset, int(every), batch_size

    def due(self, epoch, epochs):
        """Whether the validation runs after ``epoch`` (1-based) of ``epochs``."""
        return epoch % self.every == 0 or epoch == epochs

    def __call__(self, model, per_kind=False):
        device = next(model.parameters()).device
        maps, labels, masks = predict(model, self.dataset, self.batch_size, device)
        results = metrics.evaluate_maps(labels, maps, masks)
        scores = {name: float(results[name]) for name in SCORE_METRICS}
        scores['score'] = validation_score(results)
        if per_kind:
            kinds = metrics.image_auroc_per_type(self.dataset.defect_types, maps)
            scores.update({f'image_auroc_{kind}': value for kind, value in kinds.items()})
        return scores

    def __len__(self):
        return len(self.dataset)

