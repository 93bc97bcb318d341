"""A run's data: `build_run_data(cfg, device, channels_last, ctx)` is the one entry.

readers.py  the small-image datasets read into uint8 tensors, the validation split
batches.py  device-resident batches: normalisation, translation and flips on the device
loader.py   the DataLoader path (dataset.loader=dataloader): torchvision transforms per image
imagenet.py ImageNet from an ImageFolder tree through DataLoader workers
build.py    build_run_data: picks the path a config asks for
"""

from sdrun.data.batches import RunData
from sdrun.data.build import build_run_data
from sdrun.data.readers import DataError

__all__ = ["DataError", "RunData", "build_run_data"]
