"""One picture's camera as the generator finds it, alone or averaged with its mirror image's: what ``gmpi poses``,
``gmpi invert --mirror`` and the camera benchmark share.

    fit = estimate_camera(G, preset, target, settings, search, reader)   # dict, or None after Ctrl-C
    fit = mirror_fit(G, preset, target, settings, search, reader)        # the same, averaged with the mirror's

A fit is the camera search (:mod:`.pose_search`; around the ``reader``'s reading when given) and stage 1 of
:func:`~gmpi_lightning.inversion.invert` with the camera learned; no pivotal tuning (it does not move the camera).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .cameras import clamp_to_prior
from .inversion import InvertSettings, invert
from .pose_reader import yaw_window
from .pose_search import SearchSettings


def estimate_camera(G, preset, target, settings: InvertSettings, search: SearchSettings, reader=None,
                    progress: bool = False) -> dict | None:
    """One picture's camera (``target``: 1 x 3 x R x R in [0, 1]) and what a report keeps of it: yaw, pitch, the
    search's confidence, loss gap, winner and runner-up, the reconstruction's PSNR, the reader's reading; None when
    Ctrl-C stopped it."""
    reading = None
    if reader is not None:
        with torch.no_grad():
            reading = [float(v) for v in reader(target * 2 - 1)[0]]
        search = replace(search, yaw_range=yaw_window(reading[0], preset))
    inv = invert(G, preset, target, settings=replace(settings, pti_steps=0), search=search, progress=progress)
    if inv.interrupted:
        return None
    found = inv.history["pose_search"]
    return {"yaw": inv.yaw, "pitch": inv.pitch, "confidence": found["confidence"], "loss_gap": found["loss_gap"],
            "search": [found["best"]["yaw"], found["best"]["pitch"]], "runner_up": found["runner_up"],
            "recon_psnr": inv.metrics()["recon_psnr"], "seconds": sum(h["seconds"] for h in inv.history.values()),
            **({"reader": reading} if reading else {})}


def mirror_average(image: dict, mirrored: dict, preset=None) -> dict:
    """One camera from the fits on a picture and on its left-right mirror (whose yaw is the picture's negated): yaw
    ``(y - y_mirrored) / 2``, pitch the mean (inside ``preset``'s prior when given), so a lean to one side cancels.
    Confidence, loss gap, runner-up: the less confident fit's (a mirrored runner-up's yaw negated; none if a fit has
    no confidence); ``mirror_disagreement`` = ``|y + y_mirrored|`` (radians), large where a fit took the wrong side."""
    yaw, pitch = (image["yaw"] - mirrored["yaw"]) / 2, (image["pitch"] + mirrored["pitch"]) / 2
    if preset is not None:
        yaw, pitch = clamp_to_prior(yaw, pitch, preset)
    unsure = min((image, mirrored), key=lambda f: -1.0 if f["confidence"] is None else f["confidence"])
    runner_up = unsure.get("runner_up")
    if unsure is mirrored and runner_up is not None:
        runner_up = {**runner_up, "yaw": -runner_up["yaw"]}
    return {"yaw": yaw, "pitch": pitch, "confidence": unsure["confidence"], "loss_gap": unsure.get("loss_gap"),
            "runner_up": runner_up, "mirror_disagreement": abs(image["yaw"] + mirrored["yaw"]), "image": image,
            "mirrored": mirrored}


def mirror_fit(G, preset, target, settings: InvertSettings, search: SearchSettings, reader=None,
               progress: bool = False) -> dict | None:
    """:func:`estimate_camera` on ``target`` and on its mirror, averaged (:func:`mirror_average`); None when Ctrl-C
    stopped either (the mirror's fit is not started after the picture's was stopped)."""
    fits = [estimate_camera(G, preset, target, settings, search, reader, progress)]
    if fits[0] is not None:
        fits.append(estimate_camera(G, preset, target.flip(-1), settings, search, reader, progress))
    return None if fits[-1] is None else mirror_average(*fits, preset=preset)
