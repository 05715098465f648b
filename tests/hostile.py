"""Weight files whose pickle would run code: unpickling one creates a marker file."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


class MarkerPayload:
    """Unpickled, this calls ``Path(marker).touch()`` -- code running where tensors were due."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def write_payload(path: Path, marker: Path, *, torch_zip: bool = True) -> Path:
    """A LAVIS-shaped ``{"model": {...}}`` file with the payload in place of a tensor, in
    ``torch.save``'s zip format or as a bare (legacy) pickle."""
    state = {"model": {"query_tokens": MarkerPayload(marker)}}
    if torch_zip:
        torch.save(state, path)
    else:
        with path.open("wb") as handle:
            pickle.dump(state, handle)
    return path
