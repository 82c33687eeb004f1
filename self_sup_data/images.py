"""Reading and resizing images as numpy arrays: what training, evaluation and prediction share.

Images are ``uint8`` arrays ``H x W x C`` (C = 1 for grayscale, 3 for RGB). This module needs
only numpy, OpenCV and Pillow (no torch), so that a deployment with an exported model can use it.
"""
import contextlib
import glob
import numbers
import os
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.pgm', '.ppm', '.pnm')
# image files that folders are not read for (animations, raw camera files, DICOM ...): counted in a warning
UNREAD_IMAGE_SUFFIXES = ('.gif', '.jp2', '.j2k', '.jpe', '.jfif', '.heic', '.heif', '.avif', '.tga', '.pbm', '.psd',
                         '.exr', '.hdr', '.dcm', '.dicom', '.raw', '.dng', '.cr2', '.nef', '.arw')
GLOB_CHARACTERS = '*?['
INTEGER_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')  # Pillow's modes of integer grey images
GREY_MODES = ('1', 'L', 'LA', 'La') + INTEGER_MODES  # the modes decode_values reads as grey
ALPHA_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')  # Pillow's modes with an alpha channel
PREMULTIPLIED_MODES = {'La': 'LA', 'RGBa': 'RGBA'}  # Pillow's modes of premultiplied colour, and straight
EXIF_ORIENTED_FORMATS = ('JPEG', 'MPO')  # camera images, which viewers turn by their EXIF orientation
EXIF_ORIENTATION = 0x0112
JPEG_FORMATS = ('JPEG', 'MPO')  # Pillow's formats of JPEG files (MPO: a photo and its previews)
TIFF_JPEG_COMPRESSIONS = ('jpeg', 'tiff_jpeg')  # Pillow's names of the JPEG compression of TIFFs
# bits of the data in 16-bit images: 8-bit data saved as 16 bits, 10-, 12- and 14-bit sensors, the full range
HIGH_BIT_DEPTHS = (8, 10, 12, 14, 16)
# a suggested intensity window's widening on each side, a fraction of the range of the normal images' values
WINDOW_MARGIN = 0.25
BIT_DEPTH_RULE = 'the smallest of 8, 10, 12, 14 and 16 bits that holds their largest value'


def high_bit_depth(values):
    """The bit depth of the data of a 16-bit image: the smallest of ``HIGH_BIT_DEPTHS`` that holds
    its largest value (12-bit data stored in 16-bit PNGs has values up to 4095), so that every
    grey level of 8- to 14-bit data stays one."""
    largest = int(values.max(initial=0))
    return next((bits for bits in HIGH_BIT_DEPTHS if largest < 2 ** bits), HIGH_BIT_DEPTHS[-1])


def _is_16_bit_colour(image):
    """Whether Pillow's ``image`` is colour stored with 16 bits a channel (a raw mode such as
    ``RGB;16B`` in its tiles' decoder arguments)."""
    if image.mode not in ('RGB', 'RGBA'):
        return False
    for tile in image.tile:
        args = tile[3] if len(tile) > 3 else None
        raw_mode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw_mode, str) and ';16' in raw_mode:
            return True
    return False


PNM_MAGIC_CHANNELS = {b'P2': 1, b'P5': 1, b'P3': 3, b'P6': 3}  # PGM and PPM, plain (ASCII) and binary


def _pnm_header(data):
    """(magic, width, height, maxval, offset of the pixels) of the PGM or PPM file ``data``
    (``# ...`` comments skipped); ValueError for a truncated header."""
    tokens, position = [], 0
    while len(tokens) < 4:
        while position < len(data) and (data[position:position + 1].isspace() or data[position] == ord('#')):
            if data[position] == ord('#'):
                end = data.find(b'\n', position)
                position = len(data) if end < 0 else end
            position += 1
        start = position
        while position < len(data) and not data[position:position + 1].isspace() and data[position] != ord('#'):
            position += 1
        if start == position:
            raise ValueError('truncated PGM/PPM header')
        tokens.append(data[start:position])
    return tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3]), position + 1


