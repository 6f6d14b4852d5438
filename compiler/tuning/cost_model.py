"""The XGBoost cost model on disk, without pickle.

MetaSchedule's ``XGBModel.save``/``load`` write a tar holding the booster and a NumPy object array,
read back with ``np.load(allow_pickle=True)``: a ``cost_model.tar`` in a shared log directory could
run code. Kiln writes one ``.npz`` of plain arrays instead and reads it with ``allow_pickle=False``:

    booster    uint8     the booster in XGBoost's own UBJSON model format (``save_raw("ubj")``)
    groups     uint8     UTF-8 JSON: ``[[group_hash, number_of_candidates], ...]`` in training order
    rows       int64     per candidate, the number of feature rows (stores) it has
    features   float32   every candidate's feature rows, concatenated
    costs      float64   per candidate, its measured costs' entry

A pickled ``cost_model.tar`` left by an older Kiln is never opened (the run starts cold, with a
warning).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FILE = "cost_model.npz"
#: What older Kilns wrote: a pickle, refused.
PICKLED_FILE = "cost_model.tar"


def save(model, path: str | os.PathLike) -> bool:
    """Write ``model`` (an ``XGBModel``) to ``path`` atomically; False when it is untrained."""
    if getattr(model, "booster", None) is None:
        return False
    hashes, rows, features, costs = [], [], [], []
    for group in model.data.values():
        hashes.append([str(group.group_hash), len(group.features)])
        for f in group.features:
            arr = np.asarray(f, dtype=np.float32)
            rows.append(arr.shape[0])
            features.append(arr.reshape(arr.shape[0], -1))
        costs.append(np.asarray(group.costs, dtype=np.float64))
    width = features[0].shape[1] if features else 0
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp,
             booster=np.frombuffer(bytes(model.booster.save_raw("ubj")), dtype=np.uint8),
             groups=np.frombuffer(json.dumps(hashes).encode(), dtype=np.uint8),
             rows=np.asarray(rows, dtype=np.int64),
             features=np.concatenate(features) if features else np.zeros((0, width), np.float32),
             costs=np.concatenate(costs) if costs else np.zeros(0))
    os.replace(tmp, path)
    return True


def load(model, path: str | os.PathLike) -> None:
    """Fill ``model`` (an ``XGBModel``) from ``path``; ``ValueError`` or ``OSError`` for a file that is
    not a Kiln cost model (pickles included: they are never unpickled)."""
    import xgboost as xgb
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import FeatureGroup

    with np.load(path, allow_pickle=False) as data:
        groups = json.loads(bytes(data["groups"]).decode())
        rows, features, costs = data["rows"], data["features"], data["costs"]
        booster = xgb.Booster()
        booster.load_model(bytearray(data["booster"].tobytes()))
    if len(rows) != len(costs) or int(rows.sum()) != len(features) or sum(n for _, n in groups) != len(rows):
        raise ValueError("inconsistent cost model arrays")
    starts = np.concatenate([[0], np.cumsum(rows)])
    out, k = OrderedDict(), 0
    for group_hash, n in groups:
        feats = [features[starts[i]:starts[i + 1]] for i in range(k, k + n)]
        out[group_hash] = FeatureGroup(group_hash=group_hash, features=feats, costs=costs[k:k + n])
        k += n
    model.data, model.data_size, model.booster = out, len(rows), booster


def refuse_pickled(log_dir: str | os.PathLike) -> None:
    """Warn (once per run) about a pickled cost model in ``log_dir``, which Kiln does not open."""
    old = Path(log_dir) / PICKLED_FILE
    if old.exists():
        log.warning("not opening %s: it is a pickle (MetaSchedule's format) and could run code; the cost "
                    "model starts cold and is saved as %s from now on (delete the old file)", old, FILE)
