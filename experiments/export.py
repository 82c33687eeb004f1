"""Export a trained model for deployment: ONNX (ONNX Runtime; ``predict.py --onnx``) or TorchScript.

    python -m experiments.export -m MODEL.pt --format onnx|torchscript [-o OUT] [--dynamic-size]

The exported network is ``experiments.torch_model.ImageInputModel``: input ``images``, a uint8
batch ``N x C x H x W`` of values 0..255 (C: the model's channels), prepared as
``experiments.inference`` prepares it (resized to the model's side, then the central crop for
objects and chest X-rays or reflect padding to a multiple of 32 for textures); the normalisation and the final
activation (NSA's sigmoid) are inside; output ``maps``, float32 ``N x 1 x H x W``. The batch size
is dynamic. The image size of an ONNX file is the model's input size (``input_size``) unless
``--dynamic-size`` (any multiple of 32); a TorchScript file takes any multiple of 32. Neither of
the two refuses other sides: they give maps of the next multiples' size (pad the images to
multiples of 32 first, as ``experiments.inference`` does).

The preparation spec and the thresholds (``experiments.inference``; calibrate before exporting)
are stored as JSON: in the ONNX file's metadata_props under ``nsa_spec``
(``experiments.detector.SPEC_KEY``), in the TorchScript file as the extra file
``nsa_spec.json``. Files are written atomically. The ``onnx`` package is needed for the ONNX
format only.
"""
import argparse
import io
import json
import warnings
from pathlib import Path

import torch

from experiments.arguments import one_line_warnings, path_argument
from experiments.atomic import write_atomic
from experiments.checkpoints import TORCHSCRIPT_SUFFIX
from experiments.cli import exit_on_input_error, exit_on_interrupt
from experiments.detector import SPEC_KEY
from experiments.torch_model import load_checkpoint

PROG = 'python -m experiments.export'
FORMATS = {'onnx': '.onnx', 'torchscript': TORCHSCRIPT_SUFFIX}
OPSET = 17
EXAMPLE_BATCH = 2


def input_size(spec):
    """The side of the network's input: the crop (objects, chest X-rays) or the side rounded up to a multiple
    of ``spec['size_multiple']`` (textures)."""
    if spec['crop'] is not None:
        return spec['crop']
    return -(-spec['side'] // spec['size_multiple']) * spec['size_multiple']


def _example(spec):
    size = input_size(spec)
    return torch.zeros((EXAMPLE_BATCH, spec['channels'], size, size), dtype=torch.uint8)


def onnx_bytes(module, spec, dynamic_size=False):
    """The ONNX model (bytes) of ``module`` (an ImageInputModel) with ``spec`` in its metadata."""
    import onnx  # only the ONNX format needs it (a TorchScript export does not)
    axes = {0: 'batch'}
    if dynamic_size:
        axes.update({2: 'height', 3: 'width'})
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation note, tracing notes
        warnings.simplefilter('ignore', DeprecationWarning)
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        torch.onnx.export(module, (_example(spec),), buffer, dynamo=False, opset_version=OPSET,
                          input_names=['images'], output_names=['maps'],
                          dynamic_axes={'images': axes, 'maps': axes})
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, {SPEC_KEY: json.dumps(spec)})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def default_export_path(model_path, fmt):
    """Where ``export`` writes the checkpoint ``model_path``'s export in format ``fmt`` unless told:
    beside it, ``<stem>.onnx`` or ``<stem>.torchscript.pt``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + FORMATS[fmt])


def export(model_path, fmt='onnx', out_path=None, dynamic_size=False):
    """Export the checkpoint ``model_path`` in format ``fmt`` ('onnx' or 'torchscript') to
    ``out_path`` (default: next to it, ``<stem>.onnx`` or ``<stem>.torchscript.pt``); returns the
    written path."""
    if fmt not in FORMATS:
        raise ValueError(f'unknown export format {fmt!r}; valid: {list(FORMATS)}')
    model_path = Path(model_path)
    out_path = Path(out_path) if out_path else default_export_path(model_path, fmt)
    if (fmt == 'onnx') != (out_path.suffix.lower() == '.onnx'):
        raise ValueError(f'an export is loaded by its suffix: name an ONNX export *.onnx and a TorchScript '
                         f'one anything else, not {out_path} for --format {fmt}')
    if out_path.exists() and model_path.exists() and out_path.samefile(model_path):
        raise ValueError(f'the export would replace the model it is made from ({model_path}); '
                         f'choose another -o')
    runner, spec = load_checkpoint(model_path)
    module = runner.module.cpu().eval()
    if fmt == 'onnx':
        data = onnx_bytes(module, spec, dynamic_size)
        return write_atomic(out_path, lambda f: f.write(data))
    with torch.no_grad(), warnings.catch_warnings():  # TorchScript is deprecated, still works
        warnings.simplefilter('ignore', DeprecationWarning)
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        traced = torch.jit.trace(module, _example(spec))
        return write_atomic(out_path, lambda f: torch.jit.save(
            traced, f, _extra_files={'nsa_spec.json': json.dumps(spec)}))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 2)[2])
    parser.add_argument('-m', '--model', type=path_argument, required=True, help='a trained model (final_*.pt)')
    parser.add_argument('--format', choices=list(FORMATS), default='onnx', help='default: onnx')
    parser.add_argument('-o', '--out', type=path_argument, help='output file (default: next to the model)')
    parser.add_argument('--dynamic-size', action='store_true',
                        help='ONNX: any image size (multiples of 32) instead of the model\'s')
    return parser.parse_args(argv)


@one_line_warnings(PROG)
def main(argv=None):
    args = parse_args(argv)
    with exit_on_interrupt(PROG, 'nothing was written'), exit_on_input_error(PROG):
        path = export(args.model, args.format, args.out, args.dynamic_size)
    print(f'exported {args.model} to {path}')
    return path


if __name__ == '__main__':
    main()