def _is_deep_pnm(image):
    """Whether Pillow's ``image`` is a PGM or PPM file (format 'PPM') whose maxval is above 255 (in
    its tiles' decoder arguments: ``(raw mode, maxval)``, or the raw mode ``I;16B`` of maxval
    65535): Pillow reads 16-bit PPM as 8-bit and scales other maxvals to 0..65535, losing the data's
    own range (``_deep_pnm_values`` reads them)."""
    if image.format != 'PPM':
        return False
    for tile in image.tile:
        args = tile[3] if len(tile) > 3 else None
        if args == 'I;16B' or (isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], int)
                               and args[1] > 255):
            return True
    return False


def _deep_pnm_values(path):
    """The values as stored (uint16 ``H x W``, or ``H x W x 3`` RGB) of the PGM or PPM file at
    ``path`` of a maxval above 255 (``_is_deep_pnm``)."""
    data = Path(path).read_bytes()
    magic, width, height, maxval, offset = _pnm_header(data)
    channels = PNM_MAGIC_CHANNELS[magic]
    count = width * height * channels
    if magic in (b'P5', b'P6'):  # two bytes a value, most significant first
        if len(data) - offset < 2 * count:
            raise ValueError(f'truncated: {len(data) - offset} bytes of pixels, {2 * count} expected')
        values = np.frombuffer(data, '>u2', count=count, offset=offset)
    else:
        values = np.array(data[offset - 1:].split()[:count], dtype=np.int64)
        if values.size < count:
            raise ValueError(f'truncated: {values.size} values, {count} expected')
    if values.max(initial=0) > maxval:
        raise ValueError(f'values up to {values.max()} beyond the file\'s maxval {maxval}')
    shape = (height, width) if channels == 1 else (height, width, channels)
    return values.astype(np.uint16).reshape(shape)


def _deep_tiff_layout(image):
    """For a TIFF of more than 8 bits a sample: (planar, min_is_white, largest value) from its tags
    (PlanarConfiguration 2: stored plane by plane; PhotometricInterpretation 0: 0 is white;
    MaxSampleValue, else the bits' range); None for other images."""
    if image.format != 'TIFF':
        return None
    tags = image.tag_v2
    bits = tags.get(258, 8)
    bits = max(bits) if isinstance(bits, tuple) else int(bits)
    if bits <= 8:
        return None
    largest = tags.get(281, 2 ** bits - 1)
    largest = max(largest) if isinstance(largest, tuple) else int(largest)
    return tags.get(284, 1) == 2, tags.get(262) == 0, largest


def decode_16_bit_colour(path):
    """(uint16 ``H x W x 3`` RGB, its uint16 ``H x W`` alpha channel or None) of a colour file of 16
    bits a channel, decoded by OpenCV: Pillow reads such files as their high bytes only."""
    values = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if values is None or values.dtype != np.uint16 or values.ndim != 3 or values.shape[2] < 3:
        raise ValueError('a colour image of 16 bits a channel that OpenCV cannot decode '
                         '(truncated?)')
    alpha = values[:, :, 3] if values.shape[2] == 4 else None
    return np.ascontiguousarray(values[:, :, 2::-1]), alpha  # BGR(A) -> RGB


def _associated_alpha(image):
    """Whether Pillow's ``image`` is a TIFF whose alpha is associated (ExtraSamples 1): its colour
    is stored premultiplied, already over black."""
    if image.format != 'TIFF':
        return False
    extra = image.tag_v2.get(338)
    return 1 in (extra if isinstance(extra, tuple) else (extra,))


def _alpha_band(image):
    """uint8 ``H x W`` alpha of Pillow's 8-bit ``image`` (an alpha channel, or a colour keyed
    transparent), or None without transparency."""
    if 'A' in image.getbands():
        return np.asarray(image.getchannel('A'))
    if image.info.get('transparency') is not None:
        return np.asarray(image.convert('RGBA'))[:, :, 3]
    return None


