"""flowscan's own layout (see flowscan/layout.py)."""

from __future__ import annotations

from pathlib import Path

from flowscan import layout
from flowscan.errors import ScanError
from flowscan.io import safetensors_file
from flowscan.readers.base import RawRound, Reader, Round
from flowscan.readers.registry import register


@register
class FlowscanReader(Reader):
    name = "flowscan"
    description = "flowscan's own layout: round_NNNN/{weights,masks}.safetensors + round.json"

    def guess_can_open(self, folder: Path) -> bool:
        return (folder / layout.RUN_MANIFEST).is_file() or bool(layout.complete_rounds(folder))

    def rounds(self, folder: Path):
        rounds, notes = [], []
        for index, sub in layout.complete_rounds(folder):
            manifest = sub / layout.ROUND_MANIFEST
            try:
                info = layout.read_json(manifest)
            except (OSError, ValueError, RecursionError) as exc:
                raise ScanError(manifest, f"unreadable round manifest: {type(exc).__name__}: {exc}") from None
            if not isinstance(info, dict) or not isinstance(info.get("metrics") or {}, dict):
                raise ScanError(manifest, "round manifest is not a JSON object with a metrics object")
            metrics = {str(k): float(v) for k, v in (info.get("metrics") or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            masks = sub / layout.MASKS
            files = (sub / layout.WEIGHTS,) + ((masks,) if masks.exists() else ())
            rounds.append(Round(index, self.name, files, (), metrics))
        for sub in folder.glob("round_*"):   # the manifest is written last: without it the round is unfinished
            index = layout.round_index(sub)
            if index is not None and sub.is_dir() and not (sub / layout.ROUND_MANIFEST).exists():
                rounds.append(Round(index, self.name, (sub,), incomplete=f"{sub}: no {layout.ROUND_MANIFEST} yet"))
        return sorted(rounds, key=lambda r: r.index), notes

    def open_round(self, round: Round) -> RawRound:
        weights, _ = safetensors_file.load(round.files[0])
        masks, mask_path = (safetensors_file.load(round.files[1])[0], round.files[1]) if len(round.files) > 1 else (None, None)
        return RawRound(weights, round.files[0], masks, mask_path)
