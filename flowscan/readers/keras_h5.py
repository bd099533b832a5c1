"""Keras weight files per round, with TF-MOT `prune_low_magnitude` masks.

    run/round_<n>.h5            legacy HDF5 weights (model.save_weights / model.save)
    run/round_<n>.weights.h5    Keras-v3 weights (no names: layers/<key>/vars/<i>)
    run/round_<n>.keras         zip of config.json + model.weights.h5

Legacy files name every weight (`weight_names` of each layer group): `prune_low_magnitude_conv1/
conv1/kernel:0` with its mask at `prune_low_magnitude_conv1/prune_low_magnitude_conv1/mask:0`
(plus `threshold:0`, `pruning_step:0`). Canonical names drop the `:0` and the wrapper:
`conv1.kernel`. A wrapper's k-th mask belongs to its k-th weight of the mask's shape.

Keras-v3 files have no names: `layers/prune_low_magnitude[_i]/layer/vars/{0,1}` are the wrapped
layer's kernel and bias, and the wrapper's own `vars` are copies of its pruned weights, then mask
and threshold per pruned weight, then `pruning_step`. Copies are dropped (they must not count
twice). The layer names come from the `.keras` config (the i-th layer of a class is keyed
`<class_in_snake_case>_<i>`); a bare `.weights.h5` keeps the keys (`prune_low_magnitude_1.kernel`).
Optimizer and metric variables are not weights. Needs h5py (`pip install 'flowscan[keras]'`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flowscan.errors import ScanError
from flowscan.io import h5_file
from flowscan.readers.base import FilePerRoundReader
from flowscan.readers.registry import register

WRAPPER = "prune_low_magnitude"
_BOOKKEEPING = re.compile(r"^(mask|threshold|pruning_step)(_\d+)?$")
NOT_WEIGHTS = ("optimizer", "metrics", "vars")    # top-level groups of a Keras-v3 file
# Names of a layer's variables by position, for the classes whose order is fixed.
VAR_NAMES = {
    "Dense": ("kernel", "bias"), "Conv1D": ("kernel", "bias"), "Conv2D": ("kernel", "bias"),
    "Conv3D": ("kernel", "bias"), "Conv2DTranspose": ("kernel", "bias"), "Conv1DTranspose": ("kernel", "bias"),
    "Conv3DTranspose": ("kernel", "bias"), "DepthwiseConv2D": ("depthwise_kernel", "bias"),
    "Embedding": ("embeddings",),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}


def _text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def snake_case(name: str) -> str:
    """Keras's own `to_snake_case` (the keys of a v3 file's layers)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()
    return name if name[:1] != "_" else "private" + name


def canonical(name: str) -> str:
    """`prune_low_magnitude_conv1/conv1/kernel:0` -> `conv1.kernel`."""
    parts = [p for p in re.sub(r":\d+$", "", name).split("/") if p]
    if len(parts) > 1 and parts[0] == f"{WRAPPER}_{parts[1]}":
        parts = parts[1:]
    return ".".join(parts)


def _pair_masks(path, layer: str, weights: list[tuple[str, Any]], masks: list[tuple[str, Any]]):
    """Each mask with the first weight of its shape not yet paired, in order."""
    paired, free = {}, list(weights)
    for mask_name, mask in masks:
        match = next((i for i, (_, w) in enumerate(free) if tuple(w.shape) == tuple(mask.shape)), None)
        if match is None:
            raise ScanError(path, f"layer {layer}: mask {mask_name} of shape {tuple(mask.shape)} matches no "
                                  "weight of the wrapped layer")
        name, _ = free.pop(match)
        paired[name] = mask
    return paired


def _put(arrays: dict, path, name: str, dataset) -> None:
    """Add a lazy array; two datasets under one canonical name are an error, never a silent pick."""
    if name in arrays:
        raise ScanError(path, f"two datasets are named {name!r} (after removing the TF-MOT wrapper)")
    arrays[name] = h5_file.lazy(path, name, dataset)


# -- legacy files: every weight named --------------------------------------------------------------
def _legacy(f, path) -> tuple[dict, dict]:
    root = f["model_weights"] if "model_weights" in f else f
    layers = [_text(n) for n in root.attrs.get("layer_names", [])] or list(root.keys())
    weights, masks = {}, {}
    for layer in layers:
        group = root.get(layer)
        if group is None:
            raise ScanError(path, f"layer {layer!r} is listed but has no group")
        names = [_text(n) for n in group.attrs.get("weight_names", [])]
        own, bookkeeping = [], []
        for raw in names:
            dataset = group.get(raw)
            if dataset is None:
                raise ScanError(path, f"layer {layer}: weight {raw!r} is listed but not stored")
            if not h5_file.is_numeric(dataset):
                continue
            last = re.sub(r":\d+$", "", raw.split("/")[-1])
            is_wrapper_var = layer.startswith(WRAPPER) and raw.split("/")[0] == layer
            if is_wrapper_var and _BOOKKEEPING.match(last):
                if last.startswith("mask"):
                    bookkeeping.append((raw, dataset))
                continue
            own.append((canonical(raw), dataset))
        for name, dataset in own:
            _put(weights, path, name, dataset)
        for name, dataset in _pair_masks(path, layer, own, bookkeeping).items():
            _put(masks, path, name, dataset)
    return weights, masks