def _opacity(alpha, top):
    """float32 ``alpha / top`` in 0..1, or None where ``alpha`` is None or opaque everywhere."""
    return None if alpha is None or alpha.min(initial=top) == top else alpha.astype(np.float32) / top


# what Pillow's decoders raise on some malformed files besides OSError (e.g. a TIFF whose
# directory holds a wrong entry count: TypeError 'Missing dimensions')
MALFORMED_FILE_ERRORS = (TypeError, struct.error, IndexError, EOFError, KeyError, ZeroDivisionError)


@contextlib.contextmanager
def opened_image(path):
    """Pillow's image of the file at ``path``; errors reading it (a decompression bomb too) are
    ValueErrors naming the file."""
    try:
        with Image.open(path) as image:
            yield image
    except Image.DecompressionBombError as error:
        raise ValueError(f"cannot read image {path}: {error} (PIL.Image.MAX_IMAGE_PIXELS sets the "
                         f"limit)") from error
    except (OSError, ValueError, SyntaxError, *MALFORMED_FILE_ERRORS) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def _orientation(image):
    """The EXIF orientation that ``as_displayed`` applies to Pillow's ``image``: its tag for
    ``EXIF_ORIENTED_FORMATS``, else 1 (as stored)."""
    return image.getexif().get(EXIF_ORIENTATION, 1) if image.format in EXIF_ORIENTED_FORMATS else 1


def _turned_by_a_quarter(image):
    """Whether ``as_displayed`` turns Pillow's ``image`` by a quarter (EXIF orientations 5-8)."""
    return _orientation(image) in (5, 6, 7, 8)


def displayed_size(image):
    """(width, height) of Pillow's ``image`` as ``as_displayed`` turns it, from its header alone."""
    width, height = image.size
    return (height, width) if _turned_by_a_quarter(image) else (width, height)


def displayed_file_size(path):
    """(width, height) of the image file at ``path`` as it is read (``as_displayed``), from its header
    alone; ValueError naming an unreadable file."""
    with opened_image(path) as image:
        return displayed_size(image)


def image_shape_summary(sizes):
    """The shapes of images of ``sizes`` ((width, height) each, as read: ``mvtec.load_images``):
    {'aspect': [least, greatest width / height], 'long_side': [least, greatest longer side in
    pixels]}, plain values for a model's meta (``experiments.inference.shape_notes`` compares new
    images with them)."""
    aspects = [width / height for width, height in sizes]
    long_sides = [max(size) for size in sizes]
    return dict(aspect=[float(f'{min(aspects):.6g}'), float(f'{max(aspects):.6g}')],
                long_side=[int(min(long_sides)), int(max(long_sides))])


def image_span(image):
    """The grey-level span of a uint8 image (``H x W`` or ``H x W x C``): the largest, over its
    channels, of a channel's largest value less its smallest; 0 for a uniform or empty image."""
    if not image.size:
        return 0
    channels = image.reshape(-1, image.shape[2] if image.ndim == 3 else 1)
    return int(np.ptp(channels, axis=0).max())


def image_span_summary(images):
    """[least, greatest] ``image_span`` of ``images`` (uint8 arrays, e.g. training images as the
    dataset holds them: resized, in the model's channels), plain ints for a model's meta
    (``experiments.inference.contrast_notes`` compares new images with them)."""
    spans = [image_span(image) for image in images]
    return [min(spans), max(spans)]


def turned_note(path):
    """' (turned by its EXIF orientation N, as viewers show it; stored WxH)' for an image file
    that ``as_displayed`` turns by a quarter, else '': for messages that give its size."""
    with opened_image(path) as image:
        if not _turned_by_a_quarter(image):
            return ''
        return (f" (turned by its EXIF orientation {_orientation(image)}, as viewers show it; stored "
                f"{image.size[0]}x{image.size[1]})")


