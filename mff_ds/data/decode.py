"""`data.decode: gpu`: workers read the files, the main process decodes and augments whole batches on the device.

Workers (`pack_batch`): read the bytes, parse the header for the image size and draw the crop and flip parameters
exactly as the CPU path does (`transforms.prepare`, same generator, same order: the same seed gives the same
boxes and flips on either path), and ship the batch's JPEGs as one uint8 tensor (shared memory, not pickled).
Files nvJPEG should not get (PNG, CMYK or EXIF-rotated JPEGs, truncated files) are decoded and augmented by
the CPU path in the worker, as without `decode: gpu`, and shipped as finished uint8 images.
Main process (`decode_batch`): nvJPEG decodes the batch's JPEGs in one `torchvision.io.decode_jpeg(list,
device=...)` call (the hardware decoder on A100/H100/H200 for baseline JPEGs); a file it rejects is decoded by
the CPU path's decoder there; undecodable files are replaced and counted as bad samples as on the CPU path.
Augmentation is the CPU path's `apply` on float pixels on the device (torch's CUDA resize kernels do not take
uint8), rounded once at the end.
Difference from the CPU path: a JPEG cut short but still ending with an end marker may decode (grey where data is
missing) where libjpeg-turbo on the CPU path rejects it.
`Prefetcher` does all this for batch n+1 in a thread, on a side CUDA stream, while batch n trains.
"""
import contextlib
import dataclasses
import queue
import threading

import torch

from .transforms import LazyImage, _fast_jpeg_size, chw, decode_for, to_uint8

DECODES = ("auto", "cpu", "gpu")


@dataclasses.dataclass
class PackedBatch:
    """One batch as the workers ship it for device decoding."""
    data: torch.Tensor   # uint8 (total,): the JPEGs for nvJPEG back to back (nothing for the other samples)
    offsets: list        # n + 1 byte offsets into data
    params: list         # augmentation parameters of the JPEGs for nvJPEG, None for the other samples
    done: dict           # sample index -> row of `images`: decoded and augmented in the worker
    images: torch.Tensor  # uint8 (len(done), 3, S, S)
    names: list          # sample names, for bad-sample messages


def nvjpeg_ok(data, image):
    """A sequential YCbCr/gray JPEG without EXIF rotation that ends with its EOI marker. Other files go to the
    CPU decoder: nvJPEG ignores EXIF, does not convert CMYK, decodes a truncated file without an error, and
    decodes progressive files one by one with host-side Huffman decoding in the main process."""
    jpeg = image.jpeg if image.jpeg is not None else _fast_jpeg_size(data)
    return jpeg is not None and data.rstrip(b"\0")[-2:] == b"\xff\xd9" and _sequential(data)


def _sequential(data):
    """The JPEG's frame is baseline or extended sequential Huffman (SOF0 / SOF1), what nvJPEG's batched hardware
    path takes. A walk over the marker segments: simplejpeg's header does not say, and PIL's costs 10x more."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in (0xC0, 0xC1):
            return True
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return False  # progressive, lossless or arithmetic-coded frame (or no frame before the scan)
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def pack_batch(jpegs, done, names, size):
    """jpegs [(bytes, params) or None], done {k: uint8 (3, S, S)} -> PackedBatch (worker side)."""
    files = [j[0] if j else b"" for j in jpegs]
    offsets = [0]
    for f in files:
        offsets.append(offsets[-1] + len(f))
    data = torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8) if offsets[-1] else \
        torch.empty(0, dtype=torch.uint8)
    images = torch.stack(list(done.values())) if done else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return PackedBatch(data, offsets, [j[1] if j else None for j in jpegs], {k: i for i, k in enumerate(done)},
                       images, list(names))


def _decode_jpegs(files, device):
    """torchvision.io.decode_jpeg over a list (one batched nvJPEG call on CUDA) -> RGB uint8 (3, H, W) per file,
    None where it fails (one bad file fails the batched call: the files are then retried one by one)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        out = []
        for f in files:
            try:
                out.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_batch(packed, labels, bad, aug, size, device, fast=True):
    """PackedBatch -> (uint8 (n, 3, size, size) on `device`, labels, bad [(k, sample name, reason)]); bad samples
    are replaced as on the CPU path (`fill_bad`)."""
    n = len(packed.params)
    files = [packed.data[a:b] for a, b in zip(packed.offsets[:-1], packed.offsets[1:])]
    gpu = [k for k in range(n) if packed.params[k] is not None]
    decoded = dict(zip(gpu, _decode_jpegs([files[k] for k in gpu], device))) if gpu else {}
    out = torch.empty((n, 3, size, size), dtype=torch.float32, device=device)
    if packed.done:
        done = list(packed.done)
        out[done] = packed.images.to(device).float()
    bad, good = list(bad), sorted(packed.done)
    for k in gpu:
        p, x = packed.params[k], decoded.get(k)
        try:
            if x is None:  # the device decoder failed: the CPU path's decoder (names the problem: BadImage)
                image = LazyImage(files[k].numpy().tobytes(), fast)
                x = chw(decode_for(image, aug, p, fast)).to(device)
            out[k] = aug.apply(x.float(), p)
            good.append(k)
        except Exception as e:  # never let one file stop the run
            bad.append((k, packed.names[k], str(e)[:200]))
    imgs = to_uint8(out)
    good.sort()
    fill_bad(imgs, labels, good, bad)
    return imgs, labels, sorted(bad)


def fill_bad(imgs, labels, good, bad):
    """Replace bad samples by good ones of the same batch (keeps stream positions fixed), or zeros / -1.
    Shared by both paths, so that they replace alike."""
    for k, *_ in bad:
        if good:
            src = good[k % len(good)]
            imgs[k], labels[k] = imgs[src], labels[src]
        else:
            imgs[k], labels[k] = 0, -1


class Prefetcher:
    """Maps `fn` over `source` in a thread, up to `depth` items ahead; on CUDA on a side stream, synchronised
    before an item is handed over (so the consumer's stream needs no wait, only `record_stream`)."""

    def __init__(self, source, fn, device, depth=2):
        self.device, self.q, self.stop = device, queue.Queue(max(depth, 1)), threading.Event()
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.thread = threading.Thread(target=self._run, args=(source, fn), daemon=True, name="mff-ds-decode")
        self.thread.start()

    def _run(self, source, fn):
        try:
            if self.stream is not None:
                torch.cuda.set_device(self.device)  # a new thread starts on device 0, whatever the rank's
            with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                for item in source:
                    out = fn(item)
                    if self.stream is not None:
                        self.stream.synchronize()
                    if not self._put(("item", out)):
                        return
            self._put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put(("error", e))

    def _put(self, msg):
        while not self.stop.is_set():
            try:
                self.q.put(msg, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self):
        kind, item = self.q.get()
        if kind == "end":
            raise StopIteration
        if kind == "error":
            raise item
        if self.stream is not None:  # allocated on the side stream, used on the consumer's
            item[1].record_stream(torch.cuda.current_stream(self.device))
        return item

    def close(self):
        self.stop.set()
        self.thread.join()