# -- Keras-v3 files: positions, names from the config -------------------------------------------
def _key_order(key: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)(?:_(\d+))?$", key)
    return m.group(1), int(m.group(2) or 0)


def _layer_names(config: dict | None, prefix: str = "") -> dict[str, tuple[str, str | None]]:
    """v3 key -> (layer name, class of the layer it holds) from a .keras config, nested models too."""
    out: dict[str, tuple[str, str | None]] = {}
    layers = (((config or {}).get("config") or {}).get("layers")) if isinstance(config, dict) else None
    if not isinstance(layers, list):
        return out
    used: dict[str, int] = {}
    for layer in layers:
        if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
            continue
        key = snake_case(layer["class_name"])
        used[key] = used.get(key, -1) + 1
        key = key if used[key] == 0 else f"{key}_{used[key]}"
        conf = layer.get("config") if isinstance(layer.get("config"), dict) else {}
        name, cls = str(conf.get("name", key)), layer["class_name"]
        inner = conf.get("layer")
        if layer["class_name"] == "PruneLowMagnitude" and isinstance(inner, dict):
            inner_conf = inner.get("config") if isinstance(inner.get("config"), dict) else {}
            name, cls = str(inner_conf.get("name", name)), inner.get("class_name")
        out[prefix + key] = (name, cls if isinstance(cls, str) else None)
        for sub_key, sub in _layer_names(layer, f"{prefix}{key}/").items():
            out[sub_key] = (f"{name}.{sub[0]}", sub[1])
    return out


def _vars(group) -> list[Any]:
    """A `vars` group's datasets in index order (0, 1, ..., 10: not HDF5's name order)."""
    if group is None:
        return []
    keys = sorted((k for k in group.keys() if k.isdigit()), key=int)
    return [group[k] for k in keys]


def _var_name(cls: str | None, index: int, wrapped: bool) -> str:
    names = VAR_NAMES.get(cls or "", ("kernel", "bias") if wrapped else ())
    return names[index] if index < len(names) else f"vars.{index}"


def _v3(f, path, config: dict | None) -> tuple[dict, dict]:
    names = _layer_names(config)
    weights, masks = {}, {}
    stack = [("", f["layers"])]
    while stack:
        prefix, layers = stack.pop()
        for key in sorted(layers.keys(), key=_key_order):
            group = layers[key]
            label, cls = names.get(prefix + key, ((prefix.replace("/", ".") + key), None))
            if "layers" in group:   # a nested model
                stack.append((f"{prefix}{key}/", group["layers"]))
            if "layer" in group and key.startswith(WRAPPER):
                inner = [d for d in _vars(group["layer"].get("vars")) if h5_file.is_numeric(d)]
                own = [(f"{label}.{_var_name(cls, i, True)}", d) for i, d in enumerate(inner)]
                arrays = [d for d in _vars(group.get("vars")) if h5_file.is_numeric(d) and d.shape != ()]
                half = len(arrays) // 2
                if len(arrays) % 2 == 0 and all(a.shape == b.shape for a, b in zip(arrays[:half], arrays[half:])):
                    arrays = arrays[half:]   # copies of the pruned weights come first; then the masks
                for name, d in own:
                    _put(weights, path, name, d)
                for name, d in _pair_masks(path, key, own, [(m.name, m) for m in arrays]).items():
                    _put(masks, path, name, d)
            else:
                for i, d in enumerate(_vars(group.get("vars"))):
                    if h5_file.is_numeric(d):
                        _put(weights, path, f"{label}.{_var_name(cls, i, False)}", d)
    return weights, masks


def read(path) -> tuple[dict, dict]:
    """(weights, masks) of one Keras weight file, lazily (the file stays open while they live)."""
    f, config = h5_file.open_weights(path)
    try:
        if "layers" in f and "layer_names" not in f.attrs and "model_weights" not in f:
            weights, masks = _v3(f, path, config)
        else:
            weights, masks = _legacy(f, path)
        if not weights:
            raise ScanError(path, "no weights found (neither a legacy nor a Keras-v3 weights file?)")
    except Exception as exc:  # noqa: BLE001 - libhdf5 damage surfaces as many kinds
        f.close()
        if isinstance(exc, ScanError):
            raise
        raise ScanError(path, f"unexpected Keras weight layout: {type(exc).__name__}: {exc}") from None
    return weights, masks


@register
class KerasReader(FilePerRoundReader):
    name = "keras"
    description = ("Keras weights per round: *N*.h5, *N*.weights.h5 or *N*.keras, TF-MOT prune_low_magnitude "
                   "masks")
    needs = ("h5py",)
    file_pattern = re.compile(r"^.*\d.*\.(h5|hdf5|keras)$", re.IGNORECASE)
    what = "Keras weight"

    def read(self, path: Path) -> tuple[dict, dict]:
        return read(path)