def lossy_compression(path):
    """The lossy compression of the image file at ``path``, by what its header says it holds (not by
    its suffix): 'JPEG' for a JPEG (or MPO) file and for a TIFF of JPEG-compressed data, 'lossy WebP'
    for a WebP of VP8 data (VP8L is lossless), else None (PNG, BMP, PNM, other TIFFs, lossless WebP).
    Lossy compression rings around edges and blurs fine texture."""
    with opened_image(path) as image:
        if image.format in JPEG_FORMATS:
            return 'JPEG'
        if image.format == 'TIFF' and image.info.get('compression') in TIFF_JPEG_COMPRESSIONS:
            return 'JPEG'
        if image.format == 'WEBP' and b'VP8 ' in _riff_chunk_ids(path):
            return 'lossy WebP'
    return None


ANIMATION_FRAME_HEADER = 16  # bytes of an ANMF chunk (a WebP animation frame) before its ALPH / VP8 / VP8L chunks


def _riff_chunk_ids(path):
    """The four-byte ids of the chunks of the RIFF file (a WebP) at ``path``: its top-level chunks
    and those of each animation frame (ANMF), read within the RIFF's own size (bytes after it are
    not chunks)."""
    ids = []
    with open(path, 'rb') as file:
        header = file.read(12)  # 'RIFF', the size of what follows, 'WEBP'
        end = min(8 + int.from_bytes(header[4:8], 'little'), os.fstat(file.fileno()).st_size)

        def scan(position, stop, top_level=True):
            while position + 8 <= stop:
                file.seek(position)
                chunk = file.read(8)
                size = int.from_bytes(chunk[4:], 'little')
                ids.append(chunk[:4])
                if chunk[:4] == b'ANMF' and top_level:  # frames hold no frames
                    scan(position + 8 + ANIMATION_FRAME_HEADER, min(position + 8 + size, stop), False)
                position += 8 + size + size % 2  # chunks are padded to an even size
        scan(12, end)
    return ids


def as_displayed(image):
    """Pillow's ``image`` turned as image viewers show it, and masks are drawn on it: a JPEG's EXIF
    orientation applied (``EXIF_ORIENTED_FORMATS``); other images as stored."""
    return ImageOps.exif_transpose(image) if _orientation(image) != 1 else image


def decode_values(path):
    """The pixel values of the image file at ``path`` as decoded (``_decoded``), transparency ignored."""
    return _decoded(path)[0]


TRANSPARENT_NOTE = ('nothing shows; the colour is read as stored, transparency ignored (hidden values too); '
                    'save such images without transparency if that is right')


def image_values(path, transparent=None):
    """``decode_values`` of the image file at ``path`` composited over black where some pixel is
    transparent (``_decoded``'s opacity), in their own dtype: a cut-out as viewers show it, what its
    transparent pixels hide (often leftovers) read as 0, before any scaling of 16-bit values. An
    image transparent everywhere (an alpha channel zeroed on export, or every pixel of the colour
    keyed transparent), which viewers show as nothing, gives its colour as stored instead, not an
    all-black image, with a warning naming it; ``transparent``, a list, collects its path instead
    (for a count: ``self_sup_data.mvtec.load_images``)."""
    values, opacity = _decoded(path)
    if opacity is None:
        return values
    if not opacity.any():
        if transparent is None:
            warnings.warn(f'{path} is transparent everywhere: {TRANSPARENT_NOTE}')
        else:
            transparent.append(path)
        return values
    opacity = opacity[..., None] if values.ndim == 3 else opacity
    return (values * opacity).round().astype(values.dtype)


