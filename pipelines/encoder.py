"""One encoder model per worker process, shared by the sampling and the encoding steps.

Beam creates a DoFn instance per step and per thread (and, on some runners, per bundle); a
model loaded in each instance's ``setup`` would be loaded once for sampling and again for
encoding, on every thread. Both steps instead acquire it through one process-wide
``apache_beam.utils.shared.Shared`` handle, tagged with what selects the weights (model, device,
dtype): the first acquire in a process loads the model, every later one gets the same object
while any step still holds it (and ``Shared`` keeps the last acquired object alive between
stages). A different tag loads the other model and lets the first one go.

``LOADS`` counts the real loads in this process, by tag: the tests read it (in each Dask worker
too) to check that a whole build loads the model once per process.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from apache_beam.utils.shared import Shared

# Created at import, so once per process: every step of every pipeline in this process that
# asks for the same tag shares the object. (A Shared handle pickled inside a DoFn would carry
# its creator's key; this one is never pickled.)
_SHARED = Shared()
_LOCK = threading.Lock()
LOADS: collections.Counter[str] = collections.Counter()


@dataclass(frozen=True)
class EncoderSpec:
    """What selects the encoder's weights; small and picklable, captured by the DoFns."""

    model: str
    device: str = ""
    dtype: str = ""

    @classmethod
    def of(cls, config) -> EncoderSpec:
        return cls(str(config.model), config.device, config.dtype)

    @property
    def tag(self) -> str:
        return f"{self.model}|{self.device}|{self.dtype}"


def _load(spec: EncoderSpec):
    from pipelines.forward import HiddenStateModel

    with _LOCK:
        LOADS[spec.tag] += 1
    start = time.perf_counter()
    model = HiddenStateModel(spec.model, spec.device, spec.dtype)
    model.load_ms = int((time.perf_counter() - start) * 1000)
    return model


def claim_load_ms(model) -> int | None:
    """The time ``model`` took to load, to the first step that asks (None afterwards): the
    step that happens to load it reports the load once, whichever step that is."""
    with _LOCK:
        ms, model.load_ms = getattr(model, "load_ms", None), None
    return ms


def acquire_encoder(spec: EncoderSpec):
    """The process's ``HiddenStateModel`` for ``spec``, loaded on first use.

    Hold the result for as long as it is used (a DoFn keeps it from ``setup`` on): the shared
    map keeps only a weak reference (and one strong one to the last object acquired).
    """
    return _SHARED.acquire(lambda: _load(spec), tag=spec.tag)