def _decoded(path):
    """(values, opacity) of the image file at ``path``, from one decoding. Opacity: float32 ``H x W``
    in 0..1 of its alpha channel or colour key, None where no pixel is transparent, and where a key
    or alpha is not read: the colour key of integer grey images and of colour of 16 bits a channel,
    and the associated alpha of a TIFF of 16 bits a channel, whose colour OpenCV gives as stored,
    premultiplied, that is over black already (8-bit premultiplied colour is un-premultiplied, and
    composited like straight alpha).

    Values: decode the whole file with Pillow (which raises on truncated data) -> numpy array of the
    pixel values as stored: integers (0..65535) for integer images (also ``H x W x 3`` uint16 for
    colour of 16 bits a channel, ``decode_16_bit_colour``), else uint8 ``H x W`` (grey, also 1-bit
    as 0/255) or ``H x W x 3`` (RGB; palette, RGBA, CMYK ... converted), turned as displayed
    (``as_displayed``); of a multi-page file the first page, with a warning.
    A deeper TIFF whose 0 is white (PhotometricInterpretation 0) is inverted, as Pillow does for
    8-bit ones; a PGM or PPM of a maxval above 255 gives its values as stored (``_deep_pnm_values``).
    Images of floating-point pixels or of integers outside 0..65535 (signed or 32-bit data, whose
    range is not known), deeper TIFFs stored plane by plane, TIFFs with an orientation tag of 2 to
    8 (which Pillow decodes turned, mirrored or scrambled), and images larger than Pillow's decompression-bomb
    limit are ValueErrors naming the file."""
    with opened_image(path) as image:
        if image.mode == 'F':
            raise ValueError(f'{image.mode} images (32-bit floating point) are not supported: '
                             f'their value range is unknown; save them as 8- or 16-bit integers')
        if getattr(image, 'n_frames', 1) > 1 and image.format != 'MPO':  # MPO: a photo and its previews
            warnings.warn(f'{path} holds {image.n_frames} pages; only the first is read')
        tiff = _deep_tiff_layout(image)
        if tiff is not None and tiff[0]:
            raise ValueError('a TIFF of more than 8 bits a sample stored plane by plane '
                             '(PlanarConfiguration 2), which neither Pillow nor OpenCV decodes '
                             'correctly; save it interleaved (contiguous)')
        orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image.format == 'TIFF' else 1
        if 2 <= orientation <= 8:  # 0 and 9 (out of the standard's range) Pillow reads as stored
            raise ValueError(f'a TIFF with orientation tag {orientation}, which Pillow decodes turned or mirrored, '
                             f'or scrambled (tags 5-8), while its masks may be stored as they are; save it '
                             f'without the tag (orientation 1), turned as it should be read')
        if _is_deep_pnm(image):
            return _deep_pnm_values(path), None
        if _is_16_bit_colour(image):
            values, alpha = decode_16_bit_colour(path)  # (OpenCV makes a colour key an alpha channel)
            straight = image.mode == 'RGBA' and not _associated_alpha(image)
            return values, _opacity(alpha, 65535) if straight else None
        image = as_displayed(image)
        image.load()
        if image.mode in INTEGER_MODES:
            values = np.asarray(image)
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise ValueError(f'integer values from {values.min()} to {values.max()} (signed or 32-bit '
                                 f'data) are not supported: their range is unknown; save them as 8- or '
                                 f'16-bit unsigned integers')
            if tiff is not None and tiff[1]:  # 0 is white: as displayed, as Pillow turns 8-bit ones
                values = tiff[2] - np.minimum(values.astype(np.int64), tiff[2])
                values = values.astype(np.uint16)
            return values, None
        if image.mode in PREMULTIPLIED_MODES:  # colour un-premultiplied, as other modes store it
            image = image.convert(PREMULTIPLIED_MODES[image.mode])
        alpha = _alpha_band(image)
        if image.mode in ('1', 'LA'):
            image = image.convert('L')
        elif image.mode not in ('L', 'RGB'):  # palette, RGBA, CMYK, ...
            image = image.convert('RGB')
        return np.asarray(image), _opacity(alpha, 255)


def is_high_depth_file(path):
    """Whether the image file at ``path`` stores more than 8 bits a channel (integer grey, or colour
    of 16 bits a channel), by its header."""
    with opened_image(path) as image:
        return image.mode in INTEGER_MODES or _is_16_bit_colour(image) or _is_deep_pnm(image)


def high_depth_maximum(path):
    """The largest value of the image file at ``path`` when it stores more than 8 bits a channel
    (``is_high_depth_file``), else None; an 8-bit file is not decoded (its header tells). (An image
    transparent everywhere is noted where it is read, ``read_image``.)"""
    return int(image_values(path, transparent=[]).max(initial=0)) if is_high_depth_file(path) else None


def high_depth_percentiles(path, percentiles=(1, 99)):
    """The ``percentiles`` of the values (``image_values``, all channels) of the image file at
    ``path`` when it stores more than 8 bits a channel (``is_high_depth_file``), else None."""
    if not is_high_depth_file(path):
        return None
    return tuple(np.percentile(image_values(path, transparent=[]), percentiles).tolist())


def decode_mask_values(path):
    """The stored values of the mask file at ``path`` (``decode_values``) as ``H x W``: a colour
    mask by its largest channel, 0 where it is transparent (a mask layer exported from an image
    editor: alpha channel or palette transparency); where most pixels are transparent and the most
    opaque ones are all dark, below a quarter of the value range (black strokes on a transparent
    layer, an editor's default brush, whose anti-aliased or resized edges may be grey), its alpha."""
    values = decode_values(path)
    with opened_image(path) as image:
        key = image.info.get('transparency')
        if values.ndim == 2 and isinstance(key, int) and image.mode != 'P':  # a grey value keyed transparent
            values = np.where(values != key, values, 0)
        elif has_transparency(image):
            alpha = np.asarray(as_displayed(image).convert('RGBA'))[:, :, 3]
            most_opaque = values[alpha == alpha.max()]
            if 0 < np.count_nonzero(alpha) < alpha.size / 2 and most_opaque.max() < _value_range(values) / 4:
                return alpha
            values = np.where(alpha[..., None] > 0 if values.ndim == 3 else alpha > 0, values, 0)
    return values.max(axis=2) if values.ndim == 3 else values


def _value_range(values):
    """The largest value that the integer dtype of ``values`` holds (255 for 8 bits), 1 for floats."""
    return np.iinfo(values.dtype).max if values.dtype.kind in 'ui' else 1.0


def has_transparency(image):
    """Whether Pillow's ``image`` has an alpha channel or a colour keyed transparent."""
    return image.mode in ALPHA_MODES or image.info.get('transparency') is not None


def intensity_window(reading):
    """(low, high): the values that a ``reading`` of 16-bit images maps to 0 and 255: bits ``b``
    (an int) read 0..2**b - 1, an intensity window (a pair, the training commands' ``--intensity-range``)
    its own two values."""
    return (0, 2 ** int(reading) - 1) if isinstance(reading, numbers.Integral) else tuple(reading)


def reading_words(reading):
    """How a ``reading`` of 16-bit images reads them, in words for messages: 'as 12-bit data' for
    bits, 'with the intensity window 100..4000' for a window."""
    if isinstance(reading, numbers.Integral):
        return f'as {reading}-bit data'
    low, high = reading
    return f'with the intensity window {low}..{high}'


def to_uint8(values, reading):
    """Integer pixel values (float arrays too, e.g. resized values) scaled to uint8 0..255 by a
    ``reading`` (``intensity_window``: ``bits``-bit data's 0..2**bits - 1, or a window low..high;
    values outside it saturate at 0 or 255): ``(values - low) * 255 / (high - low)``, rounded half
    to even, computed in float64 (exact for every 16-bit value and window)."""
    low, high = intensity_window(reading)
    scaled = (np.asarray(values, dtype=np.float64) - low) * 255 / (high - low)
    return scaled.round().clip(0, 255).astype(np.uint8)


def decode(path, bits=None, transparent=None):
    """``decode_values`` as uint8: a 16-bit image is scaled from the range of ``bits``-bit data
    (a model's ``bit_depth``, see ``self_sup_data.mvtec.load_images``), or from an intensity window
    that ``bits`` gives as a pair (low, high), or, without ``bits``, from the range of the image's
    own bit depth (``high_bit_depth``: e.g. 0..4095 for 12-bit data), so that 8- to 14-bit data
    keeps 256 grey levels (``to_uint8``). ValueError naming the file for values beyond ``bits``
    bits; values outside a window saturate. An image with transparency is composited over black
    first (``image_values``, which ``transparent`` is passed to), so that what its transparent
    pixels hide sets neither the scaling nor the values."""
    values = image_values(path, transparent)
    return values if values.dtype == np.uint8 else _scaled_to_uint8(path, values, bits)


def _scaled_to_uint8(path, values, bits):
    """The integer ``values`` of the 16-bit image at ``path`` scaled to uint8 as ``decode`` says."""
    if isinstance(bits, numbers.Integral) and values.max(initial=0) > 2 ** bits - 1:
        raise ValueError(f"image {path} has values up to {values.max()}, beyond the {bits}-bit range "
                         f"(0..{2 ** bits - 1}) that it is read with, the model's bit_depth ({BIT_DEPTH_RULE} "
                         f"among the training images, or the training command's --bit-depth), which would read it "
                         f"as white; give it the training images' bit depth, or train with the camera's "
                         f"(--bit-depth)")
    return to_uint8(values, bits or high_bit_depth(values))


def image_channels(array):
    """``H x W x C`` of a decoded image (``H x W`` or ``H x W x 3``): C = 1 for grayscale (also
    three identical channels), else 3."""
    if array.ndim == 2:
        return array[:, :, None]
    if np.array_equal(array[:, :, 0], array[:, :, 1]) and np.array_equal(array[:, :, 0], array[:, :, 2]):
        return np.ascontiguousarray(array[:, :, :1])
    return array


def read_image(path, bits=None, transparent=None):
    """uint8 ``H x W x C`` (``image_channels``) of the file at ``path`` (``decode``)."""
    return image_channels(decode(path, bits, transparent))


def to_channels(image, channels):
    """Convert uint8 ``H x W x C`` to ``channels`` (1: luminance, 3: replicate gray)."""
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]


def with_channel_axis(array, channels):
    """OpenCV drops a trailing channel axis of size 1; put it back."""
    return array[:, :, None] if array.ndim == 2 and channels == 1 else array


def resize(image, size, interpolation=None):
    """Resize ``image`` (H x W x C) to ``size x size`` (``resize_to``)."""
    return with_channel_axis(resize_to(image, (size, size), interpolation), image.shape[2])


def resize_to(array, shape, interpolation=None):
    """Resize ``array`` (H x W or H x W x C; OpenCV drops a channel axis of size 1) to
    ``shape = (height, width)``.

    Default interpolation: area averaging where a side shrinks (no aliasing), bilinear where it
    grows. OpenCV's area averaging averages only when no side grows, so an array with one side
    shrinking and the other growing is first shrunk along the one (area averaging), then grown
    along the other (bilinear); both steps keep it centred.
    """
    (height, width), (new_height, new_width) = array.shape[:2], shape
    shrinks, grows = new_height < height or new_width < width, new_height > height or new_width > width
    if interpolation is None and shrinks and grows:
        array = cv2.resize(array, (min(width, new_width), min(height, new_height)),
                           interpolation=cv2.INTER_AREA)
        interpolation = cv2.INTER_LINEAR
    elif interpolation is None:
        interpolation = cv2.INTER_AREA if shrinks else cv2.INTER_LINEAR
    return cv2.resize(array, (new_width, new_height), interpolation=interpolation)


def central_box(shape, crop=None):
    """Slices (rows, columns) of the central ``crop`` x ``crop`` square of an image of ``shape``
    (its first two: height, width), e.g. the part of an object category's test image that its model
    scores; the whole image for ``crop`` None."""
    if crop is None:
        return slice(None), slice(None)
    top, left = (shape[0] - crop) // 2, (shape[1] - crop) // 2
    return slice(top, top + crop), slice(left, left + crop)


def resize_mask(mask, size):
    """Resize a 2-D label mask (uint8 values, or bool) to ``size x size`` by nearest neighbour at
    the centre of each output pixel's footprint (``cv2.INTER_NEAREST_EXACT``), so that it stays
    on its image as ``resize`` moves it; ``cv2.INTER_NEAREST`` samples the footprint's corner
    and puts masks a third of a pixel down and right of their images."""
    dtype = mask.dtype
    resized = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
    return resized.astype(dtype)


def is_image_name(path):
    """Whether ``path`` names an image file: an IMAGE_SUFFIXES suffix (any case), and not hidden
    (``._name.png``: the resource forks that macOS writes beside files on other file systems)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES and not Path(path).name.startswith('.')


def _listed(folder):
    """The entries of ``folder``; none where it cannot be listed (no permission, say)."""
    try:
        return list(Path(folder).iterdir())
    except OSError:
        return []


def folder_images(folder):
    """The image files directly in ``folder`` (``is_image_name``; not its subfolders, even one
    named like an image), sorted; a warning counts the image files of other formats that it
    leaves out (``UNREAD_IMAGE_SUFFIXES``: where a file is named, ``image_files`` takes it), one
    its image names that are links to a missing file, and one the images of its (non-hidden)
    subfolders, which it does not read."""
    entries = list(Path(folder).iterdir())
    files = [p for p in entries if p.is_file()]
    unread = sorted(p.name for p in files if p.suffix.lower() in UNREAD_IMAGE_SUFFIXES and not p.name.startswith('.'))
    if unread:
        files_of = f"{len(unread)} file{'s' if len(unread) > 1 else ''}"
        warnings.warn(f"{folder}: {files_of} of another image format left out (first: {unread[0]}): a folder's "
                      f"images are its {', '.join(IMAGE_SUFFIXES)} files; convert them to one of these")
    broken = sorted(p.name for p in entries if is_image_name(p) and p.is_symlink() and not p.exists())
    if broken:
        warnings.warn(f"{folder}: {len(broken)} link{'s' * (len(broken) != 1)} that lead{'s' * (len(broken) == 1)} "
                      f"to no file left out (first: {broken[0]} -> {os.readlink(Path(folder) / broken[0])})")
    below = sorted(p.relative_to(folder) for sub in entries if sub.is_dir() and not sub.name.startswith('.')
                   for p in _listed(sub) if p.is_file() and is_image_name(p))
    if below:
        warnings.warn(f"{folder}: {len(below)} image{'s' * (len(below) != 1)} in its subfolders left out (first: "
                      f"{below[0]}): a folder's images are the files directly in it")
    return sorted(p for p in files if is_image_name(p))


def image_files(inputs):
    """The image files named by ``inputs`` (paths or strings), in order: a folder gives its files
    with an image suffix (``IMAGE_SUFFIXES``; sorted, not recursive: its subfolders are left out),
    an existing file itself (also when its name holds glob characters, ``scan[1].png``; reading
    it reports whether it is an image), a glob pattern its sorted matches (``**`` matches any
    depth of folders: ``'DIR/**/*.png'``). A file that several inputs name (the same absolute
    path, ``..`` resolved; links are files of their own) is taken once, where it is first named,
    with a warning that counts them.
    ValueError naming a folder without images, a pattern without matches or a path that does not
    exist."""
    files = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = folder_images(path)
            if not found:
                raise ValueError(f'folder {path} holds no images ({", ".join(IMAGE_SUFFIXES)}; '
                                 f'subfolders are not read: give them, or a pattern DIR/**/*.png)')
        elif path.exists():
            found = [path]
        elif any(char in str(entry) for char in GLOB_CHARACTERS):
            found = sorted(Path(p) for p in glob.glob(str(entry), recursive=True)
                           if not Path(p).is_dir())
            if not found:
                raise ValueError(f'pattern {entry} matches no files')
        else:
            raise ValueError(f'input {path} does not exist')
        files += found
    once, seen = [], set()
    for path in files:
        absolute = os.path.abspath(path)
        if absolute not in seen:
            seen.add(absolute)
            once.append(path)
    if len(once) < len(files):
        repeated = len(files) - len(once)
        warnings.warn(f"the inputs name {len(files)} files, {repeated} of them again (a folder and a pattern of "
                      f"it?): each file is read once, {len(once)} in all")
    return once
